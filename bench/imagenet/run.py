"""qsweep at ImageNet scale, side by side with its peers in one run.

usage: python3 bench/imagenet/run.py [--smoke] [--work DIR] [--images N] [--scale A,B] [--calibration N]
(after scripts/setup, cargo build --release, and Debian's python3-torch,
python3-torchvision, python3-skimage; the peer's ONNX Runtime goes into
.venv-torchvision if missing.)

On a synthetic ImageNet-like folder (make_folder.py: 1000 classes of
~500x375 JPEGs made from real photographs) and torchvision's ResNet-18
and ResNet-50 with seeded weights (export_models.py):

1. pipeline: qsweep's prepare-data (decode, Resize(256), CenterCrop(224))
   against torchvision's ImageFolder + DataLoader(num_workers=2) with PIL;
2. evaluation of fp32 ResNet-18 at batch 64: from qsweep's shards against
   the model's pure inference on the same images held in memory, and end
   to end from the JPEGs against ONNX Runtime's Python API fed by the
   DataLoader;
3. memory: peak RSS of each run, and of prepare-data alone at two sizes
   (--scale, a labels file that lists the folder's images over and over,
   so the larger size costs decoding time, not disk);
4. a full PTQ sweep of ResNet-50 (4 methods x both fusion settings) with
   the per-stage breakdown, the int8 speed-up beside ONNX Runtime's
   quantize_static, agreement with fp32, and a fully cached rerun.

--smoke runs every step at the smallest size (what CI runs). Prints a
report and writes it as JSON to WORK/report.json.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
QSWEEP = ROOT / "target/release/qsweep"
PEER_PYTHON = ROOT / ".venv-torchvision/bin/python"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PREPROCESS = {"resize": 256, "center_crop": 224, "mean": MEAN, "std": STD}


def sh(*command, **kwargs):
    return subprocess.run([str(c) for c in command], check=True, capture_output=True, text=True, **kwargs).stdout


def peer(*command, python=PEER_PYTHON):
    return json.loads(sh(python, *command).strip().splitlines()[-1])


def section(report, name, figures):
    """Records a finished step, and prints it at once so that a later
    failure loses nothing measured."""
    report[name] = figures
    print(json.dumps({name: figures}, default=str), file=sys.stderr, flush=True)


def ensure_inputs(work, images):
    folder = work / f"folder-{images}"
    if not folder.exists():
        sh("/usr/bin/python3", HERE / "make_folder.py", folder, "--images", images)
    models = work / "models"
    if not (models / "resnet50.onnx").exists():
        sh("/usr/bin/python3", HERE / "export_models.py", models)
    if not PEER_PYTHON.exists():
        sh("/usr/bin/python3", "-m", "venv", "--system-site-packages", ROOT / ".venv-torchvision")
        sh(PEER_PYTHON, "-m", "pip", "install", "--quiet", "onnxruntime==1.31.*")
    return folder, models


def write_spec(path, body):
    path.write_text(json.dumps(body, indent=1))
    return path


def qsweep_run(spec, results, log):
    """`qsweep run` under /usr/bin/time: (wall seconds, peak RSS MB)."""
    started = time.perf_counter()
    with open(log, "w") as err:
        subprocess.run(["/usr/bin/time", "-f", "peak_rss_kb %M", QSWEEP, "run", spec, "--results", results],
                       check=True, stdout=subprocess.DEVNULL, stderr=err)
    wall = time.perf_counter() - started
    rss_kb = int(next(l for l in open(log) if l.startswith("peak_rss_kb")).split()[1])
    return wall, rss_kb / 1024


def manifests(results):
    """Every artifact's manifest, by stage."""
    found = {}
    for manifest in (results / "artifacts").glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        found.setdefault(data["stage"], []).append(data | {"dir": manifest.parent})
    return found


def prepare_peak_rss(spec, results, log):
    """Peak RSS (MB) of `qsweep run` up to the end of its prepare-data
    tasks, sampled from /proc while it runs, and their elapsed seconds."""
    with open(log, "w") as err:
        child = subprocess.Popen([QSWEEP, "run", spec, "--results", results], stdout=subprocess.DEVNULL, stderr=err)
    peak_kb = 0
    while child.poll() is None:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
            peak_kb = max(peak_kb, int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]))
        except (OSError, StopIteration):
            pass
        if "done   prepare-data" in Path(log).read_text():
            child.kill()
            break
        time.sleep(0.02)
    child.wait()
    elapsed = sum(m["elapsed_s"] for m in manifests(results).get("prepare-data", []))
    return peak_kb / 1024, elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qsweep-imagenet"))
    parser.add_argument("--images", type=int, default=2000, help="evaluation folder size (at least 1000)")
    parser.add_argument("--scale", default="5000,50000", help="prepare-data sizes for the memory growth check")
    parser.add_argument("--calibration", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the ResNet-18 comparisons")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out: memory, resnet50")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.smoke:
        args.images, args.scale, args.calibration = 1000, "1000,2000", 64
    small, large = (int(n) for n in args.scale.split(","))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    folder, models = ensure_inputs(work, args.images)
    # Every side reads the JPEGs from the page cache, the first as the last.
    for image in folder.glob("*/*.JPEG"):
        image.read_bytes()
    report = {"images": args.images, "threads": args.threads, "cores": os.cpu_count()}
    evaluate = {"batch_sizes": [1, 64], "warmup": 3, "iterations": 30, "threads": args.threads}

    # 1 and 2: fp32 ResNet-18 from the folder, in rounds that alternate
    # qsweep and its peers (a shared 2-core machine drifts by 10-20%
    # within minutes); medians of the rounds.
    rounds = []
    for _ in range(1 if args.smoke else args.rounds):
        results = work / "resnet18"
        subprocess.run(["rm", "-rf", results], check=True)
        spec = write_spec(work / "resnet18.json", {
            "name": "imagenet-resnet18", "model": str(models / "resnet18.onnx"),
            "data": {"preprocess": PREPROCESS, "evaluation": {"images": str(folder)}},
            "evaluate": evaluate | {"iterations": 5}})
        wall, rss = qsweep_run(spec, results, work / "resnet18.log")
        stages = manifests(results)
        prepare_s = stages["prepare-data"][0]["elapsed_s"]
        evaluation = stages["evaluate"][0]["metrics"]
        test = stages["prepare-data"][0]["dir"]
        sh(ROOT / ".venv/bin/python", ROOT / "bench/prepared_npy.py", test, work / "test.npy")
        loader = peer(HERE / "dataloader_throughput.py", folder, "--workers", 2, "--batch", 64)
        in_memory = peer(HERE / "inference_in_memory.py", models / "resnet18.onnx", work / "test.npy",
                         "--threads", args.threads)
        end_to_end = peer(HERE / "ort_dataloader_eval.py", models / "resnet18.onnx", folder,
                          "--threads", args.threads)
        rounds.append({"prepare_s": prepare_s, "loader_images_per_s": loader["images_per_s"],
                       "from_shards_s": evaluation["accuracy_pass_s"], "in_memory_s": in_memory["seconds"],
                       "end_to_end_s": prepare_s + evaluation["accuracy_pass_s"],
                       "ort_dataloader_s": end_to_end["seconds"], "run_peak_rss_mb": rss,
                       "loader_peak_rss_mb": loader["peak_rss_mb"]})
        print(json.dumps({"round": rounds[-1]}), file=sys.stderr, flush=True)
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    section(report, "pipeline", {"qsweep_images_per_s": args.images / median["prepare_s"],
                                 "dataloader_images_per_s": median["loader_images_per_s"],
                                 "ratio": args.images / median["prepare_s"] / median["loader_images_per_s"],
                                 "dataloader_peak_rss_mb": median["loader_peak_rss_mb"]})
    section(report, "evaluation", {"from_shards_s": median["from_shards_s"], "in_memory_s": median["in_memory_s"],
                                   "ratio": median["from_shards_s"] / median["in_memory_s"],
                                   "end_to_end_s": median["end_to_end_s"],
                                   "ort_dataloader_s": median["ort_dataloader_s"],
                                   "end_to_end_ratio": median["end_to_end_s"] / median["ort_dataloader_s"],
                                   "top1_qsweep": evaluation.get("accuracy"), "top1_torchvision": end_to_end["top1"],
                                   "run_peak_rss_mb": max(r["run_peak_rss_mb"] for r in rounds),
                                   "rounds": len(rounds)})

    # 3: prepare-data alone at two sizes, from labels files that cycle
    # through the folder's images.
    files = sorted(p.relative_to(folder) for p in folder.glob("*/*.JPEG"))
    memory = {}
    for count in () if "memory" in skip else (small, large):
        labels = work / f"labels-{count}.txt"
        labels.write_text("".join(f"{files[i % len(files)]} {int(files[i % len(files)].parts[0][1:])}\n"
                                  for i in range(count)))
        results = work / f"prepare-{count}"
        subprocess.run(["rm", "-rf", results], check=True)
        spec = write_spec(work / f"prepare-{count}.json", {
            "name": f"prepare-{count}", "model": str(models / "resnet18.onnx"),
            "data": {"preprocess": PREPROCESS, "evaluation": {"images": str(folder), "labels_file": str(labels)}},
            "evaluate": evaluate})
        rss, elapsed = prepare_peak_rss(spec, results, work / f"prepare-{count}.log")
        memory[count] = {"peak_rss_mb": rss, "seconds": elapsed}
    if memory:
        growth = memory[large]["peak_rss_mb"] / memory[small]["peak_rss_mb"] - 1
        section(report, "prepare_memory", {str(k): v for k, v in memory.items()} | {"growth": growth})
    if "resnet50" not in skip:
        resnet50_sweep(args, work, folder, models, test, evaluate, report)
    (work / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))


def resnet50_sweep(args, work, folder, models, test, evaluate, report):
    """4: the ResNet-50 PTQ sweep; evaluation on the prepared test images
    as an unlabelled uint8 tensor file, so every run is scored against fp32."""
    # The smoke run: one recipe of each fusion setting's cost, 64 images.
    first = ["--first", "64"] if args.smoke else []
    methods = ["max"] if args.smoke else ["max", "mse", "entropy", "percentile"]
    sh(ROOT / ".venv/bin/python", ROOT / "bench/prepared_npy.py", test, work / "test_u8.npy", "--raw", *first)
    sh(ROOT / ".venv/bin/python", ROOT / "bench/prepared_npy.py", test, work / "test_ptq.npy", *first)
    results = work / "resnet50"
    subprocess.run(["rm", "-rf", results], check=True)
    spec = write_spec(work / "resnet50.json", {
        "name": "imagenet-resnet50-ptq", "model": str(models / "resnet50.onnx"),
        "data": {"preprocess": PREPROCESS, "evaluation": {"tensors": str(work / "test_u8.npy")},
                 "calibration": {"images": str(folder)}},
        "calibration": {"samples": args.calibration, "seed": 0}, "baselines": ["fp32"],
        "matrix": {"calibration": methods, "residual_fusion": [False, True]},
        # Nine models at about 2 s a batch-64 run in fp32: fewer timed runs.
        "evaluate": evaluate | {"warmup": 1, "iterations": 5}})
    wall, rss = qsweep_run(spec, results, work / "resnet50.log")
    rows = {r["run"]: r for r in csv.DictReader(open(results / "runs.csv"))}
    per_stage = {stage: round(sum(m["elapsed_s"] for m in found), 1) for stage, found in manifests(results).items()}
    started = time.perf_counter()
    subprocess.run([QSWEEP, "run", spec, "--results", results], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    rerun_s = time.perf_counter() - started
    plan = json.loads(sh(QSWEEP, "plan", spec, "--json", "--results", results))
    calibration = next(t["key"] for t in plan["tasks"] if t["params"].get("split") == "calibration")
    sh(ROOT / ".venv/bin/python", ROOT / "bench/prepared_npy.py", results / "artifacts" / calibration,
       work / "calibration.npy")
    # quantize_static needs the onnx package, which the project's .venv has.
    ort_route = peer(HERE / "ort_ptq.py", models / "resnet50.onnx", work / "calibration.npy", work / "test_ptq.npy",
                     work / "resnet50-ort-int8.onnx", "--threads", args.threads, python=ROOT / ".venv/bin/python")
    fp32 = rows["fp32"]
    runs = {}
    for run, row in rows.items():
        runs[run] = {"agreement": float(row["agreement"]) if row["agreement"] else None,
                     "logit_sqnr_db": row["logit_sqnr_db"], "b1_ms": float(row["latency_p50_ms"]),
                     "b64_ips": float(row["throughput"]),
                     "b1_speedup": float(fp32["latency_p50_ms"]) / float(row["latency_p50_ms"]),
                     "b64_speedup": float(row["throughput"]) / float(fp32["throughput"])}
    section(report, "resnet50_sweep", {"wall_s": wall, "peak_rss_mb": rss, "per_stage_s": per_stage, "rerun_s": rerun_s,
                                "runs": runs, "ort_quantize_static": ort_route | {
                                    "b1_speedup": ort_route["fp32_b1_ms"] / ort_route["int8_b1_ms"],
                                    "b64_speedup": ort_route["int8_b64_ips"] / ort_route["fp32_b64_ips"]}})


if __name__ == "__main__":
    sys.exit(main())
