//! The Kubernetes manifests: k8s/ and every Job qsweep prints validate
//! against the official Kubernetes OpenAPI schemas for 1.30 through 1.34
//! (kubernetes-validate from PyPI, in .venv; scripts/setup
//! --with-test-services installs it), and the Job carries what the spec
//! asks for without any credential.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde::Deserialize;

const VERSIONS: [&str; 5] = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0"];

fn validate(files: &[PathBuf]) {
    let validator = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/kubernetes-validate");
    for version in VERSIONS {
        let output = Command::new(&validator)
            .args(["--strict", "--quiet", "-k", version])
            .args(files)
            .output()
            .expect("kubernetes-validate in .venv (scripts/setup --with-test-services)");
        assert!(
            output.status.success(),
            "Kubernetes {version} rejects {files:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn every_manifest_in_k8s_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s");
    let manifests: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        // kustomization.yaml configures kustomize; it is not an API object.
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    assert!(manifests.len() >= 5, "{manifests:?}");
    validate(&manifests);
}

fn dry_run(extra: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let spec = reference_spec();
    let mut args = vec!["run", spec.to_str().unwrap(), "--backend", "k8s", "--dry-run", "--results"];
    let results = dir.path().join("results");
    args.push(results.to_str().unwrap());
    args.extend_from_slice(extra);
    qsweep(&args)
}

#[test]
fn the_dry_run_job_validates_and_carries_the_spec_resources() {
    let output = dry_run(&["--namespace", "gpu-team", "--image", "registry.example/qsweep:0.1.0"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let yaml = stdout(&output);
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "job.yaml", &yaml);
    validate(&[file]);

    let job: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(job["kind"], "Job");
    assert_eq!(job["metadata"]["namespace"], "gpu-team");
    for labels in [&job["metadata"]["labels"], &job["spec"]["template"]["metadata"]["labels"]] {
        assert_eq!(labels["app.kubernetes.io/name"], "qsweep");
        assert_eq!(labels["app.kubernetes.io/component"], "worker");
        assert_eq!(labels["qsweep.io/sweep"], "fashion-resnet");
    }
    let spec = &job["spec"];
    // 21 tasks are pending; the reference spec allows 4 pods at once.
    assert_eq!(spec["parallelism"], 4);
    assert!(spec["backoffLimit"].as_i64().unwrap() > 0);
    assert!(spec["ttlSecondsAfterFinished"].as_i64().unwrap() > 0);
    let rules = spec["podFailurePolicy"]["rules"].as_array().unwrap();
    assert_eq!(rules[0]["action"], "Ignore");
    assert_eq!(rules[0]["onPodConditions"][0]["type"], "DisruptionTarget");
    assert_eq!(rules[1]["action"], "FailJob");
    assert_eq!(rules[1]["onExitCodes"]["values"][0], 2);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["serviceAccountName"], "qsweep-worker");
    assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "registry.example/qsweep:0.1.0");
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(container["resources"]["limits"]["memory"], "16Gi");
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], "qsweep-redis");
    assert_eq!(pod["volumes"][1]["persistentVolumeClaim"]["claimName"], "qsweep-data");
    // The worker (UID 65532, k8s/Dockerfile) can write the volume, and
    // only it and its /tmp.
    let security = &pod["securityContext"];
    assert_eq!(
        (&security["runAsNonRoot"], &security["runAsUser"], &security["fsGroup"]),
        (&serde_json::json!(true), &serde_json::json!(65532), &serde_json::json!(65532))
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(pod["volumes"][0], serde_json::json!({"name": "tmp", "emptyDir": {}}));
    assert_eq!(container["volumeMounts"][0]["mountPath"], "/tmp");
    assert!(!yaml.contains("redis://") && !yaml.to_lowercase().contains("password"), "credentials leaked:\n{yaml}");
}

#[test]
fn an_image_without_a_tag_is_refused() {
    let output = dry_run(&["--image", "registry.example/qsweep"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("has no tag or digest"), "{}", stderr(&output));
}

#[test]
fn without_dry_run_the_coordinator_needs_redis() {
    let dir = tempfile::tempdir().unwrap();
    let output = qsweep(&[
        "run",
        reference_spec().to_str().unwrap(),
        "--backend",
        "k8s",
        "--results",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--backend k8s needs a Redis URL (--redis URL, or REDIS_URL)"),
        "{}",
        stderr(&output)
    );
}

/// The Role in k8s/rbac.yaml grants exactly what the coordinator checks
/// for and uses, so neither can drift from the other.
#[test]
fn the_role_grants_exactly_what_the_coordinator_needs() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/rbac.yaml")).unwrap();
    let role = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde_yaml_ng::Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "Role")
        .expect("a Role");
    let mut granted = Vec::new();
    for rule in role["rules"].as_sequence().unwrap() {
        let strings = |field: &str| -> Vec<String> {
            rule[field].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
        };
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                for verb in strings("verbs") {
                    let (resource, subresource) = resource.split_once('/').unwrap_or((&resource, ""));
                    granted.push((verb, group.clone(), resource.to_string(), subresource.to_string()));
                }
            }
        }
    }
    let mut needed: Vec<(String, String, String, String)> = qsweep::k8s::cluster::REQUIRED_ACCESS
        .iter()
        .map(|(v, g, r, s)| (v.to_string(), g.to_string(), r.to_string(), s.to_string()))
        .collect();
    granted.sort();
    needed.sort();
    assert_eq!(granted, needed);
}
