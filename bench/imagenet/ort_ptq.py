"""ONNX Runtime's own int8 route on an ImageNet-sized model, for
run.py's ResNet-50 sweep: quantize_static with the recipe that ran
fastest on CPU in benches/resnet18.rs (QDQ, U8 asymmetric activations, S8
per-channel weights with reduce_range, MinMax), then the fp32 and int8
models' speed and how often int8's top-1 is fp32's.

usage: ort_ptq.py MODEL CALIBRATION.npy TEST.npy OUT.onnx [--threads 2] [--iterations N]
CALIBRATION.npy and TEST.npy hold normalised NCHW float32 inputs (qsweep's
own prepared images, written by bench/prepared_npy.py). Latency is the
median of N batch-1 runs; throughput is images/s at batch 64. Prints one
JSON line.
"""

import argparse
import json
import resource
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

from ort_session import cpu_session

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model")
parser.add_argument("calibration")
parser.add_argument("test")
parser.add_argument("out")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--iterations", type=int, default=30)
args = parser.parse_args()


class Batches(CalibrationDataReader):
    """The calibration images, 50 at a time (ORT's calibrators want equal batches)."""

    def __init__(self, images, name):
        self.images, self.name, self.start = images, name, 0

    def get_next(self):
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start:self.start + 50]
        self.start += 50
        return {self.name: batch}


def speed(model, images):
    name = model.get_inputs()[0].name
    one = images[:1]
    for _ in range(3):
        model.run(None, {name: one})
    times = []
    for _ in range(args.iterations):
        started = time.perf_counter()
        model.run(None, {name: one})
        times.append(time.perf_counter() - started)
    batch = images[:64]
    model.run(None, {name: batch})
    started = time.perf_counter()
    model.run(None, {name: batch})
    return float(np.median(times)) * 1000, len(batch) / (time.perf_counter() - started)


def top1(model, images):
    name = model.get_inputs()[0].name
    return np.concatenate([model.run(None, {name: images[i:i + 64]})[0].argmax(axis=1)
                           for i in range(0, len(images), 64)])


fp32 = cpu_session(args.model, args.threads)
name = fp32.get_inputs()[0].name
started = time.perf_counter()
quantize_static(
    args.model, args.out, Batches(np.load(args.calibration), name),
    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
)
quantize_s = time.perf_counter() - started
quantize_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
int8 = cpu_session(args.out, args.threads)
test = np.load(args.test)
fp32_ms, fp32_ips = speed(fp32, test)
int8_ms, int8_ips = speed(int8, test)
agreement = float((top1(fp32, test) == top1(int8, test)).mean()) * 100
print(json.dumps({"recipe": "QDQ U8S8 per-channel reduce_range MinMax", "quantize_s": round(quantize_s, 1),
                  "quantize_peak_rss_mb": round(quantize_peak_mb), "fp32_b1_ms": round(fp32_ms, 2),
                  "int8_b1_ms": round(int8_ms, 2), "fp32_b64_ips": round(fp32_ips, 1),
                  "int8_b64_ips": round(int8_ips, 1), "agreement": round(agreement, 2), "images": len(test),
                  "onnxruntime": ort.__version__}))
