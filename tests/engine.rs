//! Opening sessions on execution providers with the real ONNX Runtime.

use std::path::Path;

use qsweep::engine::{EngineError, InferenceSession, Provider};

/// The CPU wheel has no CUDA or TensorRT provider: opening a session on
/// them fails by name instead of quietly running on the CPU.
#[test]
fn missing_gpu_providers_fail_instead_of_falling_back() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/models/fashion-resnet8.onnx");
    let dir = tempfile::tempdir().unwrap();
    for provider in [Provider::Cuda, Provider::TensorRt { int8: true, cache_dir: dir.path().to_path_buf() }] {
        match InferenceSession::open_with(&model, 1, None, &provider) {
            Err(EngineError::ProviderMissing { provider: name }) => assert_eq!(name, provider.name()),
            Err(other) => panic!("{}: unexpected error {other}", provider.name()),
            Ok(_) => panic!("{} opened on a machine without it", provider.name()),
        }
    }
    assert!(InferenceSession::open_with(&model, 1, None, &Provider::Cpu).is_ok());
}
