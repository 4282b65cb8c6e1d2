#!/usr/bin/env bash
# Every benchmark in its smoke mode, as CI runs them: the same code paths
# as the real runs, each peer's included where this machine has it, at
# tiny sizes, so that a benchmark that no longer builds or runs fails CI.
# The figures mean nothing. A peer that scripts/setup does not install is
# skipped, and the benchmark says so.
# usage: bench/smoke.sh   (after scripts/setup --with-test-services and cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
step() {
  local started=$SECONDS
  echo "== $*" >&2
  "$@"
  echo "== $1 ${2:-} ${3:-} ${4:-}: $((SECONDS - started)) s" >&2
}
step cargo bench --no-run
for bench in benches/*.rs; do
  step cargo bench --bench "$(basename "$bench" .rs)" -- --smoke
done
step bench/ptq_vs_ort.sh --smoke
step bench/folder_vs_torchvision.sh --smoke
step bench/accuracy_control.sh --smoke
step bench/sensitivity_cost.sh --smoke
step bench/qat_torch_model.sh --smoke
if /usr/bin/python3 -c 'import torch, torchvision, skimage' 2>/dev/null; then
  step /usr/bin/python3 bench/imagenet/run.py --smoke --work "$(mktemp -d)"
else
  echo "== SKIPPED bench/imagenet/run.py --smoke, peers and inputs alike: it makes its JPEGs and models with" \
    "PyTorch, torchvision and scikit-image (apt-get install python3-torch python3-torchvision python3-skimage)," \
    "which scripts/setup does not install" >&2
fi
