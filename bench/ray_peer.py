"""The peer of benches/queue_throughput.rs: Ray on the same machine.

usage: ray_peer.py TASKS TRIALS
prints one JSON line: trivial remote tasks per second (Ray core, 2 CPUs),
and Ray Tune's wall time per no-op trial for a grid of TRIALS trials with
reuse_actors=True (its fastest setting).
"""

import json
import os
import sys
import tempfile
import time

import ray
from ray import tune

tasks, trials = int(sys.argv[1]), int(sys.argv[2])
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)


@ray.remote
def noop():
    return None


ray.get([noop.remote() for _ in range(200)])  # warm the workers
started = time.perf_counter()
ray.get([noop.remote() for _ in range(tasks)])
tasks_per_s = tasks / (time.perf_counter() - started)


def trainable(config):
    return {"score": config["x"]}


storage = tempfile.mkdtemp()
started = time.perf_counter()
tune.Tuner(
    trainable,
    param_space={"x": tune.grid_search(list(range(trials)))},
    tune_config=tune.TuneConfig(reuse_actors=True),
    run_config=tune.RunConfig(storage_path=storage, verbose=0),
).fit()
tune_ms = (time.perf_counter() - started) * 1e3 / trials
print(json.dumps({"tasks_per_s": tasks_per_s, "tune_ms_per_trial": tune_ms, "ray": ray.__version__}))
