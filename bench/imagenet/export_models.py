"""Exports torchvision's ResNet-18 and ResNet-50 (seeded random weights,
which change neither speed nor the work of decoding the images) for the
ImageNet-scale benchmark: 1x3x224x224 with a dynamic batch axis, opset 13,
eval mode, as OUT_DIR/resnet18.onnx and OUT_DIR/resnet50.onnx.

usage: export_models.py OUT_DIR     (Debian's python3-torchvision is enough)

bench/export_resnet18.py is not reused: it exports ResNet-18 only, at
opset 17, and passes dynamo=False, which torch 1.13's torch.onnx.export
does not accept.
"""

import os
import sys

import torch
import torchvision

out_dir = sys.argv[1]
os.makedirs(out_dir, exist_ok=True)
for name in ("resnet18", "resnet50"):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    path = os.path.join(out_dir, f"{name}.onnx")
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), path, opset_version=13,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    print(f"{path}: {os.path.getsize(path)} bytes")
