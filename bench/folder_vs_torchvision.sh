#!/usr/bin/env bash
# fp32 top-1 on an image folder: qsweep against torchvision's ImageFolder
# and transforms over PIL, run by ONNX Runtime's Python API, on the same
# files and model: experiments/fashion-folder.json's folders (Fashion-MNIST
# written by scripts/fashion_images.py: val as PNG, train as JPEG), as they
# are and with a resize and crop that make PIL resample every image.
# Target: within 0.1 point.
# usage: bench/folder_vs_torchvision.sh    (after scripts/setup, cargo build --release,
#        apt-get install python3-torchvision, and the peer's Python:
#        /usr/bin/python3 -m venv --system-site-packages .venv-torchvision &&
#        .venv-torchvision/bin/pip install "onnxruntime==1.31.*")
#        With --smoke (what CI runs), a missing peer's Python is not an error:
#        the qsweep half runs and the script says that it skips the peer half.
set -euo pipefail
cd "$(dirname "$0")/.."
peer_python=.venv-torchvision/bin/python
if [[ "${1:-}" == "--smoke" ]]; then
  [[ -x $peer_python ]] || { echo "  SKIPPED the peer half: $peer_python is missing (scripts/setup does not make it; see this script's header)"; peer_python=""; }
elif [[ ! -x $peer_python ]]; then
  echo "$peer_python is missing: make it as this script's header says" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
classes=$(python3 -c 'import json; print(json.dumps(json.load(open("experiments/fashion-folder.json"))["data"]["evaluation"]["classes"]))')
plain='{"color": "grey", "mean": [0.2860], "std": [0.3530]}'
resampled='{"color": "grey", "resize": 32, "center_crop": 28, "interpolation": "bicubic", "mean": [0.2860], "std": [0.3530]}'
for split_and_preprocess in "val|plain" "val|resampled" "train|plain" "train|resampled"; do
  folder="$PWD/experiments/data/fashion-images/${split_and_preprocess%%|*}"
  case ${split_and_preprocess#*|} in plain) preprocess=$plain ;; resampled) preprocess=$resampled ;; esac
  cat > "$work/spec.json" <<JSON
{ "name": "folder-bench", "model": "$PWD/experiments/models/fashion-resnet8.onnx",
  "data": { "preprocess": $preprocess, "evaluation": { "images": "$folder", "classes": $classes } },
  "evaluate": { "batch_sizes": [64], "warmup": 1, "iterations": 1, "threads": 2 } }
JSON
  rm -rf "$work/results"
  target/release/qsweep run "$work/spec.json" --results "$work/results" >/dev/null 2>"$work/qsweep.log" ||
    { cat "$work/qsweep.log" >&2; exit 1; }
  ours=$(python3 -c 'import csv,sys; print(next(csv.DictReader(open(sys.argv[1])))["accuracy"])' "$work/results/runs.csv")
  if [[ -z $peer_python ]]; then
    echo "${folder##*/} $preprocess: qsweep $ours%"
    continue
  fi
  peer=$($peer_python bench/torchvision_folder.py experiments/models/fashion-resnet8.onnx "$folder" "$classes" "$preprocess")
  python3 - "$ours" "$peer" "$preprocess" "${folder##*/}" <<'PY'
import json, sys
ours, peer, preprocess = float(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
theirs = peer["top1"] * 100
print(f"{sys.argv[4]} {preprocess}\n  {peer['images']} images: qsweep {ours:.2f}%, torchvision {peer['torchvision']} + PIL + ORT {theirs:.2f}%, difference {ours - theirs:+.2f} points (target within 0.1)")
PY
done
