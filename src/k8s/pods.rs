//! Reading a worker pod's status: the troubles the coordinator reacts to,
//! told apart the way the kubelet and scheduler report them.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

/// Something wrong with a worker pod that the coordinator acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodTrouble {
    /// The scheduler found no node (no GPU free, a selector nothing matches).
    Unschedulable { message: String },
    /// The kubelet gave up pulling the image for now; retrying will not fix
    /// a wrong name or missing credentials.
    ImagePull { image: String, message: String },
    /// The kubelet is pulling the image again after a failure.
    ImagePullRetrying { image: String, message: String },
    /// The kubelet cannot set the container up (a Secret or ConfigMap it
    /// names is missing, a bad mount); it retries, but only a change to
    /// the cluster or the Job can fix it.
    ContainerConfig { reason: String, message: String },
    /// The container exceeded its memory limit and was killed.
    OutOfMemory,
    /// Evicted, preempted or drained: not the task's fault.
    Disrupted { reason: String },
    /// The worker exited with an error of its own.
    Failed { exit_code: i32, message: String },
}

/// What, if anything, is wrong with `pod`.
pub fn trouble(pod: &Pod) -> Option<PodTrouble> {
    let status = pod.status.as_ref()?;
    let conditions = status.conditions.as_deref().unwrap_or_default();
    let condition = |kind: &str, state: &str| conditions.iter().find(|c| c.type_ == kind && c.status == state);

    if condition("DisruptionTarget", "True").is_some() || status.reason.as_deref() == Some("Evicted") {
        let reason = condition("DisruptionTarget", "True")
            .and_then(|c| c.reason.clone())
            .or_else(|| status.reason.clone())
            .unwrap_or_else(|| "disrupted".into());
        return Some(PodTrouble::Disrupted { reason });
    }
    let containers = status.container_statuses.as_deref().unwrap_or_default();
    if let Some(trouble) = containers.iter().find_map(container_trouble) {
        return Some(trouble);
    }
    if let Some(unscheduled) = condition("PodScheduled", "False") {
        if unscheduled.reason.as_deref() == Some("Unschedulable") {
            return Some(PodTrouble::Unschedulable { message: unscheduled.message.clone().unwrap_or_default() });
        }
    }
    None
}

fn container_trouble(container: &ContainerStatus) -> Option<PodTrouble> {
    let state = container.state.as_ref()?;
    if let Some(waiting) = &state.waiting {
        let message = waiting.message.clone().unwrap_or_default();
        let image = container.image.clone();
        return match waiting.reason.as_deref() {
            Some("ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull") => {
                Some(PodTrouble::ImagePull { image, message })
            }
            Some("ErrImagePull") => Some(PodTrouble::ImagePullRetrying { image, message }),
            Some(reason @ ("CreateContainerConfigError" | "CreateContainerError")) => {
                Some(PodTrouble::ContainerConfig { reason: reason.to_string(), message })
            }
            _ => None,
        };
    }
    let terminated = state.terminated.as_ref()?;
    match (terminated.reason.as_deref(), terminated.exit_code) {
        (Some("OOMKilled"), _) => Some(PodTrouble::OutOfMemory),
        (_, 0) => None,
        (_, exit_code) => Some(PodTrouble::Failed {
            exit_code,
            message: terminated.message.clone().or_else(|| terminated.reason.clone()).unwrap_or_default(),
        }),
    }
}

/// Whether the pod was placed on a node (it may still be starting).
pub fn scheduled(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    conditions.iter().any(|c| c.type_ == "PodScheduled" && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "w"}, "status": status})).unwrap()
    }

    #[test]
    fn tells_the_troubles_apart() {
        let unschedulable = pod(serde_json::json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}));
        assert_eq!(
            trouble(&unschedulable),
            Some(PodTrouble::Unschedulable {
                message: "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into()
            })
        );
        assert!(!scheduled(&unschedulable));

        let backoff = pod(serde_json::json!({"phase": "Pending", "containerStatuses": [{
            "name": "worker", "image": "qsweep:nope", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"qsweep:nope\""}}}]}));
        assert!(matches!(trouble(&backoff), Some(PodTrouble::ImagePull { image, .. }) if image == "qsweep:nope"));

        let no_secret = pod(serde_json::json!({"phase": "Pending", "containerStatuses": [{
            "name": "worker", "image": "i:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "CreateContainerConfigError", "message": "secret \"qsweep-redis\" not found"}}}]}));
        assert_eq!(
            trouble(&no_secret),
            Some(PodTrouble::ContainerConfig {
                reason: "CreateContainerConfigError".into(),
                message: "secret \"qsweep-redis\" not found".into()
            })
        );

        let oom = pod(serde_json::json!({"phase": "Failed", "containerStatuses": [{
            "name": "worker", "image": "i:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}));
        assert_eq!(trouble(&oom), Some(PodTrouble::OutOfMemory));

        // An evicted pod's container is killed too, but the eviction is what counts.
        let evicted = pod(serde_json::json!({"phase": "Failed", "reason": "Evicted",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}],
            "containerStatuses": [{"name": "worker", "image": "i:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}]}));
        assert_eq!(trouble(&evicted), Some(PodTrouble::Disrupted { reason: "TerminationByKubelet".into() }));

        let succeeded = pod(serde_json::json!({"phase": "Succeeded", "containerStatuses": [{
            "name": "worker", "image": "i:1", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}));
        assert_eq!(trouble(&succeeded), None);
    }
}
