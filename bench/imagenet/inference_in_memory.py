"""A model's pure inference time: ONNX Runtime's Python API over images
already in memory, batch by batch, with nothing else in the loop; the
floor that evaluation from qsweep's shards is measured against.

usage: inference_in_memory.py MODEL IMAGES.npy [--batch 64] [--threads 2]
Session set up as in ort_dataloader_eval.py; one untimed warm-up batch.
Prints one JSON line.
"""

import argparse
import json
import time

import numpy as np

from ort_session import cpu_session

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model")
parser.add_argument("images")
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()

session = cpu_session(args.model, args.threads)
name = session.get_inputs()[0].name
images = np.load(args.images)
session.run(None, {name: images[:args.batch]})
started = time.perf_counter()
for start in range(0, len(images), args.batch):
    session.run(None, {name: images[start:start + args.batch]})
seconds = time.perf_counter() - started
print(json.dumps({"images": len(images), "seconds": round(seconds, 3), "images_per_s": round(len(images) / seconds, 1),
                  "batch": args.batch, "threads": args.threads}))
