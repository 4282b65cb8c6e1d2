//! Training in Rust on candle: fine-tuning Q/DQ models (QAT) and training
//! the fp32 baseline.
//!
//! - `augment`: torchvision's random transforms of training images;
//! - `kernels`: convolution, pooling and fake quantization on slices;
//! - `ops`: those kernels as candle custom ops with their own backward;
//! - `network`: an ONNX graph as a differentiable computation, and back;
//! - `fit`: the training loop, checkpoints and resumption;
//! - `resnet`: the ResNets `qsweep train` writes as ONNX to start from;
//! - `baseline`: the fp32 baseline trained end to end;
//! - `command`: `qsweep train`: flags to a model file, with progress and stop signals.

pub mod augment;
pub mod baseline;
pub mod command;
pub mod fit;
pub mod kernels;
pub mod network;
pub mod ops;
pub mod resnet;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("node {node}: {what} is not supported for training\n  fix: export the model without it (training supports {})", network::SUPPORTED.join(", "))]
    Unsupported { node: String, what: String },
    #[error("the model has no parameters to train (no float weights, and no int8 weights behind a DequantizeLinear)\n  fix: give a model with Conv, Gemm or MatMul weights as initializers")]
    NothingToTrain,
    #[error("{0}")]
    Model(String),
    #[error("the loss became NaN or infinite at epoch {epoch}, step {step}{}\n  fix: lower the learning rate", match checkpoint { Some(dir) => format!("; the last good checkpoint (end of epoch {}) is kept in {}", epoch - 1, dir.display()), None => String::new() })]
    NotFinite { epoch: u32, step: usize, checkpoint: Option<std::path::PathBuf> },
    /// The training samples could not be read (a damaged shard, say).
    #[error(transparent)]
    Data(#[from] crate::data::prepared::PreparedError),
    #[error("interrupted")]
    Cancelled,
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}
