"""The NNCF half of the accuracy-budget benchmark (issue 14).

qsweep's `float_layers: "auto"` with `accuracy_budget` puts quantized ops
back to float, most sensitive first, until validation top-1 is within the
budget of fp32. The obvious peer is NNCF's
`nncf.quantize_with_accuracy_control`: it quantizes the same ONNX model,
ranks its quantizer groups by what removing each buys on the validation
set, and removes them greedily until the absolute drop is within
`max_drop`. This script runs it on the caller's model, calibration set,
validation set and budget, and measures what a side-by-side needs:

- wall time of the call, which includes NNCF's own PTQ, its validation of
  the fp32 model (it always does one) and of the int8 model, the ranking
  and every re-validation; also that total less the fp32 validation, and
  the time before the first validation (about the PTQ alone);
- the Conv/Gemm/MatMul nodes left in float: a node counts as float when
  its weight or its activation input does not come from a
  DequantizeLinear (directly or through Flatten, Reshape and other ops
  that only move values); this structural count is what the qsweep half
  can apply to its own model. NNCF's own log of the operations it
  reverted, which also counts the Add nodes it quantizes, is kept beside
  it;
- fp32 and int8 top-1 on the validation set and on a test set that NNCF
  never sees, computed here with ONNX Runtime (CPU, 2 intra-op threads,
  1 inter-op thread, all graph optimizations), for the returned model and
  for NNCF's fully quantized model before any reversion (the baseline,
  which NNCF saves when given an intermediate_model_dir);
- whether the budget was met, by these counts.

Inputs are .npy files: float32 NCHW images already preprocessed, and
int64 labels. The budget is in top-1 points; NNCF's `max_drop` with
DropType.ABSOLUTE is in the units the validation function returns, here
a fraction, so 0.3 points is passed as 0.003 (plus 1e-9, so that a drop of
exactly the budget passes despite float rounding, as NNCF's `<=` means).

NNCF's quantization is its own, not qsweep's: preset PERFORMANCE
(symmetric int8 weights per output channel, symmetric activations, signed
or unsigned by the activation's sign), weight ranges from min/max,
activation ranges as the mean over calibration images of each image's
min/max, fast bias correction on nodes that have a bias. qsweep's runs
calibrate with entropy. The scheme found in the baseline model is
recorded in the result.

usage:
  accuracy_control_nncf.py --model M.onnx --calibration CAL.npy \
      --validation VAL.npy VAL_LABELS.npy --test TEST.npy TEST_LABELS.npy \
      --budget 0.3 --out result.json
  accuracy_control_nncf.py --write-fashion DIR [--smoke]
      writes the Fashion-MNIST trial sets (training images shuffled with
      seed 0: 500 calibration, the next 1,000 validation; the 10,000 test
      images) from /usr/share/datasets/fashion-mnist (scripts/setup installs it)
  accuracy_control_nncf.py --smoke [--out result.json]
      the same code paths on the reference model with 64 calibration, 128
      validation and 256 test images (or the first that many of the files
      given); figures mean nothing. Without nncf it says so and exits 0.

Needs nncf, onnx and onnxruntime (pip install nncf==3.4.0 onnx==1.23.2
onnxruntime==1.31.1); the ONNX backend does not need torch.
"""

import argparse
import gzip
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_MODEL = ROOT / "experiments/models/fashion-resnet8.onnx"
FASHION_IDX = Path("/usr/share/datasets/fashion-mnist")  # dataset-fashion-mnist, which scripts/setup installs
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FULL_SIZES = {"calibration": 500, "validation": 1000, "test": 10000}
SMOKE_SIZES = {"calibration": 64, "validation": 128, "test": 256}
BATCH = 64
THREADS = 2
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
VALUE_PRESERVING = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")
INSTALL = "pip install nncf==3.4.0 onnx==1.23.2 onnxruntime==1.31.1"


def read_idx(path):
    """An IDX file (optionally gzipped) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_sets(sizes, idx_dir=FASHION_IDX):
    """Calibration, validation and test sets from Fashion-MNIST, preprocessed to NCHW float32."""
    def load(prefix):
        images = read_idx(f"{idx_dir}/{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(f"{idx_dir}/{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        images = ((images.astype(np.float32) / 255 - FASHION_MEAN) / FASHION_STD)[:, None]
        return images.astype(np.float32), labels

    train_images, train_labels = load("train")
    test_images, test_labels = load("t10k")
    order = np.random.default_rng(0).permutation(len(train_images))
    cal = order[:sizes["calibration"]]
    val = order[sizes["calibration"]:sizes["calibration"] + sizes["validation"]]
    return {
        "calibration": (train_images[cal], train_labels[cal]),
        "validation": (train_images[val], train_labels[val]),
        "test": (test_images[:sizes["test"]], test_labels[:sizes["test"]]),
    }


def session(model):
    """An ONNX Runtime CPU session on a path or a ModelProto, as every measurement here uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def correct(model, images, labels):
    """Per-image top-1 hits (bool array) of a model on images, in batches of BATCH."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    hits = []
    for start in range(0, len(images), BATCH):
        logits = sess.run(None, {name: images[start:start + BATCH]})[0]
        hits.append(logits.argmax(axis=1) == labels[start:start + BATCH])
    return np.concatenate(hits)


def top1(hits):
    return round(100.0 * float(hits.mean()), 4)


def quantization_state(model):
    """Each Conv/Gemm/MatMul node with the inputs it reads in float.

    An input is quantized when a DequantizeLinear produces it, directly or
    through ops that only move values (Flatten, Reshape, ...): NNCF puts the
    Gemm's activation quantizer before the Flatten that feeds it. The
    weight is the input that leads (directly, or through DequantizeLinear
    and QuantizeLinear) to an initializer or Constant; every other one is
    an activation. Returns (float_ops, quantized_ops): float_ops is a list
    of {name, op_type, float_inputs}, quantized_ops a list of names.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}

    def is_constant(tensor):
        while tensor not in constants:
            node = producers.get(tensor)
            if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
                return False
            tensor = node.input[0]
        return True

    float_ops, quantized_ops = [], []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        unquantized = []
        for tensor in node.input[:2]:
            producer = producers.get(tensor)
            while producer is not None and producer.op_type in VALUE_PRESERVING:
                producer = producers.get(producer.input[0])
            if producer is None or producer.op_type != "DequantizeLinear":
                unquantized.append("weight" if is_constant(tensor) else "activation")
        if unquantized:
            float_ops.append({"name": node.name, "op_type": node.op_type, "float_inputs": unquantized})
        else:
            quantized_ops.append(node.name)
    return float_ops, quantized_ops


def quantization_scheme(model):
    """What NNCF's quantizers look like in a QDQ model: zero-point types, symmetry, per-channel weights."""
    from onnx import numpy_helper

    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    weights, activations = set(), set()
    per_channel_weights = symmetric = True
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        zero_point = inits.get(node.input[2]) if len(node.input) > 2 else None
        dtype = str(zero_point.dtype) if zero_point is not None else "uint8 (default)"
        if zero_point is not None and np.any(zero_point != 0):
            symmetric = False
        is_weight = node.input[0] in inits or (node.input[0] in producers and producers[node.input[0]].op_type == "Constant")
        if is_weight:
            weights.add(dtype)
            if inits[node.input[1]].size <= 1:
                per_channel_weights = False
        else:
            activations.add(dtype)
    return {
        "weight_zero_point_types": sorted(weights),
        "activation_zero_point_types": sorted(activations),
        "all_zero_points_zero": symmetric,
        "weights_per_channel": per_channel_weights,
    }


class LogLines(logging.Handler):
    """Keeps NNCF's log messages: it reports what it reverted only there."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def nncf_reverted(lines):
    """NNCF's own account of what it reverted, from its closing log line, if it wrote one."""
    for line in reversed(lines):
        match = re.match(r"(\d+) out of (\d+) were reverted back to the floating-point precision:", line)
        if match:
            names = [part.strip() for part in line.splitlines()[1:] if part.strip()]
            return {"reverted": int(match[1]), "quantized_operations": int(match[2]), "operations": names}
    return None


def run_nncf(model_path, sets, budget, args, work):
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import (AdvancedAccuracyRestorerParameters,
                                                       AdvancedQuantizationParameters)

    model = onnx.load(model_path)
    input_name = model.graph.input[0].name
    cal_images = sets["calibration"][0]
    val_images, val_labels = sets["validation"]

    # NNCF runs its calibration through its own ONNXEngine, which builds its
    # sessions with default options; give them the same thread counts as
    # every other session here.
    import nncf.onnx.engine as nncf_engine
    import onnxruntime as ort

    class Runtime:
        InferenceSession = ort.InferenceSession

        @staticmethod
        def SessionOptions():
            options = ort.SessionOptions()
            options.intra_op_num_threads = THREADS
            options.inter_op_num_threads = 1
            return options

    nncf_engine.rt = Runtime

    # One data item per image, so that subset_size counts images and the
    # per-item values NNCF ranks with are per-image hits. The items are
    # indices; the transform turns one into the model's input.
    calibration = nncf.Dataset(range(len(cal_images)), lambda i: {input_name: cal_images[i:i + 1]})
    validation = nncf.Dataset(range(len(val_images)), lambda i: {input_name: val_images[i:i + 1]})

    calls = []

    def validate(candidate, items):
        """NNCF calls this with an onnx.ModelProto and an iterable of validation items."""
        started = time.perf_counter()
        indices = np.fromiter(items, dtype=np.int64)
        hits = correct(candidate, val_images[indices], val_labels[indices]).astype(np.float64)
        calls.append({"fp32": candidate is model, "items": int(len(indices)),
                      "start": started, "seconds": time.perf_counter() - started})
        return float(hits.mean()), hits.tolist()

    max_drop = budget / 100.0 + 1e-9
    restorer = AdvancedAccuracyRestorerParameters(intermediate_model_dir=str(work))
    if args.ranking_subset_size is not None:
        restorer.ranking_subset_size = args.ranking_subset_size
    quantization = AdvancedQuantizationParameters(disable_bias_correction=args.no_bias_correction)
    preset = None if args.preset == "default" else getattr(nncf.QuantizationPreset, args.preset.upper())

    log = LogLines()
    logging.getLogger("nncf").addHandler(log)
    started = time.perf_counter()
    result = nncf.quantize_with_accuracy_control(
        model,
        calibration_dataset=calibration,
        validation_dataset=validation,
        validation_fn=validate,
        max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        preset=preset,
        subset_size=len(cal_images),
        advanced_quantization_parameters=quantization,
        advanced_accuracy_restorer_parameters=restorer,
    )
    seconds = time.perf_counter() - started
    logging.getLogger("nncf").removeHandler(log)

    fp32_validation = sum(c["seconds"] for c in calls if c["fp32"])
    full = [c for c in calls if c["items"] == len(val_images) and not c["fp32"]]
    timing = {
        "seconds_total": seconds,
        "seconds_without_fp32_validation": seconds - fp32_validation,
        "seconds_fp32_validation": fp32_validation,
        "seconds_before_first_validation": (calls[0]["start"] - started) if calls else seconds,
        "validation_fn_calls": len(calls),
        "full_int8_validations": len(full),
        "seconds_in_validation_fn": sum(c["seconds"] for c in calls),
    }
    baseline = onnx.load(f"{work}/intermediate_model.onnx")
    return result, baseline, timing, log.lines, max_drop


def measure(model_path, sets, budget, args):
    import nncf
    import onnx

    with tempfile.TemporaryDirectory() as work:
        result, baseline, timing, lines, max_drop = run_nncf(model_path, sets, budget, args, work)
    if args.keep_models:
        os.makedirs(args.keep_models, exist_ok=True)
        onnx.save(result, f"{args.keep_models}/nncf_accuracy_control.onnx")
        onnx.save(baseline, f"{args.keep_models}/nncf_baseline_int8.onnx")

    evaluated = {}
    for split in ("validation", "test"):
        images, labels = sets[split]
        evaluated[split] = {name: correct(m, images, labels)
                            for name, m in (("fp32", model_path), ("int8", result), ("baseline_int8", baseline))}
    val = evaluated["validation"]
    drop_images = int(val["fp32"].sum()) - int(val["int8"].sum())
    float_ops, quantized_ops = quantization_state(result)
    baseline_float_ops, _ = quantization_state(baseline)
    return {
        "tool": "nncf.quantize_with_accuracy_control",
        "nncf_version": nncf.__version__,
        "onnxruntime_version": __import__("onnxruntime").__version__,
        "onnx_version": onnx.__version__,
        "model": str(model_path),
        "sizes": {split: int(len(sets[split][0])) for split in sets},
        "budget_points": budget,
        "max_drop": max_drop,
        "drop_type": "ABSOLUTE",
        "preset": args.preset,
        "subset_size": int(len(sets["calibration"][0])),
        "ranking_subset_size": args.ranking_subset_size or int(len(sets["calibration"][0])),
        "bias_correction": not args.no_bias_correction,
        "quantization_scheme": quantization_scheme(baseline),
        "float_ops": float_ops,
        "float_op_count": len(float_ops),
        "quantized_ops": quantized_ops,
        "baseline_float_ops": baseline_float_ops,
        "nncf_reported": nncf_reverted(lines),
        **timing,
        "top1": {split: {name: top1(hits) for name, hits in evaluated[split].items()} for split in evaluated},
        "validation_drop_points": 100.0 * drop_images / len(val["fp32"]),
        "budget_met": 100.0 * drop_images / len(val["fp32"]) <= budget + 1e-9,
        "threads": {"intra_op": THREADS, "inter_op": 1},
        "nncf_log": lines,
    }


def load_sets(args, sizes):
    """The three sets from the files given, each cut to sizes[split] when sizes is given."""
    def load(path, split, dtype):
        array = np.load(path).astype(dtype)
        return array[:sizes[split]] if sizes else array

    return {
        "calibration": (load(args.calibration, "calibration", np.float32), None),
        "validation": (load(args.validation[0], "validation", np.float32),
                       load(args.validation[1], "validation", np.int64)),
        "test": (load(args.test[0], "test", np.float32), load(args.test[1], "test", np.int64)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--calibration", metavar="IMAGES.npy")
    parser.add_argument("--validation", nargs=2, metavar=("IMAGES.npy", "LABELS.npy"))
    parser.add_argument("--test", nargs=2, metavar=("IMAGES.npy", "LABELS.npy"))
    parser.add_argument("--budget", type=float, help="top-1 points of validation drop allowed")
    parser.add_argument("--out", help="result JSON (default: stdout)")
    parser.add_argument("--preset", choices=["default", "performance", "mixed"], default="default",
                        help="NNCF's preset; default lets NNCF choose (performance for CNNs)")
    parser.add_argument("--ranking-subset-size", type=int,
                        help="validation images NNCF ranks on (NNCF's default: subset_size)")
    parser.add_argument("--no-bias-correction", action="store_true",
                        help="disable NNCF's fast bias correction (closer to qsweep's PTQ)")
    parser.add_argument("--keep-models", metavar="DIR", help="save the returned and baseline models here")
    parser.add_argument("--write-fashion", metavar="DIR", help="write the Fashion-MNIST trial sets and exit")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()

    if args.write_fashion:
        os.makedirs(args.write_fashion, exist_ok=True)
        for split, (images, labels) in fashion_sets(SMOKE_SIZES if args.smoke else FULL_SIZES).items():
            np.save(f"{args.write_fashion}/{split}.npy", images)
            np.save(f"{args.write_fashion}/{split}_labels.npy", labels)
        return

    os.environ.setdefault("NNCF_CI", "1")  # NNCF's switch for its usage telemetry
    try:
        import nncf  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        if args.smoke:
            print(f"== SKIPPED bench/accuracy_control_nncf.py --smoke: {error.name} is not installed "
                  f"({INSTALL})", file=sys.stderr)
            return
        raise SystemExit(f"accuracy_control_nncf.py: {error}; {INSTALL}")

    if args.smoke:
        model = args.model or REFERENCE_MODEL
        sets = load_sets(args, SMOKE_SIZES) if args.calibration else fashion_sets(SMOKE_SIZES)
        budget = 0.3 if args.budget is None else args.budget
    else:
        missing = [flag for flag in ("model", "calibration", "validation", "test", "budget")
                   if getattr(args, flag) is None]
        if missing:
            parser.error("needs " + ", ".join(f"--{flag}" for flag in missing) + " (or --smoke)")
        model, sets, budget = args.model, load_sets(args, None), args.budget

    result = measure(model, sets, budget, args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    summary = {k: result[k] for k in ("float_op_count", "seconds_total", "budget_met")}
    summary["top1"] = result["top1"]
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
