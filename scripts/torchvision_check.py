"""Prepares the end-to-end check of scripts/torchvision_check.sh with
PyTorch's own tools: exports torchvision's ResNet-18 (seeded weights, a
10-class head) with torch.onnx.export, and writes a calibration .pt with
torch.save of images that torchvision's transforms preprocessed from the
training folder. Needs Debian's python3-torch and python3-torchvision.

Usage: /usr/bin/python3 scripts/torchvision_check.py OUT_DIR TRAIN_FOLDER SAMPLES
"""
import sys
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

out, train, samples = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
torch.onnx.export(model, torch.zeros(1, 3, 224, 224), out / "resnet18.onnx", opset_version=17,
                  input_names=["input"], output_names=["logits"],
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
preprocess = transforms.Compose([
    transforms.Grayscale(3), transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])
folder = torchvision.datasets.ImageFolder(train, transform=preprocess)
picked = torch.randperm(len(folder), generator=torch.Generator().manual_seed(0))[:samples]
pairs = [folder[int(i)] for i in picked]
torch.save({"images": torch.stack([x for x, _ in pairs]), "labels": torch.tensor([y for _, y in pairs])},
           out / "calibration.pt")
