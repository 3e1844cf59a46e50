"""Quantizers on module outputs: residual adds that integer runtimes run as integer adds.

A residual block returns ``skip + branch``; that value feeds the next quantized layer and the
next block's add. When only the layer's input is quantized, ONNX Runtime runs every add in
float between DequantizeLinear and QuantizeLinear nodes (the add's float readers block its
``QLinearAdd`` fusion). Quantizing the block's output once, with the consumer layer's input
qparams, gives every reader the same quantized value: the add then fuses into an integer add
and the consumer's own input quantizer becomes the identity (the export drops it).

The quantizer is a :class:`~slimkit.quant.modules.FakeQuant` child named
:data:`OUTPUT_FQ` of the block, applied by a forward hook; the ``output_quantizers``
transform replays it on a fresh model (artifacts), and the state dict holds its qparams.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.core.stages import register_rebuilder
from slimkit.quant.modules import FakeQuant

#: The child name of a module-output quantizer.
OUTPUT_FQ = "slimkit_output_fq"


def _quantize_output(module: nn.Module, args: Any, out: Any) -> Any:
    fq = getattr(module, OUTPUT_FQ)
    return fq(out) if isinstance(out, torch.Tensor) else out


def attach_output_quantizers(model: nn.Module, specs: dict[str, dict]) -> dict[str, FakeQuant]:
    """Give each named module an output quantizer built from its spec (in place).

    Args:
        specs: ``{module name: QuantSpec dict}``.

    Returns:
        The new quantizers by module name (their qparams are set by the caller).
    """
    from slimkit.quant.plan import QuantSpec

    out = {}
    for name, spec in specs.items():
        module = model.get_submodule(name)
        fq = QuantSpec.model_validate(spec).make()
        module.add_module(OUTPUT_FQ, fq)
        module.register_forward_hook(_quantize_output)
        out[name] = fq
    return out


@register_rebuilder("output_quantizers")
def rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: the same output quantizers (qparams come from the state dict)."""
    attach_output_quantizers(model, plan["modules"])
    return model


def plan_residuals(model: nn.Module, layers: dict[str, dict], example: Any,
                   record: Any) -> dict[str, str]:
    """Share quantized values around residual adds (see the module doc), recording each.

    A layer whose output feeds one quantized layer and residual adds takes that layer's
    input qparams as its output quantizer (``layers[name]["consumer"]`` is set, in place);
    the modules returning a residual add that feeds a quantized layer are returned, to get
    :func:`attach_output_quantizers` with that layer's input qparams.

    Returns:
        ``{module: consumer layer}``.
    """
    from slimkit.graph.chains import residual_outputs, shared_consumers

    names = set(layers)
    shared = shared_consumers(model, names, example) or {}
    for name, consumer in shared.items():
        if layers[name]["consumer"] is None:
            layers[name] = {**layers[name], "consumer": consumer, "relu": False,
                            "relu_module": None}
            record.changed.append(f"{name}: output quantized with {consumer}'s input qparams "
                                  "(it also feeds residual adds, which read the same codes)")
    residual = {k: v["consumer"] for k, v in (residual_outputs(model, names, example)
                                               or {}).items()}
    record.changed += [f"{k}: residual add output quantized with {c}'s input qparams "
                       "(integer add in ONNX Runtime)" for k, c in residual.items()]
    return residual
