"""Early exits that really stop: batch-1 latency in ONNX Runtime against the static model.

For a CNN (zoo ResNet-20) and a transformer (zoo ViT, exits on the class token) trained on
builtin:mnist, the ``early_exit`` stage trains exit heads (frozen backbone, self-distilled
from the final logits) and picks thresholds on a validation split held out of the training
data so that top-1 drops by at most 0.5 points there. Then, on the test split:

- top-1 of the static model and of the dynamic one, the exit distribution, each exit's top-1;
- mean MACs per sample against the static model;
- batch-1 latency of the exported chain (:class:`slimkit.exit.runner.EarlyExitRunner`)
  against the static model's ONNX file, sample by sample, the two interleaved in one process
  (their order alternating every round); the speedup is the median over rounds of the ratio
  of the round means, with a distribution-free 95% interval (:func:`slimkit.measure.ratio_ci`).

Run under the shared lock: ``flock /tmp/slimkit-bench.lock .venv/bin/python
benchmarks/early_exit.py``; writes ``benchmarks/results/early_exit.json``.
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

from slimkit.core.seed import seed_everything
from slimkit.core.stages import StageContext
from slimkit.data.load import load_data
from slimkit.exit.config import EarlyExitConfig
from slimkit.exit.measure import onnx_latency
from slimkit.exit.stage import early_exit
from slimkit.io.loader import load_zoo
from slimkit.train.config import TrainConfig
from slimkit.train.loop import evaluate_data, fit

OUT = Path(__file__).parent / "results" / "early_exit.json"
MODELS = {
    "resnet20": ({}, TrainConfig(epochs=3, lr=3e-3, batch_size=64)),
    "vit": ({"dim": 128, "depth": 6, "heads": 4}, TrainConfig(epochs=6, lr=1e-3, batch_size=64)),
}


def run_one(name: str, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    kwargs, train = MODELS[name]
    if args.baseline_epochs is not None:
        train = train.model_copy(update={"epochs": args.baseline_epochs})
    seed_everything(0)
    model = load_zoo(name, input_shape=data.input_shape, num_classes=data.num_classes, **kwargs)
    torch.set_num_threads(args.train_threads)
    start = time.perf_counter()
    fit(model.module, data, train, progress=False)
    trained_s = time.perf_counter() - start
    static_top1 = evaluate_data(model.module, data)
    cfg = EarlyExitConfig(max_drop=args.max_drop, latency_samples=0,
                          train=TrainConfig(epochs=args.head_epochs, lr=3e-3, batch_size=64))
    start = time.perf_counter()
    out, record = early_exit(model, cfg, StageContext(data=data, progress=False))
    stage_s = time.perf_counter() - start
    d = record.details
    if not d.get("test"):
        return {"model": name, "skipped": record.skipped, "static_top1_test": static_top1}
    torch.set_num_threads(1)
    x = data.head("test", args.samples)[0]
    latency = onnx_latency(out, model.module, x, rounds=args.rounds, threads=1)
    test = d["test"]
    drop = 100 * (test["static_top1"] - test["top1"])
    return {
        "model": name, "zoo_kwargs": kwargs, "baseline_train": train.model_dump(),
        "seconds": {"baseline_train": trained_s, "early_exit_stage": stage_s},
        "exits": [e["block"] for e in d["exits"]], "pooling": [e["pool"] for e in d["exits"]],
        "thresholds": d["thresholds"], "confidence": cfg.confidence,
        "max_drop_points_val": d["max_drop"],
        "val": d["val"], "test": test,
        "top1_drop_points_test": drop,
        "mean_macs_ratio_test": d["costs"]["mean_macs_ratio_test"],
        "path_macs": d["costs"]["path_macs"], "static_macs": d["costs"]["static_macs"],
        "latency_batch1_onnxruntime": latency,
        "speedup_mean_latency": latency["speedup"],
        "speedup_ci95": [1 / latency["time_ratio_ci95"][1], 1 / latency["time_ratio_ci95"][0]],
        "sweep": d["sweep"],
        "meets_target": bool(drop <= 0.5 and 1 / latency["time_ratio_ci95"][1] >= 1.5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--samples", type=int, default=300, help="test samples timed")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--train-threads", type=int, default=2)
    parser.add_argument("--data", default="builtin:mnist")
    parser.add_argument("--baseline-epochs", type=int, default=None,
                        help="override the baselines' training epochs (smoke runs)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = load_data(args.data)
    results = [run_one(name, data, args) for name in args.models]
    report = {
        "benchmark": "early_exit", "data": data.name, "n_train": data.n_train,
        "n_test": data.n_test, "target": {"max_drop_points": 0.5, "min_speedup": 1.5},
        "timing": {"runtime": "onnxruntime", "batch": 1, "ort_threads": 1,
                   "torch_threads_timing": 1, "torch_threads_train": args.train_threads,
                   "samples": args.samples, "rounds": args.rounds},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "onnxruntime": onnxruntime.__version__, "machine": platform.machine()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for r in results:
        if "speedup_mean_latency" in r:
            print(f"{r['model']}: top-1 drop {r['top1_drop_points_test']:.2f} pt, mean MACs "
                  f"{r['mean_macs_ratio_test']:.1%}, batch-1 ORT speedup "
                  f"{r['speedup_mean_latency']:.2f}x (95% CI {r['speedup_ci95'][0]:.2f}-"
                  f"{r['speedup_ci95'][1]:.2f}), exits {r['test']['exit_fraction']}")
        else:
            print(f"{r['model']}: skipped: {r['skipped']}")


if __name__ == "__main__":
    main()
