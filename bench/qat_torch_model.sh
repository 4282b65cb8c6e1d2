#!/usr/bin/env bash
# QAT on a model qsweep did not train: bench/torch_fashion_model.py trains
# the reference architecture in PyTorch without augmentation and exports it
# with PyTorch's exporter, BatchNorm kept; then the reference sweep's
# matrix (4 methods x fusion x qat_epochs [0, 2], fp32) runs on it with the
# default QAT recipe, and bench/qat_check.py checks every QAT run against
# its PTQ start and fp32, and the validation passes' share of QAT time.
# PyTorch's own test top-1 of the model is printed beside qsweep's fp32.
# usage: bench/qat_torch_model.sh [--smoke] [WORK_DIR]
#   (after cargo build --release; needs Debian's python3-torch)
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=false
if [[ ${1:-} == --smoke ]]; then smoke=true; shift; fi
work=${1:-$(mktemp -d)}
mkdir -p "$work"
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  echo "qat_torch_model: SKIPPED: it trains its model with PyTorch (apt-get install python3-torch), which scripts/setup does not install" >&2
  exit 0
fi
if $smoke; then
  epochs=1 samples=2000 matrix='"calibration": ["mse"], "residual_fusion": [true], "qat_epochs": [0, 1]'
  qat='"samples": 256, "batch_size": 64, "validation_samples": 128'
else
  epochs=6 samples=60000 matrix='"calibration": ["max", "mse", "entropy", "percentile"], "residual_fusion": [false, true], "qat_epochs": [0, 2]'
  qat='"samples": 10000, "validation_samples": 2000'
fi
model="$work/torch-resnet8-e$epochs-s$samples.onnx"
if [[ ! -f $model ]]; then
  (cd bench && /usr/bin/python3 torch_fashion_model.py "$model" "$epochs" "$samples") | tee "$work/pytorch.txt"
fi
cat > "$work/spec.json" <<SPEC
{
  "name": "torch-qat",
  "model": "$model",
  "data": { "preprocess": { "scale": 255, "mean": [0.2860], "std": [0.3530] } },
  "calibration": { "samples": 500, "seed": 0 },
  "matrix": { $matrix },
  "qat": { $qat },
  "evaluate": { "batch_sizes": [1, 64], "warmup": 5, "iterations": 50, "threads": 2 }
}
SPEC
target/release/qsweep run "$work/spec.json" --results "$work/results"
cat "$work/pytorch.txt" 2>/dev/null || true
python3 bench/qat_check.py "$work/results"
