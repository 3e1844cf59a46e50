"""Parameter counts and FLOPs/MACs (counted by torch.utils.flop_counter, per layer and total).

Parameters are the weights a model computes with, whatever form stores them. A quantized layer
keeps its weight as integer codes in buffers (int8, or 4/2/1-bit codes packed into bytes), not
as float parameters, yet it still multiplies by ``out x in`` weights. Such a layer *computes*
its weight: ``weight`` is a method returning the dequantized tensor (slimkit's QuantLayer, its
packed binary/ternary form, the packed group-quantized layers and the dynamic int8 Linear all
follow this protocol). It is counted as one layer from ``weight()``, under its own path, which
is the original layer's name (a wrapper holds the float layer at ``<name>.layer``), and its
bits per weight are the width of its codes. Scales and zero points are overhead: they appear in
the layer's ``bytes``, not in its parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimkit.io import batch as B
from slimkit.io.model import set_mode


def computes_weight(module: nn.Module) -> bool:
    """True for a layer whose weight is a method computing it from a stored (quantized) form."""
    w = getattr(module, "weight", None)
    return callable(w) and not isinstance(w, torch.Tensor | nn.Module)


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Layers counted one by one, in model order: each layer that computes its weight (its
    submodules belong to it), and each other module that owns parameters directly."""
    inside: set[int] = set()
    for name, mod in model.named_modules():
        if id(mod) in inside:
            continue
        if computes_weight(mod):
            inside.update(id(m) for m in mod.modules())
            yield name, mod
        elif any(True for _ in mod.parameters(recurse=False)):
            yield name, mod


def layer_units(model: nn.Module) -> dict[str, nn.Module]:
    """The model's layers as the per-layer table and FLOP counts see them, keyed by path.

    A quantized layer is one entry under its original name (``conv1``, not ``conv1.layer``);
    float layers are the modules that own parameters directly (Conv, Linear, norms...).
    """
    return {name: mod for name, mod in _walk(model) if name}


def _dtype_bits(t: torch.Tensor) -> int:
    return t.element_size() * 8


def _binary_bits(m: nn.Module) -> int | None:
    """Packed binary codes (the layer or its quantizer says ``binary``): one bit each."""
    binary = getattr(m, "binary", False) or getattr(getattr(m, "weight_fq", None), "binary", False)
    return 1 if binary else None


def _quantizer_bits(m: nn.Module) -> int | None:
    """A QuantLayer (frozen or fake-quantizing): its weight quantizer's code width."""
    return getattr(getattr(m, "weight_fq", None), "bits", None)


def _declared_bits(m: nn.Module) -> int | None:
    """Packed group-quantized layers declare their code width as ``bits``."""
    return getattr(m, "bits", None)


def _code_dtype_bits(m: nn.Module) -> int | None:
    """Integer codes in ``weight_q`` (the dynamic int8 Linear; 7-bit with ``reduce_range``)."""
    codes = getattr(m, "weight_q", None)
    if not isinstance(codes, torch.Tensor):
        return None
    return _dtype_bits(codes) - int(bool(getattr(m, "reduce_range", False)))


#: How the bits per weight of a layer that computes its weight are read, from what each
#: stored form documents; the first reader that knows the layer answers.
_BIT_READERS: tuple[Callable[[nn.Module], int | None], ...] = (
    _binary_bits, _quantizer_bits, _declared_bits, _code_dtype_bits)


def weight_bits(module: nn.Module) -> int | None:
    """Bits per weight of a layer: its code width when quantized (8, 4, 2, 1 for binary),
    else its weight's dtype width (32 for float32, 16 for float16); None without weights."""
    if computes_weight(module):
        for read in _BIT_READERS:
            bits = read(module)
            if isinstance(bits, int) and not isinstance(bits, bool):
                return bits
        with torch.no_grad():
            return _dtype_bits(module.weight())
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        return _dtype_bits(w)
    first = next(module.parameters(recurse=False), None)
    return None if first is None else _dtype_bits(first)


def _is_weight(param_name: str) -> bool:
    """The float tensor a fake-quantizing layer computes its weight from (``layer.weight``)."""
    return param_name.rpartition(".")[2] == "weight"


def _layer_counts(mod: nn.Module) -> dict:
    """One layer's tensors to count: ``logical``, the weight it computes (None for a float
    layer), ``others``, its other parameters (bias, norm scales), and ``covered``, the ids
    of the float parameters the computed weight stands for (not counted twice)."""
    if not computes_weight(mod):
        return {"others": list(mod.parameters(recurse=False)), "logical": None,
                "covered": set()}
    with torch.no_grad():
        logical = mod.weight().detach()
    if logical.is_quantized:  # torch.ao's quantized layers hand out a quantized tensor
        logical = logical.dequantize()
    named = list(mod.named_parameters())
    return {"others": [p for n, p in named if not _is_weight(n)], "logical": logical,
            "covered": {id(p) for n, p in named if _is_weight(n)}}


def count_params(model: nn.Module, bits: bool = False) -> dict[str, int | float | None]:
    """Total parameters and non-zero parameters (shared parameters counted once).

    A quantized layer counts the weights it computes with (``weight()``, see the module
    docstring), whatever their storage: quantizing a model leaves its count unchanged.

    Args:
        model: any module.
        bits: also return ``bits_per_param``, the mean width of a parameter as stored: a
            quantized weight counts its code width, any other parameter its dtype's width.

    Returns:
        ``{"params", "nonzero_params"}`` (and ``bits_per_param`` when asked).
    """
    seen: set[int] = set()
    total = nonzero = 0
    total_bits = 0.0
    for _, mod in _walk(model):
        if not computes_weight(mod):
            continue
        c = _layer_counts(mod)
        seen |= c["covered"]
        total += c["logical"].numel()
        nonzero += int(torch.count_nonzero(c["logical"]))
        total_bits += c["logical"].numel() * (weight_bits(mod) or 32)
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
        total_bits += p.numel() * _dtype_bits(p)
    out: dict[str, int | float | None] = {"params": total, "nonzero_params": nonzero}
    if bits:
        out["bits_per_param"] = total_bits / total if total else None
    return out


def _state_bytes(mod: nn.Module, recurse: bool) -> int:
    """Bytes of the tensors the layer saves (weights or codes, scales, zero points, bias...)."""
    state = mod.state_dict(keep_vars=True)
    return sum(t.numel() * t.element_size() for k, t in state.items()
               if isinstance(t, torch.Tensor) and (recurse or "." not in k))


def layer_row(mod: nn.Module) -> dict:
    """Type, weight shape, params, non-zeros, bits per weight and stored bytes of one layer."""
    c = _layer_counts(mod)
    params = sum(p.numel() for p in c["others"])
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in c["others"])
    if c["logical"] is None:
        weight = getattr(mod, "weight", None)
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else None
    else:
        params += c["logical"].numel()
        nonzero += int(torch.count_nonzero(c["logical"]))
        declared = getattr(mod, "weight_shape", None)  # packed convs keep the conv's shape
        shape = list(declared) if isinstance(declared, list | tuple) else list(c["logical"].shape)
    return {"type": type(mod).__name__, "weight_shape": shape, "params": params,
            "nonzero_params": nonzero, "weight_bits": weight_bits(mod),
            "bytes": _state_bytes(mod, recurse=c["logical"] is not None)}


def count_flops(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict:
    """FLOPs and MACs of one forward pass at the batch of ``example_inputs``.

    FLOPs come from ``torch.utils.flop_counter`` (matmul/conv/attention ops; elementwise
    ops are not counted, as in the published MAC figures). MACs = FLOPs / 2.

    Returns:
        ``{"flops", "macs", "per_layer": {name: {"flops", "macs"}}}`` for the layers of
        :func:`layer_units`.
    """
    set_mode(model, False)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        B.call(model, example_inputs)
    per_module = counter.get_flop_counts()
    total = int(counter.get_total_flops())
    per_layer = {}
    for name in layer_units(model):
        key = f"{type(model).__name__}.{name}"
        flops = int(sum(per_module.get(key, {}).values()))
        per_layer[name] = {"flops": flops, "macs": flops // 2}
    return {"flops": total, "macs": total // 2, "per_layer": per_layer}


def layer_table(model: nn.Module, example_inputs: Sequence[torch.Tensor],
                latency_repeats: int = 10) -> list[dict]:
    """Per layer: type, weight shape, params, non-zero params, bits per weight, stored bytes,
    MACs and measured latency.

    Layers are those of :func:`layer_units`: a quantized layer is one row under its original
    name, counting the weights it computes with (``params``), the width of their codes
    (``weight_bits``) and everything it stores, scales and zero points included (``bytes``).
    Latency is each layer's median eager-PyTorch time at batch 1 on one thread, timed inside
    whole forward passes (``latency_ms``; None for a layer that isn't called as a module).
    """
    from slimkit.measure.latency import layer_latency

    flops = count_flops(model, example_inputs)["per_layer"]
    units = layer_units(model)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latency = layer_latency(model, example_inputs, list(units), repeats=latency_repeats)
    finally:
        torch.set_num_threads(prev)
    return [{"name": name, **layer_row(mod), "macs": flops.get(name, {}).get("macs", 0),
             "latency_ms": latency[name]} for name, mod in units.items()]
