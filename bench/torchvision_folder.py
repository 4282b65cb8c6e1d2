"""The peer for qsweep's fp32 top-1 on an image folder: torchvision's
ImageFolder and transforms over PIL, run by ONNX Runtime's Python API.

Usage: python torchvision_folder.py MODEL.onnx FOLDER CLASSES_JSON PREPROCESS_JSON

PREPROCESS_JSON is the spec's data.preprocess (resize, center_crop,
interpolation, color, scale, mean, std), CLASSES_JSON the class names in
the model's index order. Prints one JSON line: images, top1.
Needs a Python with Debian's python3-torchvision and the onnxruntime
wheel (see BENCHMARKS.md for the command that makes one).
"""
import json
import sys

import numpy as np
import onnxruntime as ort
import torch
from torchvision import datasets, transforms

model, folder, classes, preprocess = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
modes = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC,
         "nearest": transforms.InterpolationMode.NEAREST}
steps = []
if "resize" in preprocess:
    size = preprocess["resize"]
    steps.append(transforms.Resize(size if isinstance(size, int) else tuple(size),
                                   interpolation=modes[preprocess.get("interpolation", "bilinear")]))
if "center_crop" in preprocess:
    crop = preprocess["center_crop"]
    steps.append(transforms.CenterCrop(crop if isinstance(crop, int) else tuple(crop)))
scale = preprocess.get("scale", 255)
steps += [transforms.PILToTensor(), transforms.Lambda(lambda t: t.float() / scale),
          transforms.Normalize(preprocess.get("mean", [0.0]), preprocess.get("std", [1.0]))]
color = {"grey": "L", "rgb": "RGB", "bgr": "RGB"}[preprocess.get("color", "rgb")]


def loader(path):
    from PIL import Image
    with open(path, "rb") as f:
        image = Image.open(f).convert(color)
    if preprocess.get("color") == "bgr":
        r, g, b = image.split()
        image = Image.merge("RGB", (b, g, r))
    return image


dataset = datasets.ImageFolder(folder, transform=transforms.Compose(steps), loader=loader)
# The spec's class list fixes the indices: map ImageFolder's sorted ones to it.
to_model = torch.tensor([classes.index(name) for name in dataset.classes])
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
correct = 0
for start in range(0, len(dataset), 64):
    batch = [dataset[i] for i in range(start, min(start + 64, len(dataset)))]
    images = torch.stack([image for image, _ in batch]).numpy()
    labels = to_model[torch.tensor([label for _, label in batch])].numpy()
    logits = session.run(None, {name: images})[0]
    correct += int((np.argmax(logits, axis=1) == labels).sum())
print(json.dumps({"images": len(dataset), "top1": correct / len(dataset), "torchvision": __import__("torchvision").__version__}))
