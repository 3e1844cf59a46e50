"""The Record of a structured-pruning run: what changed, what was skipped and why, and the numbers.

``changed`` has one line per resized layer (after the attention swaps and removed residual
branches, and before the updated Hugging Face config keys); ``skipped`` the groups, branches,
config keys and unmet target keys left alone, each with the reason; ``details`` the layer
sizes, params/FLOPs before and after, the replayable plans, whether each transformers config
rebuilds the pruned sizes (``hf_config``), and the target, depth, slimming and fine-tuning
summaries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.core.record import Record
from slimkit.graph.layers import is_hf_conv1d
from slimkit.io import batch as B
from slimkit.prune.hf_config import rebuild_report, sync_hf_config
from slimkit.prune.structured_depth import Depth
from slimkit.prune.structured_target import Target


def base_record(original: nn.Module, pruned: nn.Module, example: B.Inputs,
                plans: list[dict[str, Any]]) -> Record:
    """Layers resized, params/FLOPs before and after, the plans and the skipped entries."""
    from slimkit.measure.counts import count_flops, count_params

    skipped: list[dict[str, str]] = []
    for plan in plans:
        skipped += [k for k in plan["skipped"] if k not in skipped]
    record = Record(skipped=skipped)
    record.details["layers"] = _layer_sizes(original, pruned)
    record.changed = [f"{n}: {v['before']} -> {v['after']} (out, in) channels"
                      for n, v in record.details["layers"].items()]
    record.details["params"] = {"before": count_params(original)["params"],
                                "after": count_params(pruned)["params"]}
    record.details["flops"] = {"before": count_flops(original, example)["flops"],
                               "after": count_flops(pruned, example)["flops"]}
    record.details["plans"] = plans
    record.details["unsupported_ops"] = plans[0]["unsupported"] if plans else []
    return record


def record_unfused(record: Record, unfused: list[str]) -> None:
    """The attention modules swapped for their unfused equivalent come first in ``changed``."""
    record.changed = [f"{n}: nn.MultiheadAttention -> UnfusedMultiheadAttention (q/k/v/out "
                      "nn.Linear, same outputs)" for n in unfused] + record.changed
    record.details["unfused_mha"] = unfused


def record_depth(record: Record, depth: Depth) -> None:
    """The removed residual branches (first in ``changed``) and the kept ones with the reason."""
    record.changed = [f"{b['module']}: residual branch removed ({', '.join(b['nodes'])}; "
                      f"{b['params']} params; output change without it {b['score']:.3g})"
                      for b in depth.blocks] + record.changed
    record.skipped += depth.skipped
    record.details["blocks"] = depth.details


def sync_configs(original: nn.Module, pruned: nn.Module, record: Record) -> None:
    """Hugging Face configs follow the pruned sizes; what they cannot say goes to skipped.

    ``details["hf_config"]`` says, per transformers model, whether its config now rebuilds
    the pruned sizes (what ``from_pretrained`` needs after ``save_pretrained``). For those
    pruned under ``hf_loadable`` (the plans name them) a failure is a skipped entry, and the
    note on a head size the config cannot derive is dropped when the rebuild holds it.
    """
    changed, skipped = sync_hf_config(original, pruned)
    report = rebuild_report(pruned)
    loadable = {n for p in record.details.get("plans", []) for n in p.get("hf_loadable", [])}
    mine = [report[n] for n in sorted(loadable) if n in report]
    if mine and all(r["rebuilds"] for r in mine):
        skipped = [s for s in skipped if s["what"] != "config head size"]
    for r in mine:
        if not r["rebuilds"]:
            skipped.append({"what": f"hf_loadable ({r['class']})",
                            "why": "the synced config does not rebuild the pruned sizes ("
                                   + "; ".join(r["mismatched"][:3]) + "): save_pretrained "
                                   "output will not reload with from_pretrained (the slimkit "
                                   "artifact does)"})
    if report:
        record.details["hf_config"] = report
    record.changed += changed
    record.skipped += [s for s in skipped if s not in record.skipped]


def target_summary(final: dict[str, Any], steps: list[dict]) -> dict[str, Any]:
    """Asked vs achieved: the first target key on top, every key under ``by_metric``."""
    by = {k: {"asked": a, "achieved": final["achieved"][k],
              "reached": final["achieved"][k] <= a + 1e-9} for k, a in final["asked"].items()}
    key = next(iter(by))
    return {"metric": key, "asked": by[key]["asked"], "achieved": by[key]["achieved"],
            "reached": all(v["reached"] for v in by.values()), "by_metric": by, "steps": steps}


def record_target(record: Record, pruned: nn.Module, target: Target, steps: list[dict],
                  max_layer_ratio: float) -> None:
    """The target summary, every key measured on the final model; unmet keys are skipped."""
    # Every key is measured on the final model (latency again, in one interleaved window).
    final = {"asked": target.asked, "achieved": target.measure(pruned)}
    summary = target_summary(final, steps)
    record.details["target"] = summary
    for key, v in summary["by_metric"].items():
        if not v["reached"]:
            record.skipped.append({"what": f"target {key} {v['asked']}",
                                   "why": f"not reachable: best achieved {v['achieved']:.3f} "
                                          f"(max_layer_ratio {max_layer_ratio}); kept the best"})


def _layer_sizes(before: nn.Module, after: nn.Module) -> dict[str, dict[str, list[int]]]:
    """Per resized module: its (out, in) channel counts before and after."""
    old = dict(before.named_modules())
    out = {}
    for name, m in after.named_modules():
        w = getattr(m, "weight", None)
        ow = getattr(old.get(name), "weight", None)
        if isinstance(w, torch.Tensor) and isinstance(ow, torch.Tensor) and w.shape != ow.shape:
            out[name] = {"before": _out_in(m, ow), "after": _out_in(m, w)}
    return out


def _out_in(module: nn.Module, weight: torch.Tensor) -> list[int]:
    """A weight's (out, in) sizes (an HF ``Conv1D`` keeps them as [in, out])."""
    sizes = list(weight.shape[:2])
    return sizes[::-1] if is_hf_conv1d(module) else sizes


__all__ = ["base_record", "record_depth", "record_target", "record_unfused", "sync_configs",
           "target_summary"]
