"""Automated search vs hand recipes at the same FLOPs budget, on a CNN and a transformer.

For each model (resnet20 and a small ViT, trained on sklearn digits, 8x8): the uniform hand
recipe (structured_prune to half the FLOPs, uniform allocation, one epoch of fine-tuning)
sets the FLOPs budget (the share it reaches); the existing global allocation is run at the
same target; then ``slimkit.search`` (NSGA-II on metric and ONNX Runtime latency, and the
AMC-style sampler, same trial budget) searches per-group ratios under that budget, the front
fine-tuned with the same epoch. Every choice is made on the validation split (20% of the
training images, held out: neither the baseline nor any fine-tuning trains on it); the test
split is read once per final model. All final models are timed in one interleaved ONNX Runtime run
(batch 32, one thread): latency ratios to the uniform recipe with 95% intervals. Accuracy
differences to the uniform recipe are paired (McNemar). Saves benchmarks/results/
search_compare.json.

Run: flock /tmp/slimkit-bench.lock .venv/bin/python benchmarks/search_compare.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import emit, paired_difference, top1_with_ci  # noqa: I001

from slimkit.core.files import write_json
from slimkit.export.onnx import export_onnx
from slimkit.io.loader import load_zoo
from slimkit.measure import compare_latency, ratio_ci
from slimkit.measure.counts import count_flops
from slimkit.pipeline.recipe import load_recipe
from slimkit.search.objective import build
from slimkit.search.run import search
from slimkit.train.loop import TrainConfig, fit

RESULTS = Path(__file__).parent / "results" / "search_compare.json"
MODELS = {"resnet20": {}, "vit": {"patch_size": 2, "dim": 64, "depth": 4, "heads": 4}}
TRAIN = {"resnet20": TrainConfig(epochs=6, lr=2e-3), "vit": TrainConfig(epochs=30, lr=1e-3)}
FINETUNE = {"epochs": 1, "lr": 1e-3}


def digits() -> Any:
    from sklearn.datasets import load_digits

    from slimkit.data.bundle import DataBundle
    from slimkit.data.split import hold_out_validation

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    # A validation split held out of training (class-stratified, seed 0): the baseline and
    # every trial's fine-tuning never see the images the search chooses on.
    return hold_out_validation(
        DataBundle("sklearn-digits", x[:1400], y[:1400], x[1400:], y[1400:], 10), 0.2, seed=0)


def hand(allocation: str, flops: float = 0.5) -> dict:
    return {"kind": "structured_prune", "target": {"flops": flops}, "allocation": allocation,
            "finetune": FINETUNE}


def searched(model: Any, data: Any, budget: float, sampler: str, trials: int,
             out: Path) -> tuple[dict, dict]:
    recipe = {"stages": [hand("uniform")], "measure": {"threads": 1},
              "search": {"trials": trials, "sampler": sampler, "flops_budget": budget,
                         "objectives": ["metric", "latency"], "front": 3,
                         "finetune": FINETUNE,
                         "prune": {"ratios": [0.0, 0.25, 0.5, 0.75], "max_groups": 12},
                         "latency": {"runtime": "onnxruntime", "batch": 32, "repeats": 8}}}
    start = time.perf_counter()
    result = search(model, data, recipe, out, overwrite=True, log=lambda s: None)
    info = {"trials": len(result["trials"]), "wall_s": time.perf_counter() - start,
            "states": {s: sum(t["state"] == s for t in result["trials"])
                       for s in ("COMPLETE", "PRUNED", "FAIL")},
            "chosen_trial": result["chosen"].get("trial"), "met": result.met,
            "proxy_best_metric": max(t["measured"]["metric"] for t in result["trials"]
                                     if t["measured"] and t["measured"].get("metric")
                                     is not None and t["feasible"])
            if any(t["feasible"] for t in result["trials"]) else None}
    return result.recipe, info


def bench(name: str, kwargs: dict, trials: int, repeats: int, tmp: Path) -> dict:
    data = digits()
    torch.manual_seed(0)
    model = load_zoo(name, data, **kwargs)
    fit(model.module, data, TRAIN[name], progress=False)
    model.module.eval()
    base_flops = count_flops(model.module, data.example_inputs(1))["flops"]
    recipes: dict[str, dict] = {}
    info: dict[str, Any] = {}
    for alloc in ("uniform", "global"):
        recipes[alloc] = {"stages": [hand(alloc)], "measure": {"threads": 1}}
    built = {k: build(model, data, load_recipe(r)) for k, r in recipes.items()}
    budget = count_flops(built["uniform"].module, data.example_inputs(1))["flops"] / base_flops
    for sampler in ("nsga2", "amc"):
        recipes[sampler], info[sampler] = searched(model, data, budget, sampler, trials,
                                                   tmp / f"{name}-{sampler}")
        built[sampler] = build(model, data, load_recipe(recipes[sampler]))
    return measure_all(model, data, built, budget, base_flops, repeats, tmp, info, recipes)


def measure_all(model: Any, data: Any, built: dict, budget: float, base_flops: int,
                repeats: int, tmp: Path, info: dict, recipes: dict) -> dict:
    x, y = data.x_test, data.y_test
    acc, hits = {}, {}
    for k, m in built.items():
        acc[k], hits[k] = top1_with_ci(m.module.eval(), x, y)
    base_acc, _ = top1_with_ci(model.module, x, y)
    paths = {k: export_onnx(m, tmp / f"{k}.onnx") for k, m in built.items()}
    lat = compare_latency({k: (m.module, paths[k]) for k, m in built.items()},
                          data.example_inputs(32), batch_sizes=(32,), threads=1, warmup=3,
                          repeats=repeats, keep_samples=True)
    out: dict[str, Any] = {"baseline_top1": base_acc, "flops_budget": budget, "recipes": {}}
    ort = lat["onnxruntime"]["32"]
    for k, m in built.items():
        ratio, lo, hi = ratio_ci(ort[k]["samples_ms"], ort["uniform"]["samples_ms"])
        out["recipes"][k] = {
            "test_top1": acc[k],
            "flops_share": count_flops(m.module, data.example_inputs(1))["flops"] / base_flops,
            "ort_b32_median_ms": ort[k]["median_ms"],
            "time_ratio_to_uniform": {"ratio": ratio, "ci95": [lo, hi]},
            "top1_vs_uniform": paired_difference(hits[k], hits["uniform"]),
            "search": info.get(k), "stages": recipes[k]["stages"]}
    for k in ("nsga2", "amc"):
        r = out["recipes"][k]
        r["at_least_as_accurate"] = r["test_top1"]["value"] >= acc["uniform"]["value"]
        r["at_least_as_fast"] = r["time_ratio_to_uniform"]["ci95"][1] <= 1.0 or \
            r["time_ratio_to_uniform"]["ratio"] <= 1.0
        r["within_budget"] = r["flops_share"] <= budget + 1e-9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {"benchmark": "search_compare", "trials": args.trials,
                              "latency": {"runtime": "onnxruntime", "batch": 32, "threads": 1,
                                          "repeats": args.repeats},
                              "data": "sklearn digits (1,120 train / 280 validation held out of "
                                      "training / 397 test)",
                              "models": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            t0 = time.perf_counter()
            result["models"][name] = bench(name, MODELS[name], args.trials, args.repeats,
                                           Path(tmp))
            result["models"][name]["wall_s"] = time.perf_counter() - t0
    result["wall_s"] = time.perf_counter() - start
    write_json(RESULTS, result)
    emit(result)


if __name__ == "__main__":
    main()
