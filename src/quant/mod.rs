//! Quantization math: streaming histograms, the calibration methods that
//! turn them into amax values, and the Q/DQ rewrite of ONNX graphs.

pub mod amax;
pub mod coverage;
pub mod health;
pub mod histogram;
pub mod qdq;
