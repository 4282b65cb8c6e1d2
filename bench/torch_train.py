"""The PyTorch peer of benches/train.rs: trains the reference resnet-8
architecture (stem conv, three basic blocks of 16, 32, 64 channels, BatchNorm
in training mode) on random Fashion-MNIST-shaped batches with SGD, and
prints images per second over the timed steps.

    python3 bench/torch_train.py BATCH STEPS THREADS
    python3 bench/torch_train.py conv RUNS     (the convolution layer alone)
"""

import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


def resnet8():
    """The reference architecture, as PyTorch modules."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def conv_layer(runs):
    """Forward, and forward+backward, of batch 128, 48 channels, 14x14, 3x3."""
    x = torch.randn(128, 48, 14, 14, requires_grad=True)
    conv = nn.Conv2d(48, 48, 3, 1, 1, bias=False)

    def timed(fn):
        fn()
        start = time.perf_counter()
        for _ in range(runs):
            fn()
        return (time.perf_counter() - start) * 1000 / runs

    forward = timed(lambda: conv(x))
    both = timed(lambda: conv(x).sum().backward())
    print(f"forward {forward:.1f} ms, forward+backward {both:.1f} ms")


def main():
    if sys.argv[1] == "conv":
        torch.set_num_threads(2)
        conv_layer(int(sys.argv[2]))
        return
    batch, steps, threads = (int(v) for v in sys.argv[1:4])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet8()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(batch * steps / (time.perf_counter() - start))


if __name__ == "__main__":
    main()
