"""fp32 top-1 and end-to-end speed of the Python route qsweep replaces:
torchvision's ImageNet evaluation pipeline (imagenet_loader.py, the same
DataLoader that dataloader_throughput.py times alone) feeding ONNX
Runtime's Python API, session set up as in bench/ort_python_eval.py.

usage: ort_dataloader_eval.py MODEL FOLDER [--batch 64] [--threads 2] [--workers 2] [--limit N]
Needs the peer's Python, .venv-torchvision (see BENCHMARKS.md). Labels
are ImageFolder's: the sorted class folders' indices, which for
make_folder.py's n00000000..n00000999 are the model's output indices.
One untimed warm-up run on zeros; seconds then runs from asking for the
first batch to the last result, so it includes starting the workers and
whatever decoding the workers could not hide behind inference. Prints one
JSON line.
"""

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

from imagenet_loader import add_arguments, data_loader
from ort_session import cpu_session

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model")
add_arguments(parser)
parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime's intra_op_num_threads")
args = parser.parse_args()

session = cpu_session(args.model, args.threads)
name = session.get_inputs()[0].name
session.run(None, {name: np.zeros((args.batch, 3, 224, 224), np.float32)})

loader = data_loader(args)
images = correct = 0
started = time.perf_counter()
for batch, labels in loader:
    logits = session.run(None, {name: batch.numpy()})[0]
    correct += int((logits.argmax(axis=1) == labels.numpy()).sum())
    images += len(labels)
seconds = time.perf_counter() - started
print(json.dumps({"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1),
                  "top1": correct / images, "batch": args.batch, "threads": args.threads, "workers": args.workers,
                  "onnxruntime": ort.__version__}))
