"""Writes Fashion-MNIST as an image folder in torchvision's ImageFolder
layout, with PIL: what a user's own data looks like.

Usage: /usr/bin/python3 scripts/fashion_images.py OUT [PER_CLASS]

  OUT/val/<class>/<test index>.png     the first PER_CLASS test images of
                                       each class (default 100), lossless
  OUT/train/<class>/<train index>.jpg  the first PER_CLASS training images
                                       of each class, JPEG at quality 95

File names are the images' indices in the IDX files, so a test can hold
each decoded image against the original. Needs Debian's python3-pil and
dataset-fashion-mnist (scripts/setup installs both).
"""
import gzip
import sys
from pathlib import Path

from PIL import Image

IDX = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(stem):
    for path in (IDX / f"{stem}.gz", IDX / stem):
        if path.exists():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as f:
                return f.read()
    raise SystemExit(f"{stem} not found in {IDX}: apt-get install dataset-fashion-mnist")


def write(split, prefix, out, per_class, extension, **options):
    images = read_idx(f"{prefix}-images-idx3-ubyte")[16:]
    labels = read_idx(f"{prefix}-labels-idx1-ubyte")[8:]
    written = [0] * len(CLASSES)
    for index, label in enumerate(labels):
        if written[label] >= per_class:
            continue
        folder = out / split / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = images[index * 784:(index + 1) * 784]
        Image.frombytes("L", (28, 28), pixels).save(folder / f"{index:05d}.{extension}", **options)
        written[label] += 1
        if min(written) >= per_class:
            break


def main():
    out = Path(sys.argv[1])
    per_class = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    write("val", "t10k", out, per_class, "png")
    write("train", "train", out, per_class, "jpg", quality=95)
    print(f"wrote {out}/val (PNG) and {out}/train (JPEG), {per_class} images per class each")


main()
