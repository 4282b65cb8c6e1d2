"""The peer of benches/evaluate.rs: the same accuracy pass through ONNX
Runtime's own Python API, with the same model, data, batch and threads.

usage: ort_python_eval.py MODEL IMAGES.npy LABELS.npy THREADS BATCH REPEATS
prints one JSON line: {"accuracy": ..., "pass_seconds": [...]}
"""

import json
import sys
import time

import numpy as np
import onnxruntime as ort

model, images_path, labels_path = sys.argv[1:4]
threads, batch, repeats = (int(v) for v in sys.argv[4:7])
images = np.load(images_path)
labels = np.load(labels_path)

options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name


def accuracy_pass():
    correct = 0
    for start in range(0, len(images), batch):
        logits = session.run(None, {name: images[start:start + batch]})[0]
        correct += int((logits.argmax(axis=1) == labels[start:start + batch]).sum())
    return correct / len(labels)


accuracy_pass()  # warm-up, as on the Rust side
seconds = []
for _ in range(repeats):
    started = time.perf_counter()
    accuracy = accuracy_pass()
    seconds.append(time.perf_counter() - started)
print(json.dumps({"accuracy": accuracy, "pass_seconds": seconds}))
