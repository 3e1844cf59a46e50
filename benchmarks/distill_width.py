"""A zoo CNN made ~50% smaller in FLOPs by width, trained with and without distillation, per
seed, with every choice made on a validation split.

Data: builtin:mnist1d (its own 4,000 / 1,000 split); ``--val-fraction`` of the 4,000 training
signals (class-stratified, seed 0) is held out of training as the validation split (default
3,200 train / 800 validation / 1,000 test). Everything trains on a view of the data whose test
split cannot be read (:func:`slimkit.data.guard.hide_test`); the test split is read once, at
the end.

Teacher: zoo:resnet20 (width 16). Student: resnet20 at width 11 ((11/16)^2 = 47% of the
FLOPs). Every model keeps the epoch with the best validation top-1 (the checkpoint is chosen
on validation). The distillation settings (temperature x feature loss: logit KD alone, or
plus FitNets hints at layer2/layer3) are chosen on validation, with a student seed of its own
that is not one of the evaluation seeds. Then, per seed, the plain student (cross-entropy)
and the distilled one train from the same initialization with the same data order.

Criterion, per seed (not on the mean): distilled top-1 >= plain top-1 on the test split, each
with its Wilson 95% interval and the exact McNemar test of the pair (``beyond noise`` at
p < 0.05). Across seeds: the sign test of the per-seed differences and a bootstrap interval of
their mean. Students train in ``--workers`` processes of one thread each. Prints JSON.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from _common import data_record, emit, paired_difference, top1_with_ci  # noqa: I001
from torch import nn

from slimkit.data import load_data
from slimkit.data.bundle import DataBundle
from slimkit.data.guard import hide_test
from slimkit.data.split import hold_out_validation
from slimkit.distill.config import DistillConfig, FeaturePair, LogitKD
from slimkit.distill.objective import build_objective
from slimkit.io.loader import load_zoo
from slimkit.measure import count_flops
from slimkit.measure.stats import bootstrap_ci
from slimkit.train import TrainConfig, fit
from slimkit.train.config import EarlyStopping

_DATA: dict[str, Any] = {}  # each worker's view of the data (no test split)


def load(args: argparse.Namespace) -> DataBundle:
    """The full bundle: mnist1d's own split with a validation split held out of training."""
    return hold_out_validation(load_data(args.data, seed=0), args.val_fraction, seed=0)


def _init_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _DATA["view"] = hide_test(load(args))


def keep_best(epochs: int) -> EarlyStopping:
    """Never stops within ``epochs``; ends on the epoch with the best validation top-1."""
    return EarlyStopping(patience=max(1, epochs), restore_best=True)


def kd_config(temperature: float, features: str, alpha: float) -> DistillConfig:
    pairs = [] if features == "none" else [
        FeaturePair(student=n, teacher=n, loss=features) for n in ("layer2", "layer3")]
    return DistillConfig(logits=LogitKD(temperature=temperature, alpha=alpha), features=pairs)


def student(data: DataBundle, width: int, seed: int) -> nn.Module:
    torch.manual_seed(100 + seed)
    return load_zoo("resnet20", data, width=width).module


def train_student(args: argparse.Namespace, seed: int, teacher: nn.Module | None,
                  kd: dict[str, Any] | None) -> dict[str, Any]:
    """One student (plain when ``kd`` is None), the best validation epoch kept."""
    data = _DATA.get("view") or hide_test(load(args))
    start = time.perf_counter()
    net = student(data, args.width, seed)
    cfg = TrainConfig(epochs=args.epochs, lr=2e-3, seed=seed,
                      early_stopping=keep_best(args.epochs))
    objective = None
    if kd is not None:
        objective = build_objective(net, teacher, kd_config(**kd), data.x_train[:2])
    hist = fit(net, data, cfg, objective=objective, progress=False)
    net.eval()
    vals = [e["val_top1"] for e in hist["epochs"]]
    return {"module": net, "val": top1_with_ci(net, data.x_val, data.y_val)[0],
            "val_top1_per_epoch": vals,
            "kept_epoch": 1 + max(range(len(vals)), key=vals.__getitem__),
            "seconds": time.perf_counter() - start}


def train_teacher(args: argparse.Namespace, data: DataBundle) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    teacher = load_zoo("resnet20", data).module
    hist = fit(teacher, data, TrainConfig(epochs=args.teacher_epochs, lr=2e-3,
                                          early_stopping=keep_best(args.teacher_epochs)),
               progress=False)
    teacher.eval()
    vals = [e["val_top1"] for e in hist["epochs"]]
    return teacher, {"val_top1_per_epoch": vals,
                     "kept_epoch": 1 + max(range(len(vals)), key=vals.__getitem__)}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


class _Inline:
    """An executor that runs each task at once, in this process (``--workers 1``)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def submit(self, fn: Any, *args: Any) -> Any:
        from concurrent.futures import Future

        done: Future = Future()
        done.set_result(fn(*args))
        return done


def executor(args: argparse.Namespace) -> Any:
    if args.workers <= 1:
        return _Inline()
    return ProcessPoolExecutor(max_workers=args.workers, initializer=_init_worker,
                               initargs=(args,), mp_context=multiprocessing.get_context("spawn"))


def train_all(args: argparse.Namespace, teacher: nn.Module, seeds: list[int]
              ) -> tuple[list[dict], dict[str, Any], list[dict], list[dict]]:
    """The validation grid of distillation settings, then the plain and distilled students
    of every seed. Returns ``(grid rows, chosen settings, plain, distilled)``."""
    grid = [{"temperature": t, "features": f, "alpha": args.alpha}
            for t in _floats(args.temperatures) for f in args.feature_losses.split(",")]
    with executor(args) as pool:
        sel = [pool.submit(train_student, args, args.select_seed, teacher, kd) for kd in grid]
        plain = [pool.submit(train_student, args, s, None, None) for s in seeds]
        rows = [kd | {"val": f.result()["val"], "kept_epoch": f.result()["kept_epoch"]}
                for kd, f in zip(grid, sel, strict=True)]
        best = max(rows, key=lambda r: r["val"]["value"])  # ties: the first in grid order
        chosen = {k: best[k] for k in ("temperature", "features", "alpha")}
        distilled = [pool.submit(train_student, args, s, teacher, chosen) for s in seeds]
        return rows, chosen, [f.result() for f in plain], [f.result() for f in distilled]


def seed_row(seed: int, plain: dict, distilled: dict, data: DataBundle) -> dict[str, Any]:
    """One seed's test reading: both students with Wilson intervals, the McNemar test."""
    out: dict[str, Any] = {"seed": seed}
    hits = {}
    for label, run in (("plain", plain), ("distilled", distilled)):
        test, hits[label] = top1_with_ci(run["module"], data.x_test, data.y_test)
        out[label] = {k: run[k] for k in ("val", "val_top1_per_epoch", "kept_epoch")} | {
            "test": test}
    diff = out["distilled"]["test"]["value"] - out["plain"]["test"]["value"]
    test = paired_difference(hits["distilled"], hits["plain"])
    verdict = ("no difference (inside noise)" if not test["differs"] else
               "distilled better beyond noise" if diff > 0 else "distilled worse beyond noise")
    return out | {"difference_points": 100 * diff, "mcnemar_distilled_vs_plain": test,
                  "verdict": verdict, "met": diff >= 0}


def across_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sign test of the per-seed differences (ties dropped) and a bootstrap interval of
    their mean (points)."""
    diffs = [r["difference_points"] for r in rows]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = wins + losses
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n if n else 0.5
    mean, lo, hi = bootstrap_ci(diffs)
    return {"differences_points": diffs, "wins": wins, "ties": len(diffs) - n,
            "losses": losses, "sign_test_p": min(1.0, 2 * tail),
            "mean_difference_points": {"value": mean, "ci95": [lo, hi],
                                       "method": "percentile bootstrap over seeds"},
            "seeds_beyond_noise": sum(r["mcnemar_distilled_vs_plain"]["differs"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="builtin:mnist1d")
    ap.add_argument("--val-fraction", type=float, default=0.2,
                    help="Share of the training split held out as the validation split.")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=11)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--temperatures", default="2,4", help="chosen from on validation")
    ap.add_argument("--feature-losses", default="none,hint",
                    help="chosen from on validation: none (logit KD alone), hint, attention, "
                         "relational (also match layer2/layer3 features)")
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label loss")
    ap.add_argument("--select-seed", type=int, default=999)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)
    data = load(args)
    teacher, t_hist = train_teacher(args, hide_test(data))
    seeds = list(range(args.seeds))
    grid, chosen, plain, distilled = train_all(args, teacher, seeds)
    rows = [seed_row(s, p, d, data) for s, p, d in zip(seeds, plain, distilled, strict=True)]
    x1 = data.x_val[:1]
    flops = count_flops(plain[0]["module"], (x1,))["flops"] / count_flops(teacher, (x1,))["flops"]
    emit({"benchmark": "distill_width", "data": data_record(data), "seeds": seeds,
          "settings": vars(args) | {
              "teacher": "zoo:resnet20 width 16, seed 0", "student":
              f"zoo:resnet20 width {args.width}, init seed 100+s, data order seed s",
              "optimizer": "adam lr 2e-3, batch 64, cosine, fixed epochs",
              "chosen_on": "checkpoints (best validation epoch) and distillation settings on "
                           "validation; sizes and epochs fixed in advance"},
          "flops_ratio_student_over_teacher": flops,
          "teacher": t_hist | {"val": top1_with_ci(teacher, data.x_val, data.y_val)[0],
                               "test": top1_with_ci(teacher, data.x_test, data.y_test)[0]},
          "selection": {"on": "validation split", "student_seed": args.select_seed,
                        "chosen": chosen, "grid": grid},
          "per_seed": rows, "across_seeds": across_seeds(rows),
          "criterion": "per seed: distilled test top-1 >= plain test top-1",
          "met_seeds": sum(r["met"] for r in rows), "met": all(r["met"] for r in rows),
          "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()
