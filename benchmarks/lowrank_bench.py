"""Low-rank factorization of a zoo CNN and the zoo ViT, fine-tuned, against plain truncated SVD.

CNN: zoo:lenet5 trained on builtin:mnist; conv2 and fc1 are factorized (conv1 has one input
channel and fc2 is the 10-way classifier, both left dense) with the ``ratio`` rule, once with
Tucker-2 for the conv (Kim et al. 2016) and once with plain truncated SVD of the kernel reshaped
to (C_out, C_in·k·k) (k×k conv to ``rank`` channels + 1x1 conv) at the same parameter budget;
fc1 uses SVD in both. Transformer: zoo:vit (dim 64) trained on builtin:mnist; every Linear of
the encoder blocks is factorized by truncated SVD. Each factorized model is fine-tuned briefly,
distilled from the original (Hinton et al. 2015 logit KD).

A conv-only sweep also factorizes conv2 alone with every conv factorizer (tucker2, cp,
spatial, svd) at one tighter budget and reports accuracy without fine-tuning, where the
differences between the schemes are not hidden by fine-tuning. A control trains the original
for the fine-tuning epochs too, so "fine-tuning recovered the accuracy" can be told apart from
"the baseline was still undertrained".

Reported: parameters of the factorized layers before/after, accuracy before and after (raw and
fine-tuned), latency ratios original/factorized in PyTorch eager and ONNX Runtime (batch 1 and
32, one thread), and whether each criterion of issue #6 is met. Prints JSON and saves it to
benchmarks/results/lowrank_bench.json.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import emit  # noqa: I001
from torch import nn

from slimkit.core.files import write_json
from slimkit.core.stages import StageContext
from slimkit.data import load_data
from slimkit.data.bundle import DataBundle
from slimkit.distill.config import DistillConfig
from slimkit.distill.run import FinetuneConfig
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.lowrank import LowRankConfig, lowrank
from slimkit.measure import compare_latency
from slimkit.train import TrainConfig, evaluate, fit

RESULTS = Path(__file__).parent / "results" / "lowrank_bench.json"


def train(name: str, data: DataBundle, epochs: int, lr: float, **kwargs: Any) -> SlimModel:
    torch.manual_seed(0)
    model = load_zoo(name, data, **kwargs)
    fit(model.module, data, TrainConfig(epochs=epochs, lr=lr), progress=False)
    model.module.eval()
    return model


def factorize(model: SlimModel, data: DataBundle, cfg: LowRankConfig,
              ft_epochs: int, ft_lr: float) -> dict[str, Any]:
    """Factorize, evaluate raw, fine-tune (distilled from the original), evaluate again."""
    start = time.perf_counter()
    ctx = StageContext(data=data, progress=False)
    raw = lowrank(model, cfg, ctx)[0].module
    ft_cfg = FinetuneConfig(epochs=ft_epochs, lr=ft_lr, distill=DistillConfig())
    out, rec = lowrank(model, cfg.model_copy(update={"finetune": ft_cfg}), ctx)
    tuned = out.module
    tuned.eval()
    totals = rec.details["totals"]
    return {
        "module": tuned,
        "ranks": {n: r["rank"] for n, r in rec.details["layers"].items()},
        "mean_rel_error": sum(r["rel_error"] for r in rec.details["layers"].values())
        / max(1, len(rec.details["layers"])),
        "factorized_params_before": totals["factorized_params_before"],
        "factorized_params_after": totals["factorized_params_after"],
        "factorized_params_ratio": totals["factorized_params_before"]
        / totals["factorized_params_after"],
        "model_params_before": totals["model_params_before"],
        "model_params_after": totals["model_params_after"],
        "model_flops_ratio": totals["model_flops_before"] / totals["model_flops_after"],
        "top1_raw": evaluate(raw, data.x_test, data.y_test),
        "top1_finetuned": evaluate(tuned, data.x_test, data.y_test),
        "seconds": time.perf_counter() - start,
    }


def latency(original: SlimModel, variants: dict[str, nn.Module], data: DataBundle,
            repeats: int) -> dict[str, Any]:
    """Original/variant latency ratios (> 1: the variant is faster), torch and ORT, 1 thread."""
    with tempfile.TemporaryDirectory() as tmp:
        models, parity = {}, {}
        for label, module in {"original": original.module, **variants}.items():
            slim = original.copy(module)
            slim.arch = None
            path = export_onnx(slim, Path(tmp) / f"{label}.onnx")
            parity[label] = check_parity(slim, path, (data.x_test[:8],))["max_abs_diff"]
            models[label] = (module, path)
        lat = compare_latency(models, (data.x_test[:32],), batch_sizes=(1, 32), threads=1,
                              warmup=3, repeats=repeats)
    out: dict[str, Any] = {"onnx_parity_max_abs_diff": parity, "threads": 1}
    for label in variants:
        out[label] = {rt: {b: lat[rt][b]["original"]["median_ms"] / lat[rt][b][label]["median_ms"]
                           for b in lat[rt]} for rt in ("torch", "onnxruntime")}
    out["median_ms"] = {rt: {b: {k: v["median_ms"] for k, v in lat[rt][b].items()}
                             for b in lat[rt]} for rt in ("torch", "onnxruntime")}
    return out


def continued(model: SlimModel, data: DataBundle, epochs: int, lr: float) -> float:
    """Control: the original trained for the fine-tuning budget too (is fine-tuning just
    more training?). Returns its top-1."""
    module = copy.deepcopy(model.module)
    fit(module, data, TrainConfig(epochs=epochs, lr=lr), progress=False)
    return evaluate(module, data.x_test, data.y_test)


def judge(base: float, control: float, result: dict[str, Any]) -> dict[str, Any]:
    drop = 100 * (base - result["top1_finetuned"])
    return {"accuracy_drop_points": drop, "accuracy_drop_at_most_1_point": drop <= 1.0,
            "accuracy_drop_vs_control_points": 100 * (control - result["top1_finetuned"]),
            "factorized_layers_at_least_2x_fewer_params": result["factorized_params_ratio"] >= 2}


def conv_sweep(model: SlimModel, data: DataBundle, ratio: float) -> dict[str, Any]:
    """Every conv factorizer on conv2 alone at one budget, without fine-tuning."""
    out = {}
    for conv in ("tucker2", "cp", "spatial", "svd"):
        cfg = LowRankConfig(conv=conv, rank="ratio", ratio=ratio, include=["conv2"])
        small, rec = lowrank(model, cfg, StageContext(data=data, progress=False))
        row = rec.details["layers"]["conv2"]
        out[conv] = {"rank": row["rank"], "params_after": row["params_after"],
                     "params_before": row["params_before"], "rel_error": row["rel_error"],
                     "top1_raw": evaluate(small.module, data.x_test, data.y_test)}
    return out


def cnn_case(args: argparse.Namespace, data: DataBundle) -> dict[str, Any]:
    model = train("lenet5", data, args.cnn_epochs, 2e-3)
    base = evaluate(model.module, data.x_test, data.y_test)
    common = {"rank": "ratio", "ratio": args.cnn_ratio, "include": ["conv2", "fc1"]}
    runs = {conv: factorize(model, data, LowRankConfig(conv=conv, **common), args.ft_epochs,
                            args.ft_lr) for conv in ("tucker2", "svd")}
    lat = latency(model, {k: r.pop("module") for k, r in runs.items()}, data, args.repeats)
    control = continued(model, data, args.ft_epochs, args.ft_lr)
    return {"model": "zoo:lenet5", "data": data.name, "top1_before": base,
            "top1_control_original_trained_ft_epochs_more": control, "config": common,
            "tucker2": {**runs["tucker2"], **judge(base, control, runs["tucker2"])},
            "plain_svd_same_budget": {**runs["svd"], **judge(base, control, runs["svd"])},
            "conv2_only_no_finetune": conv_sweep(model, data, args.sweep_ratio),
            "latency_ratio_original_over_factorized": lat}


def vit_case(args: argparse.Namespace, data: DataBundle) -> dict[str, Any]:
    model = train("vit", data, args.vit_epochs, 2e-3, dim=64, depth=4)
    base = evaluate(model.module, data.x_test, data.y_test)
    cfg = {"rank": "ratio", "ratio": args.vit_ratio, "include": [r"re:blocks\..*"]}
    run = factorize(model, data, LowRankConfig(**cfg), args.ft_epochs, args.ft_lr)
    lat = latency(model, {"svd": run.pop("module")}, data, args.repeats)
    control = continued(model, data, args.ft_epochs, args.ft_lr)
    return {"model": "zoo:vit(dim=64, depth=4)", "data": data.name, "top1_before": base,
            "top1_control_original_trained_ft_epochs_more": control,
            "config": cfg, "svd": {**run, **judge(base, control, run)},
            "latency_ratio_original_over_factorized": lat}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cnn-epochs", type=int, default=5)
    ap.add_argument("--vit-epochs", type=int, default=20)
    ap.add_argument("--cnn-ratio", type=float, default=0.25)
    ap.add_argument("--vit-ratio", type=float, default=0.4)
    ap.add_argument("--sweep-ratio", type=float, default=0.1,
                    help="Budget of the conv2-only comparison of all conv factorizers.")
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="Torch threads for training (latency is always timed on one thread).")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    # On a shared 2-core machine two intra-op threads made training ~10x slower than one.
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_data("builtin:mnist", seed=0)
    cnn, vit = cnn_case(args, data), vit_case(args, data)
    met = {
        "cnn_tucker2_2x_fewer_params": cnn["tucker2"]["factorized_layers_at_least_2x_fewer_params"],
        "cnn_tucker2_drop_le_1pt": cnn["tucker2"]["accuracy_drop_at_most_1_point"],
        "vit_svd_2x_fewer_params": vit["svd"]["factorized_layers_at_least_2x_fewer_params"],
        "vit_svd_drop_le_1pt": vit["svd"]["accuracy_drop_at_most_1_point"],
    }
    result = {"benchmark": "lowrank_bench", "settings": vars(args), "cnn": cnn,
              "transformer": vit, "criteria": met, "all_met": all(met.values()),
              "seconds": time.perf_counter() - start}
    emit(result)
    if not args.no_save:
        write_json(RESULTS, result)


if __name__ == "__main__":
    main()
