#!/usr/bin/env bash
# float_layers "auto" against NNCF's quantize_with_accuracy_control, side by
# side (issue 14): same ONNX model (the reference model), same calibration
# images, same validation subset, same budget.
#   qsweep: one sweep of entropy unfused, entropy fused and max unfused, each
#   with float_layers "auto" and sensitivity.accuracy_budget; timed as the
#   whole sweep (wall clock, evaluation of every run and fp32 included) and,
#   per recipe, as calibrate + sensitivity (their manifest.json elapsed_s)
#   + the fallback search's time to its decision (search.json search_s:
#   each step's model, validation pass and latency): the work from
#   calibration to the chosen model, the figure compared with NNCF's call.
#   The fallback stage also scores every step on the test split (test_s),
#   which NNCF does not do at all; that is shown beside it.
#   NNCF: bench/accuracy_control_nncf.py on qsweep's very images, exported
#   from the prepared artifacts (checked pixel for pixel against the IDX
#   training split at source_indices.json), timed as its one call (its own
#   PTQ with min/max statistics, its fp32 and int8 validations, ranking and
#   reversions).
# The qsweep test top-1 is the run's own figure; NNCF reports none, so its
# test top-1 here is computed by the NNCF script afterwards, with ONNX
# Runtime, on the same test images.
# usage: bench/accuracy_control.sh [--smoke] [--budget POINTS] [--out RESULT.json]
#   (after scripts/setup and cargo build --release; NNCF from NNCF_PYTHON,
#   default /work/nncf-venv/bin/python: pip install nncf==3.4.0 onnx==1.23.2
#   onnxruntime==1.31.1)
#   --smoke: 64 calibration, 128 validation (32 scored for sensitivity), 256
#   test images, 2 timed latency runs; the figures mean nothing. Without
#   NNCF it runs qsweep's half, says so, and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0 budget=0.3 out=""
while (($#)); do
  case $1 in
    --smoke) smoke=1 ;;
    --budget) budget=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "usage: bench/accuracy_control.sh [--smoke] [--budget POINTS] [--out RESULT.json]" >&2; exit 2 ;;
  esac
  shift
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python - "$work" "$smoke" "$budget" "$out" <<'PY'
import csv, json, os, subprocess, sys, time
from pathlib import Path

import numpy as np

sys.path.insert(0, "bench")
from qsweep_sweep import run_sweep  # noqa: E402
from accuracy_control_nncf import FASHION_IDX, correct, quantization_state, read_idx, session, top1  # noqa: E402

work, smoke, budget, out = Path(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3]), sys.argv[4]
root = Path.cwd()
nncf_python = os.environ.get("NNCF_PYTHON", "/work/nncf-venv/bin/python")

# NNCF, which scripts/setup does not install: skipped in the smoke mode,
# an error before any work otherwise.
probe = subprocess.run([nncf_python, "-c", "import nncf, onnx, onnxruntime"], capture_output=True) \
    if Path(nncf_python).exists() else None
have_nncf = probe is not None and probe.returncode == 0
if not have_nncf:
    why = f"{nncf_python} does not exist" if probe is None else f"{nncf_python} cannot import nncf, onnx and onnxruntime"
    install = ("python3 -m venv VENV && VENV/bin/pip install nncf==3.4.0 onnx==1.23.2 onnxruntime==1.31.1; "
               "NNCF_PYTHON=VENV/bin/python")
    if not smoke:
        raise SystemExit(f"accuracy_control.sh: NNCF is the peer: {why} ({install})")
    print(f"== SKIPPED the NNCF half of bench/accuracy_control.sh --smoke: {why} ({install}), which scripts/setup "
          "does not install; qsweep's half runs", file=sys.stderr)

# The spec: the reference spec's model, data and calibration; the three
# recipes with float_layers "auto"; the budget.
reference = json.load(open("experiments/fashion-resnet.json"))
evaluate = dict(reference["evaluate"])
spec = {
    "name": "accuracy-control",
    "model": str(root / "experiments" / reference["model"]),
    "data": dict(reference["data"]),
    "calibration": dict(reference["calibration"]),
    "baselines": ["fp32"],
    "matrix": {"calibration": ["entropy", "max"], "residual_fusion": [False, True], "float_layers": ["auto"]},
    "exclude": [{"calibration": "max", "residual_fusion": True}],
    "sensitivity": {"samples": 256, "validation_samples": 1000, "seed": 0, "accuracy_budget": budget},
    "evaluate": evaluate,
}
if smoke:
    spec["calibration"]["samples"] = 64
    spec["sensitivity"].update(samples=32, validation_samples=128)
    evaluate.update(warmup=1, iterations=2)
    images = read_idx(FASHION_IDX / "t10k-images-idx3-ubyte.gz")[:256, None]
    labels = read_idx(FASHION_IDX / "t10k-labels-idx1-ubyte.gz")[:256].astype(np.int64)
    np.savez(work / "test-256.npz", images=images, labels=labels)
    spec["data"]["evaluation"] = {"tensors": str(work / "test-256.npz")}
results, plan, sweep_s = run_sweep(work, spec)
tasks = {t["key"]: t for t in plan["tasks"]}
artifacts = results / "artifacts"
elapsed = lambda key: json.load(open(artifacts / key / "manifest.json"))["elapsed_s"]
prepared = {t["params"]["split"]: t["key"] for t in plan["tasks"] if t["stage"] == "prepare-data"}
rows = {r["run"]: r for r in csv.DictReader(open(results / "runs.csv"))}

# qsweep's very inputs as .npy: the prepared rows, normalised as stored.
# The calibration and validation rows are also checked against the IDX
# training split at their source_indices.json.
train = read_idx(FASHION_IDX / "train-images-idx3-ubyte.gz")
sets = {}
for split in ("calibration", "validation", "test"):
    artifact = artifacts / prepared[split]
    subprocess.run([".venv/bin/python", "bench/prepared_npy.py", artifact, work / f"{split}.npy"], check=True)
    subprocess.run([".venv/bin/python", "bench/prepared_npy.py", artifact, work / f"{split}-raw.npy", "--raw"], check=True)
    if split != "test":
        indices = json.load(open(artifact / "source_indices.json"))
        assert np.array_equal(np.load(work / f"{split}-raw.npy")[:, 0], train[indices]), f"{split} rows are not the IDX rows"
    labels = np.load(artifact / "labels.npy").astype(np.int64) if (artifact / "labels.npy").exists() else None
    if labels is not None:
        np.save(work / f"{split}_labels.npy", labels)
    sets[split] = (np.load(work / f"{split}.npy"), labels)
calibration_indices = set(json.load(open(artifacts / prepared["calibration"] / "source_indices.json")))
validation_indices = set(json.load(open(artifacts / prepared["validation"] / "source_indices.json")))
assert not calibration_indices & validation_indices, "the validation subset holds calibration images"

qsweep = []
for run in plan["runs"]:
    kind = run["run"]["kind"]
    if "quantized" not in kind:
        continue
    stage = {tasks[key]["stage"]: key for key in run["tasks"]}
    search = json.load(open(artifacts / stage["fallback"] / "search.json"))
    ranking = json.load(open(artifacts / stage["sensitivity"] / "sensitivity.json"))
    step = search["steps"][search["chosen"]]
    import onnx
    model = onnx.load(artifacts / stage["fallback"] / step["model"])
    float_ops, _ = quantization_state(model)
    seconds = {name: elapsed(stage[name]) for name in ("calibrate", "sensitivity")}
    seconds["fallback search"] = search["search_s"]
    row = rows[run["run"]["id"]]
    q = kind["quantized"]
    qsweep.append({
        "tool": "qsweep", "run": run["run"]["id"],
        "recipe": f"{q['calibration']} {'fused' if q['residual_fusion'] else 'unfused'}",
        "float_op_count": len(float_ops), "float_ops": step["float_ops"],
        "structural_float_ops": [op["name"] for op in float_ops],
        "quantized_ops": len(ranking["ops"]), "sensitivity_forward_passes": ranking["forward_passes"],
        "validation_fp32": search["fp32_validation_top1"], "validation_int8": step["validation_top1"],
        "validation_int8_recomputed": top1(correct(model, *sets["validation"])),
        "test_fp32": search["fp32_test_top1"], "test_int8": float(row["accuracy"]),
        "steps": len(search["steps"]), "budget_met": search["budget_met"], "note": search["note"],
        "seconds": seconds, "seconds_compared": sum(seconds.values()),
        "seconds_test_passes": search["test_s"], "seconds_fallback_stage": elapsed(stage["fallback"]),
    })
validation_fp32_recomputed = top1(correct(spec["model"], *sets["validation"]))

nncf = None
if have_nncf:
    command = [nncf_python, "bench/accuracy_control_nncf.py", "--model", spec["model"],
               "--calibration", work / "calibration.npy",
               "--validation", work / "validation.npy", work / "validation_labels.npy",
               "--test", work / "test.npy", work / "test_labels.npy",
               "--budget", str(budget), "--out", work / "nncf.json"] + (["--smoke"] if smoke else [])
    started = time.perf_counter()
    subprocess.run([str(c) for c in command], check=True, capture_output=True)
    process_s = time.perf_counter() - started
    nncf = json.load(open(work / "nncf.json"))
    nncf["process_seconds"] = process_s

sizes = {split: len(sets[split][0]) for split in sets}
print(f"Accuracy budget {budget} points on the reference model: {sizes['calibration']} calibration, "
      f"{sizes['validation']} validation, {sizes['test']} test images, CPU, 2 threads")
print(f"{'tool':<7}{'recipe':<24}{'float':>6}{'val fp32':>10}{'val int8':>10}{'test fp32':>11}{'test int8':>11}"
      f"{'time s':>9}{'budget':>8}")
for r in qsweep:
    print(f"{'qsweep':<7}{r['recipe'] + ' auto':<24}{r['float_op_count']:>6}{r['validation_fp32']:>10.2f}"
          f"{r['validation_int8']:>10.2f}{r['test_fp32']:>11.2f}{r['test_int8']:>11.2f}{r['seconds_compared']:>9.2f}"
          f"{'met' if r['budget_met'] else 'MISSED':>8}")
if nncf:
    print(f"{'NNCF':<7}{'min/max, own PTQ':<24}{nncf['float_op_count']:>6}{nncf['top1']['validation']['fp32']:>10.2f}"
          f"{nncf['top1']['validation']['int8']:>10.2f}{nncf['top1']['test']['fp32']:>11.2f}"
          f"{nncf['top1']['test']['int8']:>10.2f}*{nncf['seconds_total']:>9.2f}{'met' if nncf['budget_met'] else 'MISSED':>8}")
print("float: Conv/Gemm/MatMul nodes with an input not from a DequantizeLinear (one counter for both tools).")
print("time: qsweep calibrate + sensitivity + the fallback search to its decision (calibrate is shared by the recipes);"
      " NNCF its call.")
print("* NNCF reports no test figure: computed here on the same test images.")
for r in qsweep:
    line = (f"qsweep {r['run']}: ops in float {r['float_ops'] or 'none'}; stages "
            + ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items())
            + f"; {r['steps']} steps, scored on the test split too in {r['seconds_test_passes']:.2f} s more"
            f" (fallback stage {r['seconds_fallback_stage']:.2f} s in all);"
            f" {r['quantized_ops']} ops ranked in {r['sensitivity_forward_passes']} passes")
    if nncf:
        line += (f"; time vs NNCF {r['seconds_compared'] / nncf['seconds_total']:.2f}x,"
                 f" ops in float {r['float_op_count'] - nncf['float_op_count']:+d}")
    print(line + (f"; {r['note']}" if r["note"] else ""))
print(f"qsweep whole sweep (3 recipes and fp32, evaluation included): {sweep_s:.2f} s wall")
if nncf:
    print(f"NNCF: {nncf['seconds_total']:.2f} s call ({nncf['seconds_before_first_validation']:.2f} s before its first "
          f"validation, {nncf['validation_fn_calls']} validation calls), {nncf['process_seconds']:.2f} s for its script with "
          f"the test evaluations; baseline int8 (no reversion) validation {nncf['top1']['validation']['baseline_int8']:.2f},"
          f" test {nncf['top1']['test']['baseline_int8']:.2f}; scheme {nncf['quantization_scheme']}")
check = [r for r in qsweep if abs(r["validation_int8_recomputed"] - r["validation_int8"]) > 1e-6]
print(f"check: qsweep's validation top-1 recomputed with ONNX Runtime's Python API on the exported images: "
      f"fp32 {validation_fp32_recomputed:.2f}, " + ("int8 all equal" if not check else f"DIFFERS for {[r['run'] for r in check]}"))
if out:
    Path(out).write_text(json.dumps({"budget": budget, "sizes": sizes, "smoke": smoke, "sweep_seconds": sweep_s,
                                     "qsweep": qsweep, "nncf": nncf,
                                     "validation_fp32_recomputed": validation_fp32_recomputed}, indent=2) + "\n")
PY
