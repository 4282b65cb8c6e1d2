//! qsweep runs int8 quantization experiments on CNN models: it expands a
//! declared sweep into runs, runs each as a chain of cached stages, and
//! reports accuracy and speed against the fp32 baseline.
//!
//! # Layout
//!
//! Modules are listed so that each uses only modules above it, except
//! that `plan` reads each stage's `VERSION` (ARCHITECTURE.md has the
//! diagram).
//!
//! - [`files`]: regular files only, and a file's identity (size, hash, time).
//! - [`spec`]: the user's JSON, its schema, and errors that point into the file.
//! - [`matrix`]: axes into runs, with include/exclude, and stable run ids.
//! - [`data`]: data sources (IDX, image folders, tensor files), PIL-exact preprocessing.
//! - [`plan`]: runs into a DAG of tasks named by content keys.
//! - [`owner`]: which process owns shared state, and whether it is gone.
//! - [`shutdown`]: SIGINT, SIGTERM and SIGHUP, handled alike by every command.
//! - [`store`]: the results directory, with atomically completed artifacts.
//! - [`artifacts`]: the object-store copy of artifacts, for workers without a shared directory.
//! - [`onnx`]: ONNX protobuf models and questions about their graphs.
//! - [`engine`]: ONNX Runtime sessions, accuracy and latency measurement.
//! - [`quant`]: histograms, calibration methods, the Q/DQ rewrite, int8 coverage.
//! - [`progress`]: the live display, or plain lines off a terminal.
//! - [`train`]: training and QAT on candle with the project's own kernels.
//! - [`sweep`]: a spec validated against its files and the available stages.
//! - [`stages`]: what each stage does with its inputs.
//! - [`init`]: a starter spec read from a user's model and data.
//! - [`worker`]: one task's attempts, timeouts and retries.
//! - [`queue`]: the `Queue` trait and the embedded in-memory queue.
//! - [`coordinator`]: walks a plan's DAG against any queue.
//! - [`redis_queue`]: the Redis queue, `qsweep worker`, status and cancel.
//! - [`k8s`]: a Kubernetes Job of workers on the Redis queue.
//! - [`report`]: runs.csv, runs.jsonl, summary.md and the accuracy/latency plot.
//! - [`launch`]: `qsweep run` from set-up to outcome, checks before the first write.

pub mod artifacts;
pub mod coordinator;
pub mod data;
pub mod engine;
pub mod files;
pub mod init;
pub mod k8s;
pub mod launch;
pub mod matrix;
pub mod onnx;
pub mod owner;
pub mod plan;
pub mod progress;
pub mod quant;
pub mod queue;
pub mod redis_queue;
pub mod report;
pub mod shutdown;

pub mod spec;
pub mod stages;
pub mod store;
pub mod sweep;
pub mod train;
pub mod worker;
