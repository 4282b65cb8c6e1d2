"""The peer of benches/resnet18.rs: ONNX Runtime's best CPU int8 recipe on
ResNet-18 (QDQ, U8 asymmetric activations, S8 per-channel weights with
reduce_range, MinMax), on the same random calibration data, then its
latency at batch 1 and 64 with the same threads and iterations.

usage: ort_resnet18.py MODEL CALIBRATION.npy OUT.onnx THREADS ITERATIONS
"""

import json
import sys
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

model, calibration, out = sys.argv[1:4]
threads, iterations = int(sys.argv[4]), int(sys.argv[5])


class Reader(CalibrationDataReader):
    def __init__(self):
        self.images = np.load(calibration)
        self.start = 0

    def get_next(self):
        if self.start >= len(self.images):
            return None
        self.start += 8
        return {"input": self.images[self.start - 8:self.start]}


quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
session = ort.InferenceSession(out, options, providers=["CPUExecutionProvider"])
result = {}
for batch in (1, 64):
    x = np.load(calibration)[:batch]
    for _ in range(2):
        session.run(None, {"input": x})
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        session.run(None, {"input": x})
        times.append((time.perf_counter() - started) * 1e3)
    result[f"batch{batch}_p50_ms"] = float(np.percentile(times, 50))
print(json.dumps(result))
