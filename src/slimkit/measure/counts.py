"""Parameter counts and FLOPs/MACs (counted by torch.utils.flop_counter, per layer and total)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimkit.io.model import set_mode


def count_params(model: nn.Module) -> dict[str, int]:
    """Total parameters and non-zero parameters (shared parameters counted once)."""
    seen: set[int] = set()
    total = nonzero = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return {"params": total, "nonzero_params": nonzero}


def _leaf_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own parameters directly (Conv, Linear, norms, embeddings...)."""
    return {
        name: mod for name, mod in model.named_modules()
        if name and any(True for _ in mod.parameters(recurse=False))
    }


def count_flops(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict:
    """FLOPs and MACs of one forward pass at the batch of ``example_inputs``.

    FLOPs come from ``torch.utils.flop_counter`` (matmul/conv/attention ops; elementwise
    ops are not counted, as in the published MAC figures). MACs = FLOPs / 2.

    Returns:
        ``{"flops", "macs", "per_layer": {name: {"flops", "macs"}}}`` for leaf layers.
    """
    set_mode(model, False)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(*example_inputs)
    per_module = counter.get_flop_counts()
    total = int(counter.get_total_flops())
    per_layer = {}
    for name in _leaf_layers(model):
        key = f"{type(model).__name__}.{name}"
        flops = int(sum(per_module.get(key, {}).values()))
        per_layer[name] = {"flops": flops, "macs": flops // 2}
    return {"flops": total, "macs": total // 2, "per_layer": per_layer}


def layer_table(model: nn.Module, example_inputs: Sequence[torch.Tensor],
                latency_repeats: int = 10) -> list[dict]:
    """Per leaf layer: type, weight shape, params, non-zero params, MACs and measured latency.

    Latency is each layer's median eager-PyTorch time at batch 1 on one thread, timed inside
    whole forward passes (``latency_ms``; None for a layer that isn't called as a module).
    """
    from slimkit.measure.latency import layer_latency

    flops = count_flops(model, example_inputs)["per_layer"]
    leaves = _leaf_layers(model)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latency = layer_latency(model, example_inputs, list(leaves), repeats=latency_repeats)
    finally:
        torch.set_num_threads(prev)
    rows = []
    for name, mod in leaves.items():
        params = list(mod.parameters(recurse=False))
        weight = getattr(mod, "weight", None)
        rows.append({
            "name": name,
            "type": type(mod).__name__,
            "weight_shape": list(weight.shape) if isinstance(weight, torch.Tensor) else None,
            "params": sum(p.numel() for p in params),
            "nonzero_params": sum(int(torch.count_nonzero(p.detach())) for p in params),
            "macs": flops.get(name, {}).get("macs", 0),
            "latency_ms": latency[name],
        })
    return rows
