//! The batch/v1 Job of `qsweep worker` pods that consume a sweep's Redis
//! queue, following Kubernetes' "fine parallel processing using a work
//! queue" pattern: no completion count; each pod exits 0 once the sweep has
//! nothing more for it (`--sweep NAME --exit-when-idle`).
//!
//! What the Job carries comes from the spec's `resources` section. The
//! Redis URL, with its password, comes from a Secret through `envFrom`, so
//! no credential is ever part of the Job.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyOnPodConditionsPattern,
    PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, LocalObjectReference,
    ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, SecretEnvSource, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use thiserror::Error;

use crate::owner::HOST_ENV as WORKER_HOST_ENV;
use crate::spec::Resources;

/// Where the `volume_claim` is mounted in every pod.
pub const DATA_MOUNT: &str = "/data";
/// The user and group the worker runs as: k8s/Dockerfile's `USER`.
pub const WORKER_UID: i64 = 65532;
/// The only place a worker writes outside the data volume: its artifact
/// cache, under the temp dir. The root filesystem is read-only, so this is
/// a volume of its own.
pub const TMP_MOUNT: &str = "/tmp";
/// Pod failures before the Job gives up (disruptions do not count).
pub const BACKOFF_LIMIT: i32 = 6;
/// How long a finished Job stays for `kubectl logs` before it is deleted.
pub const TTL_AFTER_FINISHED_S: i32 = 3600;
/// Seconds a worker's running stages get after SIGTERM (`--drain-secs`).
pub const DRAIN_SECS: u64 = 20;
/// The pod's grace period between SIGTERM and SIGKILL: the drain, plus
/// time to hand the tasks back, remove staging and exit.
pub const TERMINATION_GRACE_S: i64 = DRAIN_SECS as i64 + 10;
/// qsweep's exit code for configuration errors: retrying cannot help.
pub const CONFIGURATION_ERROR_EXIT: i32 = 2;

#[derive(Debug, Error, PartialEq)]
pub enum K8sError {
    #[error("image {image:?} has no tag or digest\n  fix: name an exact image, e.g. {image}:0.1.0 or {image}@sha256:..., so every pod runs the same build")]
    UntaggedImage { image: String },
    #[error("the k8s backend needs the spec's `resources` section (GPUs, CPU, memory, max_parallel)\n  fix: add one; see experiments/fashion-resnet.json")]
    NoResources,
}

/// Settings from the command line.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub namespace: String,
    pub image: String,
    /// The Secret whose keys become the pods' environment (REDIS_URL).
    pub secret: String,
    /// Redis key prefix the workers use.
    pub prefix: String,
}

/// An image reference must pin a build: a tag after the last `/`, or a digest.
pub fn check_image(image: &str) -> Result<(), K8sError> {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        Ok(())
    } else {
        Err(K8sError::UntaggedImage { image: image.to_string() })
    }
}

/// A DNS-1123 name part: lowercase alphanumerics and '-', at most `max` long.
fn dns_label(text: &str, max: usize) -> String {
    let mut out: String =
        text.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    out.truncate(max);
    out.trim_matches('-').to_string()
}

/// Which of a sweep's Jobs this is: a sweep gets a new Job only when the
/// last one ended with tasks still queued (its pods had all exited).
pub const GENERATION_LABEL: &str = "qsweep.io/generation";

/// The labels every object of a sweep carries; a restarted coordinator
/// finds its Jobs again by them.
pub fn labels(sweep: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "qsweep".to_string()),
        ("app.kubernetes.io/component".to_string(), "worker".to_string()),
        ("qsweep.io/sweep".to_string(), dns_label(sweep, 63)),
    ])
}

/// The label selector that finds a sweep's Jobs and pods.
pub fn selector(sweep: &str) -> String {
    labels(sweep).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Pods worth running for `pending` tasks: at least one, at most the
/// spec's `max_parallel`.
pub fn parallelism_for(pending: usize, resources: &Resources) -> i32 {
    pending.clamp(1, resources.max_parallel.max(1) as usize) as i32
}

/// Job `generation` of worker pods for `sweep`, with `pending` tasks still to run.
pub fn worker_job(
    sweep: &str,
    resources: Option<&Resources>,
    pending: usize,
    options: &JobOptions,
    generation: u32,
) -> Result<Job, K8sError> {
    check_image(&options.image)?;
    let resources = resources.ok_or(K8sError::NoResources)?;
    let mut job_labels = labels(sweep);
    if let Some(queue) = &resources.kueue_queue {
        job_labels.insert("kueue.x-k8s.io/queue-name".to_string(), queue.clone());
    }

    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if resources.gpu > 0 {
        limits.insert("nvidia.com/gpu".to_string(), Quantity(resources.gpu.to_string()));
    }
    for (name, quantity) in [("cpu", &resources.cpu), ("memory", &resources.memory)] {
        if let Some(quantity) = quantity {
            limits.insert(name.to_string(), Quantity(quantity.clone()));
            requests.insert(name.to_string(), Quantity(quantity.clone()));
        }
    }
    let data = resources.volume_claim.as_ref().map(|claim| Volume {
        name: "data".into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource { claim_name: claim.clone(), read_only: None }),
        ..Default::default()
    });
    let tmp = Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() };
    let mut volume_mounts =
        vec![VolumeMount { name: "tmp".into(), mount_path: TMP_MOUNT.into(), ..Default::default() }];
    if data.is_some() {
        volume_mounts.push(VolumeMount { name: "data".into(), mount_path: DATA_MOUNT.into(), ..Default::default() });
    }
    let container = Container {
        name: "worker".into(),
        image: Some(options.image.clone()),
        command: Some(vec!["qsweep".into()]),
        // The Redis URL arrives as REDIS_URL from the Secret, which
        // `qsweep worker` reads; nothing secret is in the arguments.
        args: Some(vec![
            "worker".into(),
            "--prefix".into(),
            options.prefix.clone(),
            "--sweep".into(),
            sweep.into(),
            "--exit-when-idle".into(),
            "--drain-secs".into(),
            DRAIN_SECS.to_string(),
        ]),
        // Consumer names start with the pod's name, so the coordinator
        // can find the tasks of a pod that was killed.
        env: Some(vec![EnvVar {
            name: WORKER_HOST_ENV.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), api_version: None }),
                ..Default::default()
            }),
            value: None,
        }]),
        env_from: Some(vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource { name: options.secret.clone(), optional: Some(false) }),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            limits: Some(limits),
            requests: (!requests.is_empty()).then_some(requests),
            ..Default::default()
        }),
        volume_mounts: Some(volume_mounts),
        // What the "restricted" Pod Security Standard asks of a container
        // (k8s/namespace.yaml enforces it).
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = PodSpec {
        // podFailurePolicy requires Never: the Job, not the kubelet, decides.
        restart_policy: Some("Never".into()),
        // qsweep handles SIGTERM itself (also as PID 1): it drains for
        // DRAIN_SECS, hands back what still runs, and exits 0 in time.
        termination_grace_period_seconds: Some(TERMINATION_GRACE_S),
        containers: vec![container],
        service_account_name: resources.service_account.clone(),
        priority_class_name: resources.priority_class.clone(),
        node_selector: (!resources.node_selector.is_empty()).then(|| resources.node_selector.clone()),
        tolerations: (!resources.tolerations.is_empty()).then(|| {
            resources
                .tolerations
                .iter()
                .map(|t| Toleration {
                    key: t.key.clone(),
                    operator: t.operator.clone(),
                    value: t.value.clone(),
                    effect: t.effect.clone(),
                    toleration_seconds: None,
                })
                .collect()
        }),
        image_pull_secrets: (!resources.image_pull_secrets.is_empty()).then(|| {
            resources.image_pull_secrets.iter().map(|name| LocalObjectReference { name: name.clone() }).collect()
        }),
        volumes: Some(std::iter::once(tmp).chain(data).collect()),
        // A fresh volume is root's: fsGroup gives it to the worker's group,
        // or the worker, not root, could not write its results there.
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            fs_group: Some(WORKER_UID),
            // Ownership is set once, not on every mount of a large volume.
            fs_group_change_policy: Some("OnRootMismatch".into()),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let parallelism = parallelism_for(pending, resources);
    let mut own_labels = job_labels.clone();
    own_labels.insert(GENERATION_LABEL.to_string(), generation.to_string());
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(format!("qsweep-{}-{generation}", dns_label(sweep, 40))),
            namespace: Some(options.namespace.clone()),
            labels: Some(own_labels),
            ..Default::default()
        },
        spec: Some(JobSpec {
            parallelism: Some(parallelism),
            backoff_limit: Some(BACKOFF_LIMIT),
            ttl_seconds_after_finished: Some(TTL_AFTER_FINISHED_S),
            pod_failure_policy: Some(PodFailurePolicy {
                rules: vec![
                    // Evictions and preemptions are not the task's fault.
                    PodFailurePolicyRule {
                        action: "Ignore".into(),
                        on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                            type_: "DisruptionTarget".into(),
                            status: "True".into(),
                        }]),
                        on_exit_codes: None,
                    },
                    // A configuration error repeats in every pod: stop at once.
                    PodFailurePolicyRule {
                        action: "FailJob".into(),
                        on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                            container_name: Some("worker".into()),
                            operator: "In".into(),
                            values: vec![CONFIGURATION_ERROR_EXIT],
                        }),
                        on_pod_conditions: None,
                    },
                ],
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(job_labels), ..Default::default() }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The Job as `kubectl --dry-run=client -o yaml` would print it.
pub fn to_yaml(job: &Job) -> String {
    serde_yaml_ng::to_string(job).expect("a Job serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_must_pin_a_build() {
        assert!(check_image("ghcr.io/acme/qsweep:0.1.0").is_ok());
        assert!(check_image("registry:5000/qsweep@sha256:abc").is_ok());
        assert_eq!(
            check_image("registry:5000/qsweep"),
            Err(K8sError::UntaggedImage { image: "registry:5000/qsweep".into() })
        );
        assert!(check_image("qsweep").is_err());
    }

    #[test]
    fn names_and_labels_are_valid_kubernetes_names() {
        assert_eq!(dns_label("Fashion_ResNet.v2", 63), "fashion-resnet-v2");
        assert_eq!(labels("x")["qsweep.io/sweep"], "x");
    }
}
