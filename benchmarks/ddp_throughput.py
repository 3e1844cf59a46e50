"""Data-parallel training throughput on a CPU: does DDP beat one process using the same cores?

Samples/s of ``fit()`` (zoo:lenet5, builtin:mnist, global batch 128: each of N ranks computes
128/N samples, so every configuration takes the same optimizer steps) in three configurations:

- ``1x1``: one process, one intra-op thread (one core);
- ``1x2``: one process, two intra-op threads: the realistic single-process baseline on two cores;
- ``2x1``: two gloo ranks under torchrun, one thread each (two cores).

The processes of every configuration start once (torchrun for ``2x1``) and warm up; then, in
each of ``--rounds`` rounds, each configuration in turn (the order rotating each round) times
one ``fit()`` of ``--steps`` optimizer steps while the others sleep, so the rounds are cheap and
slow drifts of a shared machine hit every configuration alike. Each ratio is the median of the
per-round ratios with its ~95% interval (``slimkit.measure.latency.ratio_ci``); "beats" means
the interval lies above 1. Timing is only meaningful on a quiet machine. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import emit  # noqa: I001

from slimkit.measure.latency import ratio_ci

CONFIGS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # name -> (processes, threads each)
BATCH = 128


def _wait_for(path: Path, deadline_s: float,
              procs: dict[str, subprocess.Popen] | None = None) -> None:
    """Poll until ``path`` exists (a file-system signal between the runner and the workers:
    an idle worker sleeps, it does not spin); a worker that died is reported with the last
    line of its log."""
    limit = time.monotonic() + deadline_s
    while not path.exists():
        for name, p in (procs or {}).items():
            if p.poll() not in (None, 0):
                tail = (path.parent / f"{name}.log").read_text().strip().splitlines()[-1:]
                raise RuntimeError(f"configuration {name} exited with {p.returncode}: {tail}")
        if time.monotonic() > limit:
            raise TimeoutError(f"no '{path.name}' after {deadline_s:.0f} s")
        time.sleep(0.002)


def worker(args: argparse.Namespace) -> None:
    """One configuration, kept alive: warm up, say ready, then time one window of
    ``args.steps`` optimizer steps each time the runner says go."""
    from slimkit.data import load_data
    from slimkit.io.loader import load_zoo
    from slimkit.train import TrainConfig, fit
    from slimkit.train.distributed import barrier, init_from_env, shutdown, world

    init_from_env()
    torch.set_num_threads(args.threads)
    from slimkit.data.guard import hide_test

    # Test split hidden: fit's end-of-training test evaluation stays out of the timed window.
    data = hide_test(load_data("builtin:mnist", seed=0))
    torch.manual_seed(0)
    model = load_zoo("lenet5", data).module
    cfg = TrainConfig(epochs=100, max_steps=args.steps, batch_size=BATCH)
    fit(model, data, cfg.model_copy(update={"max_steps": 10}), progress=False)  # warm-up
    sync, rank = Path(args.sync), world()[0]
    if rank == 0:
        (sync / f"{args.name}.ready").touch()
    for r in range(args.rounds):
        _wait_for(sync / f"{args.name}.go{r}", 600)
        barrier()
        start = time.perf_counter()
        hist = fit(model, data, cfg.model_copy(update={"seed": r}), progress=False)
        seconds = time.perf_counter() - start
        if rank == 0:
            row = {"round": r, "seconds": seconds, "steps": hist["steps"],
                   "samples_per_s": hist["steps"] * BATCH / seconds,
                   "world_size": hist["world_size"],
                   "threads_per_process": torch.get_num_threads()}
            tmp = sync / f"{args.name}.{r}.tmp"
            tmp.write_text(json.dumps(row))
            os.replace(tmp, sync / f"{args.name}.{r}.json")
    shutdown()


def launch(name: str, args: argparse.Namespace, sync: Path) -> subprocess.Popen:
    """Start configuration ``name`` (torchrun for several processes)."""
    procs, threads = CONFIGS[name]
    script = [os.path.abspath(__file__), "--worker", "--name", name, "--sync", str(sync),
              "--steps", str(args.steps), "--rounds", str(args.rounds),
              "--threads", str(threads)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={procs}", *script] if procs > 1 else [sys.executable, *script])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(sync / f"{name}.log", "w") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)


def interleave(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every configuration alive at once, one timing window at a time, rotating the order
    each round; returns each configuration's windows in round order."""
    names = list(CONFIGS)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        sync = Path(tmp)
        procs = {n: launch(n, args, sync) for n in names}
        try:
            for n in names:  # started one after another, warmed up before any timing
                _wait_for(sync / f"{n}.ready", 300, procs)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    (sync / f"{name}.go{r}").touch()
                    _wait_for(sync / f"{name}.{r}.json", 300, procs)
                    runs[name].append(json.loads((sync / f"{name}.{r}.json").read_text()))
            for p in procs.values():
                p.wait(timeout=60)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
    return runs


def ratio(runs: dict[str, list[dict]], new: str, old: str) -> dict:
    """Throughput of ``new`` over ``old`` (> 1: ``new`` trains faster), paired by round."""
    med, lo, hi = ratio_ci([r["samples_per_s"] for r in runs[new]],
                           [r["samples_per_s"] for r in runs[old]])
    return {"median": med, "ci95": [lo, hi], "rounds": len(runs[new]),
            "beyond_noise": lo > 1 or hi < 1}


def _word(r: dict) -> str:
    lo, hi = r["ci95"]
    return (f"{'faster' if lo > 1 else 'slower' if hi < 1 else 'no difference (inside noise)'}"
            f", {r['median']:.2f}x [{lo:.2f}, {hi:.2f}]")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per window")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--sync", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    start = time.perf_counter()
    names = list(CONFIGS)
    runs = interleave(args)
    ratios = {"2x1_over_1x1": ratio(runs, "2x1", "1x1"),
              "2x1_over_1x2": ratio(runs, "2x1", "1x2"),
              "1x2_over_1x1": ratio(runs, "1x2", "1x1")}
    beats = [b for b in ("1x1", "1x2") if ratios[f"2x1_over_{b}"]["ci95"][0] > 1]
    emit({"benchmark": "ddp_throughput", "model": "zoo:lenet5", "data": "builtin:mnist",
          "global_batch_size": BATCH, "steps_per_window": args.steps, "rounds": args.rounds,
          "method": "each configuration's processes started once and warmed up; then one "
                    "timed fit() of steps_per_window steps per configuration per round, "
                    "one configuration at a time, the order rotating each round",
          "configs": {n: {"processes": p, "threads_per_process": t}
                      for n, (p, t) in CONFIGS.items()},
          "samples_per_s_median": {n: statistics.median(x["samples_per_s"] for x in runs[n])
                                   for n in names},
          "runs": runs, "ratios": ratios, "ddp_beats": beats,
          "verdict": "; ".join(f"2 ranks x 1 thread vs {b}: {_word(ratios[f'2x1_over_{b}'])}"
                               for b in ("1x1", "1x2")),
          "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()
