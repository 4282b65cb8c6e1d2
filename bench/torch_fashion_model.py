"""Trains a model the way a PyTorch user would, for QAT to start from:
the reference resnet-8 architecture (bench/torch_train.py) on Fashion-MNIST,
without augmentation, SGD with momentum 0.9 from 0.1 under a cosine decay,
weight decay 5e-4, batch 128; then exports it with PyTorch's own exporter
with BatchNorm kept (TrainingMode.PRESERVE skips the exporter's Conv+BN
folding), opset 17, dynamic batch axis, input `input`, output `logits`.

    /usr/bin/python3 bench/torch_fashion_model.py OUT.onnx [EPOCHS [SAMPLES]]

Prints the test top-1 PyTorch measures, to compare with qsweep's fp32 run.
"""

import gzip
import sys

import numpy as np
import torch
import torch.nn.functional as F

from torch_train import resnet8

DATA = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530


def split(name):
    with gzip.open(f"{DATA}/{name}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(f"{DATA}/{name}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    x = (torch.from_numpy(images.astype(np.float32)) / 255 - MEAN) / STD
    return x, torch.from_numpy(labels.astype(np.int64))


def main():
    out = sys.argv[1]
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    samples = int(sys.argv[3]) if len(sys.argv) > 3 else 60000
    torch.set_num_threads(2)
    torch.manual_seed(0)
    train_x, train_y = split("train")
    train_x, train_y = train_x[:samples], train_y[:samples]
    test_x, test_y = split("t10k")
    model = resnet8()
    steps = epochs * (len(train_x) // 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for step in range(len(train_x) // 128):
            idx = order[step * 128:(step + 1) * 128]
            opt.zero_grad()
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            loss.backward()
            opt.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: last loss {loss.item():.4f}", file=sys.stderr)
    model.eval()
    with torch.no_grad():
        correct = sum((model(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000]).sum().item()
                      for i in range(0, len(test_x), 1000))
    print(f"pytorch test top-1: {correct / len(test_x) * 100:.2f}%")
    torch.onnx.export(model, test_x[:1], out, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)


if __name__ == "__main__":
    main()
