"""The peer of bench/ptq_vs_ort.sh: ONNX Runtime's own static quantization.

usage: ort_quantize_static.py MODEL CALIBRATION.npy TEST_IMAGES.npy TEST_LABELS.npy METHOD OUT.onnx
METHOD is MinMax, Entropy or Percentile. Quantizes like qsweep's tensorrt
format (QDQ, per-channel symmetric int8 weights at full range, symmetric
int8 activations, Conv/Gemm/MatMul inputs), times quantize_static (which
includes its calibration), then measures top-1 on the test images. Prints
one JSON line with seconds, peak RSS and accuracy.
"""

import json
import resource
import sys
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

model, calibration, test_images, test_labels, method, out = sys.argv[1:7]
BATCH = 64
# ORT's histogram calibrators crash when the last batch is smaller than the
# others (500 = 7 x 64 + 52), so the peer reads batches of 50.
CALIBRATION_BATCH = 50


class Reader(CalibrationDataReader):
    def __init__(self, path, input_name):
        self.images = np.load(path)
        self.input_name = input_name
        self.start = 0

    def get_next(self):
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start:self.start + CALIBRATION_BATCH]
        self.start += CALIBRATION_BATCH
        return {self.input_name: batch}

    def rewind(self):
        self.start = 0


input_name = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0].name
started = time.perf_counter()
quantize_static(
    model, out, Reader(calibration, input_name),
    quant_format=QuantFormat.QDQ,
    op_types_to_quantize=["Conv", "Gemm", "MatMul"],
    per_channel=True,
    reduce_range=False,
    activation_type=QuantType.QInt8,
    weight_type=QuantType.QInt8,
    calibrate_method=getattr(CalibrationMethod, method),
    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": 99.99},
)
seconds = time.perf_counter() - started
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.intra_op_num_threads = 2
session = ort.InferenceSession(out, options, providers=["CPUExecutionProvider"])
images, labels = np.load(test_images), np.load(test_labels)
correct = 0
for start in range(0, len(images), BATCH):
    logits = session.run(None, {input_name: images[start:start + BATCH]})[0]
    correct += int((logits.argmax(axis=1) == labels[start:start + BATCH]).sum())
print(json.dumps({"method": method, "seconds": seconds, "peak_rss_mb": peak_mb, "accuracy": 100.0 * correct / len(labels)}))
