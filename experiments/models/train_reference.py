"""Trains the reference ResNet on Fashion-MNIST and exports it to ONNX.

Temporary: the QAT issue replaces this script with `qsweep train`.
Reproduce with (from the repository root):

    python3 -m venv .venv-train && .venv-train/bin/pip install torch onnx onnxscript numpy
    .venv-train/bin/python experiments/models/train_reference.py

The network is a resnet-8 for 28x28 inputs: a stem conv, then three stages of
one basic block each (16, 32, 64 channels), the last two with a strided 1x1
downsample shortcut. Every block is conv-bn-relu-conv-bn, then Add with the
block input, then relu, so residual fusion has identity and downsample
shortcuts to work on.
"""

import gzip
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion-resnet8.onnx")


def read_idx(name):
    with gzip.open(os.path.join(DATA, name), "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def normalise(images):
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - MEAN) / STD


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


class ResNet8(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def augment(batch):
    # Random 2-pixel shifts and horizontal flips: cheap and worth ~1 point.
    padded = F.pad(batch, (2, 2, 2, 2), value=-MEAN / STD)
    n = batch.shape[0]
    dx, dy = np.random.randint(0, 5, 2)
    out = padded[:, :, dy:dy + 28, dx:dx + 28]
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def main():
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(os.cpu_count())
    train_x = normalise(read_idx("train-images-idx3-ubyte.gz"))
    train_y = torch.from_numpy(read_idx("train-labels-idx1-ubyte.gz").astype(np.int64))
    test_x = normalise(read_idx("t10k-images-idx3-ubyte.gz"))
    test_y = torch.from_numpy(read_idx("t10k-labels-idx1-ubyte.gz").astype(np.int64))

    model = ResNet8()
    batch = 128
    steps = epochs * (len(train_x) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        start = time.time()
        order = torch.randperm(len(train_x))
        for i in range(len(train_x) // batch):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(augment(train_x[idx].clone())), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            correct = sum((model(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000]).sum().item()
                          for i in range(0, len(test_x), 1000))
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, "
              f"test top-1 {correct / 100:.2f}%, {time.time() - start:.0f}s", flush=True)

    model.eval()
    torch.onnx.export(model, torch.zeros(1, 1, 28, 28), OUT, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      training=torch.onnx.TrainingMode.PRESERVE, dynamo=False)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
