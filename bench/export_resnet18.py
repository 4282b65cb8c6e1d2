"""Exports torchvision's ResNet-18 (seeded random weights, which do not
change its speed) at 224x224 with a dynamic batch axis, for
benches/resnet18.rs. Debian's python3-torch and python3-torchvision are
enough:  python3 bench/export_resnet18.py OUT.onnx
"""

import inspect
import sys

import torch
import torchvision

# torch 2.5+ defaults to the dynamo exporter; 1.13 (Debian's) has only the
# TorchScript one and no `dynamo` argument.
legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()
torch.onnx.export(model, torch.zeros(1, 3, 224, 224), sys.argv[1], opset_version=17,
                  input_names=["input"], output_names=["logits"],
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                  training=torch.onnx.TrainingMode.PRESERVE, **legacy)
