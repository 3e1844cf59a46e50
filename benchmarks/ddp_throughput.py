"""Data-parallel throughput: samples/s of fit() with 1 process vs N gloo processes (torchrun).

Each process uses one intra-op thread, so N processes use N cores. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from _common import emit  # noqa: I001


def worker(steps: int) -> None:
    from slimkit.data import load_data
    from slimkit.io.loader import load_zoo
    from slimkit.train import TrainConfig, fit
    from slimkit.train.distributed import init_from_env, world

    init_from_env()
    torch.set_num_threads(1)
    data = load_data("builtin:mnist", seed=0)
    torch.manual_seed(0)
    model = load_zoo("lenet5", data).module
    cfg = TrainConfig(epochs=100, max_steps=steps, batch_size=128)
    fit(model, data, cfg.model_copy(update={"max_steps": 3}), progress=False)  # warm-up
    start = time.perf_counter()
    hist = fit(model, data, cfg, progress=False)
    seconds = time.perf_counter() - start
    if world()[0] == 0:
        print(json.dumps({"seconds": seconds, "steps": hist["steps"],
                          "samples_per_s": hist["steps"] * cfg.batch_size / seconds,
                          "world_size": hist["world_size"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.steps)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, args.procs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={n}", __file__, "--worker", "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        runs[n] = json.loads(out.strip().splitlines()[-1])
    emit({"benchmark": "ddp_throughput", "model": "zoo:lenet5", "data": "builtin:mnist",
          "batch_size": 128, "runs": runs,
          "throughput_ratio": runs[args.procs]["samples_per_s"] / runs[1]["samples_per_s"]})


if __name__ == "__main__":
    main()
