#!/usr/bin/env bash
# End to end on a model and files that PyTorch wrote: torchvision's
# ResNet-18 (seeded weights, 10 classes) exported by torch.onnx.export,
# evaluated on an image folder of PNGs at 224x224 (resize 256, crop 224,
# ImageNet mean and std), calibrated from a torch.save .pt, through
# `qsweep run`: PTQ with every method and both fusion settings, and QAT
# for one epoch on a small training subset read from a JPEG folder.
# usage: scripts/torchvision_check.sh [PER_CLASS]   (after scripts/setup and
#        cargo build --release; needs python3-torch and python3-torchvision)
set -euo pipefail
cd "$(dirname "$0")/.."
per_class=${1:-5}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
/usr/bin/python3 scripts/fashion_images.py "$work/images" "$per_class" >/dev/null
/usr/bin/python3 scripts/torchvision_check.py "$work" "$work/images/train" 32
cat > "$work/spec.json" <<JSON
{ "name": "torchvision-resnet18", "model": "resnet18.onnx",
  "data": {
    "preprocess": { "resize": 256, "center_crop": 224, "color": "rgb",
                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225] },
    "evaluation": { "images": "images/val" },
    "calibration": { "tensors": "calibration.pt" },
    "training": { "images": "images/train", "samples": 16 } },
  "matrix": { "calibration": ["max", "mse", "entropy", "percentile"], "residual_fusion": [false, true], "qat_epochs": [0] },
  "include": [ { "calibration": "max", "residual_fusion": true, "qat_epochs": 1 } ],
  "qat": { "batch_size": 8, "validation_samples": 16 },
  "evaluate": { "batch_sizes": [8], "warmup": 1, "iterations": 3, "threads": 2 } }
JSON
target/release/qsweep validate "$work/spec.json"
time target/release/qsweep run "$work/spec.json" --results "$work/results"
column -s, -t < "$work/results/runs.csv" | cut -c1-160
