#!/usr/bin/env bash
# The sensitivity stage's cost in fp32 forward passes (issue 14's target:
# ResNet-18 at 224 on 256 images in at most 1.2x (ops + 1) passes over
# those images).
#   qsweep: one sweep with max calibration, both fusion settings and
#   float_layers [1], so that each recipe runs a sensitivity stage on the
#   first 256 images of its validation subset; read back its manifest.json
#   elapsed_s (the whole stage: the Q/DQ rewrite of every variant, ONNX
#   Runtime opening each, its passes) and sensitivity.json's ops,
#   forward_passes and inference_s (the passes alone).
#   peer: one fp32 forward pass over the same 256 prepared images with ONNX
#   Runtime's Python API (all graph optimizations, 2 intra-op and 1 inter-op
#   threads, batches of 64, as the stage's sessions on this 2-core machine),
#   timed as the median of 3 passes after a first (cold) one, which is
#   reported too, with the session's opening.
# Inputs: torchvision's ResNet-18 (bench/export_resnet18.py, seeded random
# weights: the cost does not depend on them), seeded random uint8 images as
# a tensor file preprocessed with ImageNet's mean and std (nor on them).
# usage: bench/sensitivity_cost.sh [--smoke] [--out RESULT.json]
#   (after scripts/setup and cargo build --release; QSWEEP_RESNET18=M.onnx
#   from bench/export_resnet18.py, or Debian's python3-torch and
#   python3-torchvision, with which the script exports it itself)
#   --smoke: 16 images, on the reference model unless QSWEEP_RESNET18 is
#   set (as benches/resnet18.rs), with a line that says so. The figures mean
#   nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0 out=""
while (($#)); do
  case $1 in
    --smoke) smoke=1 ;;
    --out) out=$2; shift ;;
    *) echo "usage: bench/sensitivity_cost.sh [--smoke] [--out RESULT.json]" >&2; exit 2 ;;
  esac
  shift
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model=${QSWEEP_RESNET18:-}
if [[ -z "$model" ]]; then
  if ((smoke)); then
    # As benches/resnet18.rs: ResNet-18's 50 sessions take a minute even on
    # 16 images, and exporting it needs PyTorch, which scripts/setup does not install.
    echo "  (smoke: QSWEEP_RESNET18 is not set, so the reference model stands in for ResNet-18)" >&2
    model=$PWD/experiments/models/fashion-resnet8.onnx
  elif /usr/bin/python3 -c 'import torch, torchvision' 2>/dev/null; then
    /usr/bin/python3 bench/export_resnet18.py "$work/resnet18.onnx" 2>/dev/null
    model=$work/resnet18.onnx
  else
    echo "sensitivity_cost.sh: set QSWEEP_RESNET18 or install python3-torch and python3-torchvision" >&2
    exit 1
  fi
fi
.venv/bin/python - "$work" "$smoke" "$model" "$out" <<'PY'
import json, statistics, subprocess, sys, time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, "bench")
from qsweep_sweep import run_sweep  # noqa: E402

work, smoke, model, out = Path(sys.argv[1]), sys.argv[2] == "1", str(Path(sys.argv[3]).resolve()), sys.argv[4]
samples = 16 if smoke else 256
calibration = 16 if smoke else 64
BATCH = 64  # the stage's batch (src/stages/sensitivity.rs)
THREADS = 2

graph = onnx.load(model, load_external_data=False).graph
dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:]
classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value
grey = dims[0] == 1
rng = np.random.default_rng(0)
# The validation subset is drawn from the calibration source with the
# calibration images held out: the source holds both.
images = rng.integers(0, 256, size=(calibration + samples, *dims), dtype=np.uint8)
np.savez(work / "source.npz", images=images, labels=rng.integers(0, classes, size=len(images)).astype(np.int64))
np.savez(work / "evaluation.npz", images=images[:4], labels=np.zeros(4, np.int64))
preprocess = ({"scale": 255, "mean": [0.2860], "std": [0.3530]} if grey else
              {"scale": 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
spec = {
    "name": "sensitivity-cost",
    "model": model,
    "data": {"preprocess": preprocess, "calibration": {"tensors": str(work / "source.npz")},
             "evaluation": {"tensors": str(work / "evaluation.npz")}},
    "calibration": {"samples": calibration, "seed": 0},
    "baselines": [],
    "matrix": {"calibration": ["max"], "residual_fusion": [False, True], "float_layers": [1]},
    "sensitivity": {"samples": samples, "validation_samples": samples, "seed": 0},
    "evaluate": {"batch_sizes": [1], "warmup": 1, "iterations": 2, "threads": THREADS, "engine": "cpu"},
}
results, plan, sweep_s = run_sweep(work, spec)
artifacts = results / "artifacts"
validation = next(t["key"] for t in plan["tasks"] if t["stage"] == "prepare-data" and t["params"]["split"] == "validation")
subprocess.run([".venv/bin/python", "bench/prepared_npy.py", artifacts / validation, work / "images.npy",
                "--first", str(samples)], check=True)
scored = np.load(work / "images.npy")

# One fp32 forward pass over the same images, as the stage runs its passes.
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.intra_op_num_threads = THREADS
options.inter_op_num_threads = 1
t0 = time.perf_counter()
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
open_s = time.perf_counter() - t0
name = session.get_inputs()[0].name


def one_pass():
    t0 = time.perf_counter()
    for start in range(0, len(scored), BATCH):
        session.run(None, {name: scored[start:start + BATCH]})
    return time.perf_counter() - t0


cold_s = one_pass()
warm = [one_pass() for _ in range(3)]
pass_s = statistics.median(warm)

rows = []
for task in plan["tasks"]:
    if task["stage"] != "sensitivity":
        continue
    manifest = json.load(open(artifacts / task["key"] / "manifest.json"))
    ranking = json.load(open(artifacts / task["key"] / "sensitivity.json"))
    ops = len(ranking["ops"])
    q = task["params"]["quantizer"]
    rows.append({
        "recipe": f"{q['calibration']} {'fused' if q['residual_fusion'] else 'unfused'}",
        "samples": ranking["samples"], "ops": ops, "forward_passes": ranking["forward_passes"],
        "distinct_variants": ranking["forward_passes"] - 2,
        "stage_s": manifest["elapsed_s"], "inference_s": ranking["inference_s"], "total_s": ranking["total_s"],
        "inference_passes": ranking["inference_s"] / pass_s, "stage_passes": manifest["elapsed_s"] / pass_s,
        "allowed_passes": 1.2 * (ops + 1),
        "inference_ratio": ranking["inference_s"] / pass_s / (ops + 1),
        "stage_ratio": manifest["elapsed_s"] / pass_s / (ops + 1),
    })

print(f"Sensitivity cost on {Path(model).name}, input {dims}, {samples} images, CPU, {THREADS} threads")
print(f"one fp32 pass over the {samples} images: {pass_s:.3f} s (median of {[round(w, 3) for w in warm]}; "
      f"cold first pass {cold_s:.3f} s; session open {open_s:.3f} s)")
print(f"{'recipe':<16}{'ops':>5}{'passes':>8}{'inference s':>13}{'stage s':>9}{'inf/pass':>10}{'stage/pass':>12}"
      f"{'inf/(ops+1)':>13}{'stage/(ops+1)':>15}")
for r in rows:
    print(f"{r['recipe']:<16}{r['ops']:>5}{r['forward_passes']:>8}{r['inference_s']:>13.2f}{r['stage_s']:>9.2f}"
          f"{r['inference_passes']:>10.2f}{r['stage_passes']:>12.2f}{r['inference_ratio']:>12.3f}x"
          f"{r['stage_ratio']:>14.3f}x")
print("target: stage/(ops+1) <= 1.2x; inference alone is the stage less the Q/DQ rewrites and the ONNX Runtime"
      " session openings (graph optimization) of its variants")
print(f"qsweep whole sweep (calibrate, both sensitivity stages, builds, evaluations): {sweep_s:.2f} s")
if out:
    Path(out).write_text(json.dumps({"model": model, "input": dims, "samples": samples, "threads": THREADS,
                                     "fp32_pass_s": pass_s, "fp32_passes_s": warm, "fp32_cold_pass_s": cold_s,
                                     "fp32_session_open_s": open_s, "sweep_s": sweep_s, "rows": rows}, indent=2) + "\n")
PY
