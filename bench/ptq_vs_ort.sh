#!/usr/bin/env bash
# PTQ against ONNX Runtime's quantize_static, side by side, on the reference
# model with the same 500 calibration samples (qsweep's prepare-data draw).
# Both write S8S8 QDQ models with per-channel full-range weights and
# symmetric activations (qsweep's tensorrt format), evaluated on CPU.
#   qsweep time: its one calibrate pass (shared by every method) plus the
#   method's build (amax, Q/DQ rewrite, ONNX Runtime optimization).
#   ORT time: quantize_static, which calibrates once per method.
# usage: bench/ptq_vs_ort.sh [--smoke]   (after scripts/setup and cargo build --release)
#   --smoke: the same steps with 100 calibration samples (ORT's calibrators
#   need whole batches of 50) and 2 timed runs; the figures mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=()
[[ "${1:-}" == "--smoke" ]] && smoke=(-e 's#"samples": 500,#"samples": 100,#' -e 's#"warmup": 20,#"warmup": 1,#' -e 's#"iterations": 300,#"iterations": 2,#')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "${smoke[@]}" -e 's#"models/#"'"$PWD"'/experiments/models/#' \
    -e 's#"calibration": \["max", "mse", "entropy", "percentile"\]#"calibration": ["max", "entropy", "percentile"]#' \
    -e 's#"residual_fusion": \[false, true\]#"residual_fusion": [false]#' \
    -e 's#"qat_epochs": \[0, 2\]#"qat_epochs": [0]#' -e 's#, "auto"##' -e '/"sensitivity"/d' \
    -e 's#"retries": 1,#"retries": 1, "int8_format": "tensorrt",#' \
    experiments/fashion-resnet.json > "$work/spec.json"
target/release/qsweep run "$work/spec.json" --results "$work/results" >/dev/null 2>"$work/qsweep.log" ||
  { cat "$work/qsweep.log" >&2; exit 1; }
target/release/qsweep plan "$work/spec.json" --json --results "$work/results" > "$work/plan.json"
.venv/bin/python - "$work" <<'PY'
import csv, json, os, subprocess, sys
work = sys.argv[1]
plan = json.load(open(f"{work}/plan.json"))
artifacts = f"{work}/results/artifacts"
prepare = [t for t in plan["tasks"] if t["stage"] == "prepare-data"]
calibration = next(t for t in prepare if t["params"]["split"] == "calibration")["key"]
test = next(t for t in prepare if t["params"]["split"] == "test")["key"]
rows = {r["run"]: r for r in csv.DictReader(open(f"{work}/results/runs.csv"))}
# The very inputs qsweep calibrated and evaluated on, as .npy for the peer.
for key, name in [(calibration, "calibration"), (test, "test")]:
    subprocess.run([".venv/bin/python", "bench/prepared_npy.py", f"{artifacts}/{key}", f"{work}/{name}.npy"], check=True)
model = os.path.abspath("experiments/models/fashion-resnet8.onnx")
samples = json.load(open(f"{work}/spec.json"))["calibration"]["samples"]
print(f"PTQ on the reference model, {samples} calibration samples, S8S8 QDQ per-channel, CPU")
print(f"{'method':<11}{'qsweep s':>10}{'ORT s':>9}{'speed-up':>10}{'qsweep top-1':>14}{'ORT top-1':>11}{'ORT peak RSS':>14}")
for ours, theirs in [("max", "MinMax"), ("entropy", "Entropy"), ("percentile", "Percentile")]:
    row = rows[f"{ours}-unfused-ptq"]
    qsweep_s = float(row["calibrate_s"]) + float(row["build_s"])
    peer = json.loads(subprocess.run(
        [".venv/bin/python", "bench/ort_quantize_static.py", model,
         f"{work}/calibration.npy", f"{work}/test.npy", f"{artifacts}/{test}/labels.npy",
         theirs, f"{work}/{theirs}.onnx"], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"{ours:<11}{qsweep_s:>10.3f}{peer['seconds']:>9.3f}{peer['seconds'] / qsweep_s:>9.1f}x"
          f"{float(row['accuracy']):>13.2f}%{peer['accuracy']:>10.2f}%{peer['peak_rss_mb']:>11.0f} MB")
print(f"fp32 top-1 {float(rows['fp32']['accuracy']):.2f}%; qsweep calibrate pass {float(rows['max-unfused-ptq']['calibrate_s']):.3f} s, shared by all methods")
PY
