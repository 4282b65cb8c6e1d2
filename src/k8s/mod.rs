//! The Kubernetes backend: `qsweep run --backend k8s` runs a sweep's tasks
//! on a batch/v1 Job of `qsweep worker` pods that consume its Redis queue.
//!
//! - `job`: the Job itself, built from the spec's `resources` (also what
//!   `--dry-run` prints);
//! - `cluster`: the API connection, permission checks, Job calls, and API
//!   errors turned into what to do;
//! - `pods`: what a pod's status says went wrong;
//! - `backend`: the queue the coordinator drives, which creates, watches
//!   and scales the Job.

pub mod backend;
pub mod cluster;
pub mod job;
pub mod pods;

pub use job::{check_image, labels, to_yaml, worker_job, JobOptions, K8sError, DRAIN_SECS};
