"""Writes a synthetic ImageNet-like image folder, so that decoding, resizing
and batching can be timed at ImageNet's scale (1000 classes, ~500x375
JPEGs) without the real data set. Constant-colour images would make JPEG
decoding unrealistically cheap, so each image is a random crop, rotation,
flip and colour jitter of one of skimage.data's photographs, blended with
noise. The labels mean nothing: this measures speed, not accuracy.

usage: make_folder.py OUT_DIR [--classes 1000] --images N [--seed 0]
Writes OUT_DIR/n00000000/<i>.JPEG ... : image i goes to class i % classes
(round-robin) and depends only on (seed, i), so a seed gives the same bytes
whatever the process count. Needs python3-skimage (apt-get install -y
python3-skimage) next to Debian's python3-pil and python3-numpy.
"""

import argparse
import multiprocessing
import os
import time

import numpy as np
from PIL import Image, ImageEnhance

# Photographs only (no logos or text pages); grey ones are used as grey RGB.
SOURCES = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
           "retina", "stereo_motorcycle", "camera", "coins", "moon", "clock", "grass", "gravel", "brick", "cell"]
photos = []  # filled per worker by load_photos


def load_photos():
    import skimage.data
    for name in SOURCES:
        array = getattr(skimage.data, name)()
        array = array[0] if isinstance(array, tuple) else array  # stereo_motorcycle: (left, right, disparity)
        photos.append(Image.fromarray(array).convert("RGB"))


def make_image(seed, index):
    rng = np.random.default_rng([seed, index])
    photo = photos[rng.integers(len(photos))]
    # Output size: ImageNet's typical 500x375, +-10%, a quarter portrait.
    width, height = (int(v * rng.uniform(0.9, 1.1)) for v in (500, 375))
    if rng.random() < 0.25:
        width, height = height, width
    # A random crop of 30-70% of the photo's width at the output's aspect
    # ratio, rotated by up to 15 degrees: rotate a region 1.35x larger, then
    # resize from its centre, so that no blank corner shows.
    crop_w = rng.uniform(0.3, 0.7) * photo.width
    crop_h = min(crop_w * height / width, photo.height / 1.35)
    crop_w = crop_h * width / height
    outer_w, outer_h = int(crop_w * 1.35), int(crop_h * 1.35)
    left, top = rng.integers(photo.width - outer_w + 1), rng.integers(photo.height - outer_h + 1)
    region = photo.crop((left, top, left + outer_w, top + outer_h)).rotate(rng.uniform(-15, 15), Image.BILINEAR)
    dx, dy = (outer_w - crop_w) / 2, (outer_h - crop_h) / 2
    image = region.resize((width, height), Image.BILINEAR, box=(dx, dy, dx + crop_w, dy + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.6, 1.4))
    # Noise: per-pixel (uniform: 4x cheaper than Gaussian), a smooth
    # brightness field and a colour tint.
    pixels = np.asarray(image, dtype=np.float32)
    pixels += (rng.random(pixels.shape, dtype=np.float32) - 0.5) * rng.uniform(5, 60)
    shade = Image.fromarray(rng.uniform(-40, 40, (4, 4)).astype(np.float32)).resize((width, height), Image.BICUBIC)
    pixels += np.asarray(shade)[..., None] + rng.uniform(-20, 20, 3).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write(job):
    out_dir, classes, seed, index = job
    path = os.path.join(out_dir, f"n{index % classes:08d}", f"{index}.JPEG")
    make_image(seed, index).save(path, "JPEG", quality=90)
    return os.path.getsize(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    if args.images < args.classes:
        parser.error("--images must be at least --classes: torchvision's ImageFolder rejects empty class folders")
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        parser.error(f"{args.out_dir} is not empty")
    for label in range(args.classes):
        os.makedirs(os.path.join(args.out_dir, f"n{label:08d}"))
    started = time.perf_counter()
    jobs = ((args.out_dir, args.classes, args.seed, index) for index in range(args.images))
    with multiprocessing.Pool(args.processes, initializer=load_photos) as pool:
        total = sum(pool.imap_unordered(write, jobs, chunksize=16))
    seconds = time.perf_counter() - started
    print(f"{args.images} images, {total} bytes ({total / 2**20:.1f} MiB) in {args.classes} classes, "
          f"{seconds:.1f} s ({args.images / seconds:.0f} images/s, {args.processes} processes)")


if __name__ == "__main__":
    main()
