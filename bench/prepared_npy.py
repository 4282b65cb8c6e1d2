"""Writes a qsweep prepare-data artifact as the model inputs stages read.

usage: prepared_npy.py ARTIFACT_DIR OUT.npy [--first N] [--raw]
Reads prepared.json and its shards (raw little-endian rows, see
src/data/prepared.rs), normalises as the index says, and saves float32
NCHW (or the model's layout) to OUT.npy: what a peer needs to run on the
very images qsweep ran on. --raw saves the rows as stored (uint8 pixels
for images), unnormalised.
"""

import argparse
import json

import numpy as np

DTYPES = {"u8": np.uint8, "f16": "<f2", "f32": "<f4"}

parser = argparse.ArgumentParser()
parser.add_argument("artifact")
parser.add_argument("out")
parser.add_argument("--first", type=int)
parser.add_argument("--raw", action="store_true")
args = parser.parse_args()

index = json.load(open(f"{args.artifact}/prepared.json"))
count = index["count"] if args.first is None else min(args.first, index["count"])
shape = index["sample_shape"]
rows = np.concatenate([
    np.fromfile(f"{args.artifact}/{name}", dtype=DTYPES[index["dtype"]]).reshape([-1, *shape])
    for name in index["shards"]
])[:count]
normalize = index["normalize"]
if args.raw:
    np.save(args.out, rows)
    raise SystemExit
rows = rows.astype(np.float32)
if normalize:
    axis = 1 + normalize["channel_axis"]
    channels = shape[normalize["channel_axis"]]
    broadcast = [1] * rows.ndim
    broadcast[axis] = channels
    mean = np.broadcast_to(np.array(normalize["mean"], np.float32), [channels]).reshape(broadcast)
    std = np.broadcast_to(np.array(normalize["std"], np.float32), [channels]).reshape(broadcast)
    rows = (rows / np.float32(normalize["scale"]) - mean) / std
np.save(args.out, rows)
