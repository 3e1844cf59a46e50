"""Early exits that really stop: batch-1 latency in ONNX Runtime against the static model.

For a CNN (zoo ResNet-20) and a transformer (zoo ViT, exits on the class token) trained on
full-size Fashion-MNIST (``builtin:fashion-mnist``: 54,000 train / 6,000 validation held out
of training / 10,000 test), the ``early_exit`` stage trains exit heads (frozen backbone,
self-distilled from the final logits) and picks one threshold per exit on the 6,000
validation images so that the one-sided 95% upper confidence bound of the top-1 drop
(Newcombe's paired interval, the stage's ``margin: ci95``) stays within 0.5 points. The stage
never sees the test split (``hide_test``). Baselines train three epochs, the heads four.
The stage runs once per head kind (``linear``: pooling + Linear; ``conv``: a stride-2 conv
first, on conv maps, so ResNet-20 only: ViT's token features take the linear head); the run
kept is the one with the higher batch-1 ONNX Runtime speedup on 300 validation images. The
previous runs (one baseline epoch, linear heads, the chain of ONNX steps) are kept as
``results/early_exit_heads1.json`` and in git history. The test split is read once per
model, at the end, for:

- top-1 of the static model and of the dynamic one with Wilson 95% intervals, the drop with
  its paired 95% interval (Newcombe) and the exact McNemar test, the exit distribution, each
  exit's top-1;
- mean MACs per sample against the static model;
- batch-1 latency of the exported early exit (``early_exit.onnx``, one ONNX Runtime call with
  ``If`` nodes, through :class:`slimkit.exit.runner.EarlyExitRunner`) against the static
  model's ONNX file, sample by sample, the two interleaved in one process (their order
  alternating every round); the speedup is the median over rounds of the ratio of the round
  means, with a distribution-free 95% interval (:func:`slimkit.measure.ratio_ci`).

The goal (issue 20): at <= 0.5 point top-1 drop on test, a batch-1 speedup whose 95%
interval lies at or above 1.5x.

Run under the shared lock: ``flock /tmp/slimkit-bench.lock .venv/bin/python
benchmarks/early_exit.py``; writes ``benchmarks/results/early_exit.json``. Smoke run:
``--smoke`` (a few hundred steps, a few timed samples; writes to /tmp unless ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import onnxruntime
import torch
from _common import data_record, paired_difference, top1_with_ci  # noqa: I001

from slimkit.core.seed import seed_everything
from slimkit.core.stages import StageContext
from slimkit.data.guard import hide_test
from slimkit.data.load import load_data
from slimkit.exit import calibrate as C
from slimkit.exit.config import EarlyExitConfig
from slimkit.exit.measure import onnx_latency
from slimkit.exit.model import EarlyExitModel
from slimkit.exit.stage import early_exit
from slimkit.io.loader import load_zoo
from slimkit.train.config import TrainConfig
from slimkit.train.loop import fit

OUT = Path(__file__).parent / "results" / "early_exit.json"
HEADS = {"resnet20": ["linear", "conv"], "vit": ["linear"]}  # conv heads need conv maps
MAX_DROP = 0.5
MIN_SPEEDUP = 1.5
MODELS = {
    "resnet20": ({}, TrainConfig(epochs=3, lr=3e-3, batch_size=64)),
    "vit": ({"dim": 128, "depth": 6, "heads": 4}, TrainConfig(epochs=3, lr=1e-3, batch_size=64)),
}


def paired_drop(static: torch.Tensor, dynamic: torch.Tensor) -> dict[str, Any]:
    """The top-1 drop (points) of ``dynamic`` against ``static`` on the same samples, with
    Newcombe's paired 95% interval and the exact McNemar test."""
    s, d = static.bool(), dynamic.bool()
    a, b, c, e = (int(v.sum()) for v in (s & d, s & ~d, ~s & d, ~s & ~d))
    hi = C.paired_drop_upper(a, b, c, e, 0.975)
    lo = -C.paired_drop_upper(a, c, b, e, 0.975)
    return {"points": 100 * (b - c) / len(s), "ci95_points": [100 * lo, 100 * hi],
            "static_only_right": b, "dynamic_only_right": c,
            "method": "Newcombe paired (method 10)", "mcnemar": paired_difference(s, d)}


def run_one(name: str, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    kwargs, train = MODELS[name]
    if args.smoke:
        train = train.model_copy(update={"max_steps": 60})
    seed_everything(0)
    model = load_zoo(name, input_shape=data.input_shape, num_classes=data.num_classes, **kwargs)
    torch.set_num_threads(args.train_threads)
    start = time.perf_counter()
    fit(model.module, data, train, progress=False)
    trained_s = time.perf_counter() - start
    heads = TrainConfig(epochs=args.head_epochs, lr=3e-3, batch_size=64,
                        max_steps=60 if args.smoke else None)
    # One stage per head kind; the one kept is the fastest on validation samples (batch-1
    # ONNX Runtime time, interleaved with the static model), before the test split is read.
    x_val = data.x_val[:args.samples]
    candidates = []
    for head in [h for h in args.heads if h in HEADS[name]]:
        cfg = EarlyExitConfig(max_drop=MAX_DROP, margin=args.margin, latency_samples=0,
                              train=heads, head=head)
        start = time.perf_counter()
        out, record = early_exit(model, cfg, StageContext(data=hide_test(data),
                                                          progress=False))
        stage_s = time.perf_counter() - start
        row = {"head": head, "out": out, "record": record, "cfg": cfg,
               "seconds_stage": stage_s, "margin": record.details.get("margin"),
               "val": record.details.get("val"), "skipped": record.skipped}
        if isinstance(out.module, EarlyExitModel):  # else the stage kept the static model
            torch.set_num_threads(1)
            lat = onnx_latency(out, model.module, x_val, rounds=args.val_rounds, threads=1)
            torch.set_num_threads(args.train_threads)
            row["val_latency_batch1"] = lat
        candidates.append(row)
    timed = [c for c in candidates if "val_latency_batch1" in c]
    chosen = max(timed, key=lambda c: c["val_latency_batch1"]["speedup"], default=None)
    base = {"model": name, "zoo_kwargs": kwargs, "baseline_train": train.model_dump(),
            "heads_train": heads.model_dump(),
            "candidates": [{k: v for k, v in c.items() if k not in ("out", "record", "cfg")}
                           for c in candidates],
            "chosen_on": "validation: batch-1 ONNX Runtime speedup on "
                         f"{len(x_val)} validation samples",
            "seconds": {"baseline_train": trained_s,
                        "early_exit_stages": sum(c["seconds_stage"] for c in candidates)}}
    if chosen is None:
        static, _ = top1_with_ci(model.module.eval(), data.x_test, data.y_test)
        return {**base, "skipped": [c["skipped"] for c in candidates],
                "static_top1_test": static, "meets_target": False}
    out, record, cfg = chosen["out"], chosen["record"], chosen["cfg"]
    d = record.details
    base.update(head=chosen["head"], margin=d.get("margin"))
    # The test split, read after every choice: top-1s with intervals, the paired drop.
    static, s_hit = top1_with_ci(model.module.eval(), data.x_test, data.y_test)
    dynamic, d_hit = top1_with_ci(out.module.eval(), data.x_test, data.y_test)
    drop = paired_drop(s_hit, d_hit)
    torch.set_num_threads(1)
    x = data.head("test", args.samples)[0]
    latency = onnx_latency(out, model.module, x, rounds=args.rounds, threads=1)
    speed_ci = [1 / latency["time_ratio_ci95"][1], 1 / latency["time_ratio_ci95"][0]]
    # The exit distribution and per-exit top-1 on test, at the validation-chosen thresholds.
    test = C.summarize(C.gather(out.module, data.batches("test")), out.module.thresholds,
                       d["costs"]["path_macs"])
    return {
        **base,
        "exits": [e["block"] for e in d["exits"]], "pooling": [e["pool"] for e in d["exits"]],
        "closed_exits": d.get("closed_exits", []),
        "thresholds": d["thresholds"], "confidence": cfg.confidence,
        "max_drop_points_val": d["max_drop"], "val": d["val"], "test": test,
        "static_top1_test": static, "dynamic_top1_test": dynamic, "top1_drop_test": drop,
        "mean_macs_ratio_test": test["mean_cost"] / max(d["costs"]["static_macs"], 1),
        "path_macs": d["costs"]["path_macs"], "static_macs": d["costs"]["static_macs"],
        "latency_batch1_onnxruntime": latency, "speedup_mean_latency": latency["speedup"],
        "speedup_ci95": speed_ci, "sweep_val": d["sweep"],  # the stage's, on validation
        "meets_drop": drop["points"] <= MAX_DROP, "meets_speedup": speed_ci[0] >= MIN_SPEEDUP,
        "meets_target": bool(drop["points"] <= MAX_DROP and speed_ci[0] >= MIN_SPEEDUP),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--samples", type=int, default=300, help="test samples timed")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--head-epochs", type=int, default=4,
                        help="epochs of the exit heads (frozen backbone)")
    parser.add_argument("--margin", default="ci95", help="the stage's margin (ci95 or none)")
    parser.add_argument("--heads", nargs="+", default=["linear", "conv"],
                        choices=["linear", "conv"],
                        help="head kinds tried; the fastest on validation is kept")
    parser.add_argument("--val-rounds", type=int, default=3,
                        help="interleaved timing rounds on validation samples (the choice)")
    parser.add_argument("--train-threads", type=int, default=2)
    parser.add_argument("--data", default="builtin:fashion-mnist")
    parser.add_argument("--smoke", action="store_true",
                        help="60 training steps each, 20 timed samples (checks the script)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.rounds = min(args.samples, 20), min(args.rounds, 2)
    out_path = args.out or (Path("/tmp/early_exit_smoke.json") if args.smoke else OUT)
    data = load_data(args.data)
    if getattr(data, "y_val", None) is None:
        from slimkit.data.split import hold_out_validation

        data = hold_out_validation(data, 0.1, seed=0)
    if args.smoke:  # a slice of every split: the script runs end to end in a minute
        from slimkit.data.bundle import DataBundle

        data = DataBundle(data.name + " (smoke slice)", data.x_train[:2000], data.y_train[:2000],
                          data.x_test[:500], data.y_test[:500], data.num_classes,
                          x_val=data.x_val[:600], y_val=data.y_val[:600], meta=dict(data.meta))
    start = time.perf_counter()
    results = [run_one(name, data, args) for name in args.models]
    report = {
        "benchmark": "early_exit", "data": data_record(data), "smoke": args.smoke,
        "target": {"max_drop_points": MAX_DROP, "min_speedup": MIN_SPEEDUP,
                   "speedup_judged_on": "lower end of the 95% interval",
                   "thresholds_chosen_on": "validation (6,000 held out of training)"},
        "timing": {"runtime": "onnxruntime", "batch": 1, "ort_threads": 1,
                   "torch_threads_timing": 1, "torch_threads_train": args.train_threads,
                   "samples": args.samples, "rounds": args.rounds},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "onnxruntime": onnxruntime.__version__, "machine": platform.machine()},
        "seconds_total": time.perf_counter() - start,
        "results": results,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    for r in results:
        if "speedup_mean_latency" in r:
            dr = r["top1_drop_test"]
            print(f"{r['model']}: top-1 {r['static_top1_test']['value']:.2%} -> "
                  f"{r['dynamic_top1_test']['value']:.2%}, drop {dr['points']:.2f} pt "
                  f"[{dr['ci95_points'][0]:.2f}, {dr['ci95_points'][1]:.2f}] (McNemar p "
                  f"{dr['mcnemar']['p_value']:.3g}), mean MACs {r['mean_macs_ratio_test']:.1%}, "
                  f"batch-1 ORT speedup {r['speedup_mean_latency']:.2f}x "
                  f"[{r['speedup_ci95'][0]:.2f}, {r['speedup_ci95'][1]:.2f}], exits "
                  f"{[round(f, 3) for f in r['test']['exit_fraction']]}, target "
                  f"{'met' if r['meets_target'] else 'NOT met'}")
        else:
            print(f"{r['model']}: skipped: {r['skipped']}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
