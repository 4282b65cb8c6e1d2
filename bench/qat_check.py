"""QAT's targets, read from a results directory: each QAT run's test top-1
against its PTQ start (the same recipe at 0 epochs), QAT with fusion
against fp32, and the share of each QAT stage's time its validation
passes took.

    python3 bench/qat_check.py RESULTS_DIR
"""

import csv
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1])
rows = {r["run"]: r for r in csv.DictReader(open(root / "runs.csv"))}
plan = json.load(open(root / "plan.json"))
stage_of = {t["key"]: t["stage"] for t in plan["tasks"]}
fp32 = float(rows["fp32"]["accuracy"])
print(f"fp32 {fp32:.2f}%")
print("run                     QAT      PTQ start  QAT-PTQ  QAT-fp32  kept  lr       validation share")
for planned in plan["runs"]:
    run = rows[planned["run"]["id"]]
    if run["qat_epochs"] in ("", "0"):
        continue
    twin = next(r for r in rows.values() if r["qat_epochs"] == "0" and r["calibration"] == run["calibration"]
                and r["residual_fusion"] == run["residual_fusion"] and r["float_layers"] == run["float_layers"])
    qat_key = next(k for k in planned["tasks"] if stage_of[k] == "qat")
    manifest = json.load(open(root / "artifacts" / qat_key / "manifest.json"))
    share = manifest["metrics"]["validation_s"] / manifest["elapsed_s"]
    qat, ptq = float(run["accuracy"]), float(twin["accuracy"])
    print(f"{run['run']:<22} {qat:6.2f}%   {ptq:6.2f}%   {qat - ptq:+6.2f}   {qat - fp32:+6.2f}    "
          f"{run['qat_kept_epoch']:>3}  {float(run['qat_learning_rate']):.0e}   {share * 100:5.1f}%")
