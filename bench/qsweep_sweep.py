"""Runs one qsweep sweep for a benchmark script: writes the spec, times
`target/release/qsweep run` on it, and returns what it left (the stored
plan and the artifacts directory), so each script reads the stages it
measures from the same place qsweep's reports do."""

import json
import subprocess
import sys
import time
from pathlib import Path


def run_sweep(work: Path, spec: dict):
    """Returns (results directory, plan, wall seconds); exits with the log
    if the sweep fails."""
    (work / "spec.json").write_text(json.dumps(spec, indent=2))
    results = work / "results"
    started = time.perf_counter()
    with open(work / "qsweep.log", "w") as log:
        status = subprocess.run(["target/release/qsweep", "run", str(work / "spec.json"), "--results", str(results)],
                                stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if status:
        sys.stderr.write((work / "qsweep.log").read_text())
        raise SystemExit(f"qsweep run failed ({status})")
    return results, json.load(open(results / "plan.json")), seconds
