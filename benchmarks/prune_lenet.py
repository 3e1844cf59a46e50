"""Pruning figures of Han et al. 2015 ("Learning both Weights and Connections", Tables 1-3)
on full Fashion-MNIST (``builtin:fashion-mnist``: 54,000 train / 6,000 validation held out of
training / 10,000 test).

For LeNet-300-100 and LeNet-5: train a baseline on the training split (epochs and checkpoint
chosen on the validation split: early stopping, best epoch restored; the same baseline as
deep_compression.py), then prune it to the paper's per-layer kept fractions with gradual
magnitude pruning (slimkit.prune.schedule: Zhu & Gupta's cubic schedule, masks held fixed
between pruning steps) inside retraining. Nothing else is chosen: the densities are the
paper's, the retraining length is fixed in advance. Training and pruning see the data with its
test split hidden (slimkit.data.guard.hide_test); the test split is read once, at the end.

Criteria (per model): the pruned model keeps at most 8.5% of the weights (the paper: 8%, 12x
fewer), and its test error is within the baseline's: not worse beyond noise on the same
10,000 test images (exact McNemar; worse at p < 0.05 fails). Accuracies carry Wilson 95%
intervals. The paper's figures are on MNIST, a different (easier) task: a reference, not the
same experiment. Prints JSON and saves benchmarks/results/prune_lenet.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _common import data_record, emit, paired_difference, top1_with_ci  # noqa: I001
from deep_compression import CLAIM_NOTE, load, train_baseline, val_top1

from slimkit.core.files import write_json
from slimkit.core.stages import StageContext
from slimkit.data.bundle import DataBundle
from slimkit.data.guard import hide_test
from slimkit.distill.run import FinetuneConfig
from slimkit.prune.schedule import GradualPruneConfig, gradual_prune

RESULTS = Path(__file__).parent / "results" / "prune_lenet.json"
# Han et al. 2015, Tables 1-3: kept weights per layer, totals, errors (MNIST, 60k train).
PAPER = {
    "lenet300": {"keep": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}, "params": "267K -> 22K",
                 "kept_fraction": 0.08, "compression": 12, "baseline_error": 1.64,
                 "pruned_error": 1.59},
    "lenet5": {"keep": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19},
               "params": "431K -> 36K", "kept_fraction": 0.08, "compression": 12,
               "baseline_error": 0.80, "pruned_error": 0.77},
}
MAX_KEPT = 0.085


def prune(model: Any, view: DataBundle, keep: dict[str, float], args: argparse.Namespace
          ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Gradual magnitude pruning of ``model`` to ``keep`` (or one global threshold)."""
    cfg = GradualPruneConfig(
        final_sparsity=1.0 - args.global_keep, scope=args.scope, frequency=args.frequency,
        ramp_fraction=args.ramp,
        layer_sparsity=({k: 1.0 - v for k, v in keep.items()} if args.scope == "layer" else {}),
        include=list(keep),
        train=FinetuneConfig(epochs=args.prune_epochs, lr=args.lr, batch_size=args.batch_size,
                             weight_decay=args.weight_decay, seed=args.seed + 1))
    out, rec = gradual_prune(model, cfg, StageContext(data=view, progress=False))
    return out.module, rec.details


def run(name: str, data: DataBundle, args: argparse.Namespace) -> dict[str, Any]:
    """One model: baseline (chosen on validation), pruning, then the test split once."""
    paper = PAPER[name]
    start = time.perf_counter()
    view = hide_test(data)
    model, training = train_baseline(name, view, args)
    pruned, details = prune(model, view, paper["keep"], args)
    layers = details["layers"]
    weights = sum(v["numel"] for v in layers.values())
    kept = sum(v["numel"] * (1 - v["sparsity_after"]) for v in layers.values())
    params = sum(p.numel() for p in pruned.parameters())
    nonzero_params = sum(int(torch.count_nonzero(p)) for p in pruned.parameters())
    val_base, val_pruned = val_top1(model.module, view), val_top1(pruned, view)
    # No choice is left: the test split is read once, from here on.
    base, base_hit = top1_with_ci(model.module, data.x_test, data.y_test)
    test, hit = top1_with_ci(pruned, data.x_test, data.y_test)
    paired = paired_difference(hit, base_hit)
    worse = paired["differs"] and test["value"] < base["value"]
    criteria = {"kept": f"<= {MAX_KEPT:.1%} of the weights", "kept_met": kept / weights <= MAX_KEPT,
                "error": "pruned model not worse than the baseline beyond noise on the test "
                         "split (exact McNemar, worse at p < 0.05 fails)",
                "error_met": not worse}
    return {
        "paper": dict(paper),
        "baseline": {"training": training, "val": val_base, "test": base,
                     "test_error": 100 * (1 - base["value"])},
        "pruned": {"val": val_pruned, "test": test, "test_error": 100 * (1 - test["value"])},
        "error_increase_points": 100 * (base["value"] - test["value"]),
        "pruned_vs_baseline": paired,
        "kept_fraction_weights": kept / weights, "compression_weights": weights / kept,
        "params": params, "nonzero_params": nonzero_params,
        "kept_fraction_params": nonzero_params / params,
        "per_layer_kept": {n: 1 - v["sparsity_after"] for n, v in layers.items()},
        "schedule": {"num_updates": details["schedule"]["num_updates"],
                     "total_steps": details["schedule"]["total_steps"],
                     "followed": [{k: round(v, 5) for k, v in f.items()}
                                  for f in details["schedule"]["followed"]]},
        "criteria": criteria, "met": bool(criteria["kept_met"] and criteria["error_met"]),
        "seconds": time.perf_counter() - start,
    }


def summary_line(name: str, m: dict[str, Any]) -> str:
    b, t, mc = m["baseline"]["test"], m["pruned"]["test"], m["pruned_vs_baseline"]
    return (f"{name}: kept {m['kept_fraction_weights']:.1%} of weights "
            f"({m['compression_weights']:.1f}x; paper 8%, 12x), test top-1 "
            f"{100 * t['value']:.2f}% [{100 * t['ci95'][0]:.2f}, {100 * t['ci95'][1]:.2f}] vs "
            f"baseline {100 * b['value']:.2f}% [{100 * b['ci95'][0]:.2f}, "
            f"{100 * b['ci95'][1]:.2f}] (McNemar {mc['a_only']} vs {mc['b_only']} images, "
            f"p = {mc['p_value']:.3g}); paper (MNIST) error {m['paper']['pruned_error']}% vs "
            f"{m['paper']['baseline_error']}%: {'MET' if m['met'] else 'NOT MET'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20,
                    help="baseline: most epochs; the epoch kept is chosen on validation")
    ap.add_argument("--patience", type=int, default=2, help="baseline early stopping")
    ap.add_argument("--prune-epochs", type=int, default=10,
                    help="retraining epochs the pruning schedule runs inside")
    ap.add_argument("--frequency", type=int, default=40, help="steps between pruning steps")
    ap.add_argument("--ramp", type=float, default=0.6,
                    help="fraction of the retraining the schedule spans")
    ap.add_argument("--scope", choices=["layer", "global"], default="layer",
                    help="layer: the paper's per-layer kept fractions; global: one threshold")
    ap.add_argument("--global-keep", type=float, default=0.08,
                    help="kept fraction for scope=global")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", choices=list(PAPER), default=list(PAPER))
    ap.add_argument("--smoke", type=int, default=None, metavar="N",
                    help="smoke test: train on N images only, write nothing")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load(args.smoke)
    models = {name: run(name, data, args) for name in args.models}
    result = {"benchmark": "prune_lenet", "data": data_record(data), "seeds": [args.seed],
              "claim_note": CLAIM_NOTE,
              "test_split": "read once, after training and pruning, which saw the data with "
                            "its test split hidden (slimkit.data.guard.hide_test)",
              "settings": vars(args) | {"optimizer": "adam, cosine schedule",
                                        "pruner": "gradual_prune (AGP cubic schedule)",
                                        "densities": "the paper's (Han et al. 2015 Table 1-2)"},
              "models": models, "summary": [summary_line(n, m) for n, m in models.items()],
              "met": all(m["met"] for m in models.values()),
              "seconds": time.perf_counter() - start}
    emit(result)
    if not (args.no_save or args.smoke):
        write_json(RESULTS, result)


if __name__ == "__main__":
    main()
