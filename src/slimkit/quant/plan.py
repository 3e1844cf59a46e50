"""Quantization plans: which layers get which quantizers, applied and replayed the same way.

A plan is JSON::

    {"layers": {"features.0": {"weight": {"bits": 8, "granularity": "channel", ...},
                               "input": {"bits": 8, "symmetric": false, "signed": false},
                               "output": null}},
     "frozen": true}

``wrap_layers`` replaces each named Linear/Conv by a :class:`QuantLayer` holding the
quantizers the specs describe (``quantizer`` names an entry of ``QUANTIZERS``: ``affine`` is
:class:`FakeQuant`; QAT, binary and ternary register theirs). Qparams are set afterwards, by
calibration or training; ``freeze`` then stores integer weight codes. The ``quant_layers``
rebuilder replays a plan on a fresh model so an artifact rebuilds the quantized structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field
from torch import nn

from slimkit.core.config import SlimConfig
from slimkit.core.errors import ConfigError, did_you_mean
from slimkit.core.record import Record
from slimkit.core.registry import Registry
from slimkit.core.stages import register_rebuilder
from slimkit.io.model import replace_module
from slimkit.quant.modules import QUANTIZABLE, FakeQuant, QuantLayer

#: Quantizer classes by name; each takes the QuantSpec fields as keyword arguments. The plugins
#: register the rest (binary and ternary, lsq), so that every name is known wherever it is read.
QUANTIZERS: Registry[Callable[..., nn.Module]] = Registry(
    "quantizer", plugins=("slimkit.quant.extreme", "slimkit.quant.qat"))
QUANTIZERS.register("affine", FakeQuant)


class QuantSpec(SlimConfig):
    """One quantizer: width, scheme and granularity."""

    bits: int = Field(8, ge=2, le=8, description="Code width in bits (2..8).")
    symmetric: bool = Field(True, description="Zero point at the middle of the range.")
    signed: bool = Field(True, description="Signed codes (int) or unsigned (uint).")
    granularity: str = Field("tensor", description="tensor, channel[:AXIS] or "
                                                   "group:SIZE[:AXIS].")
    narrow: bool = Field(False, description="Drop the most negative code ([-127, 127]).")
    quantizer: str = Field("affine", description="Quantizer kind (affine, or one registered "
                                                 "by QAT / binary / ternary).")

    def make(self) -> nn.Module:
        """Build the quantizer module this spec describes."""
        return QUANTIZERS.get(self.quantizer)(
            bits=self.bits, symmetric=self.symmetric, signed=self.signed,
            granularity=self.granularity, narrow=self.narrow)


def _spec(entry: Any) -> QuantSpec | None:
    if entry is None or isinstance(entry, QuantSpec):
        return entry
    return QuantSpec.model_validate(entry)


def wrap_layers(model: nn.Module, layers: dict[str, dict]) -> dict[str, QuantLayer]:
    """Replace each named layer of ``model`` (in place) by a ``QuantLayer``.

    Args:
        layers: ``{name: {"weight": spec, "input": spec, "output": spec}}``, each spec a
            :class:`QuantSpec` or its dict, or None for no quantizer there.

    Returns:
        The new QuantLayers by name.

    Raises:
        ConfigError: a name not in the model, or a layer that isn't Linear/Conv.
    """
    modules = dict(model.named_modules())
    out = {}
    for name, entry in layers.items():
        layer = modules.get(name)
        if layer is None:
            raise ConfigError(f"quantization plan: layer '{name}' is not in the model."
                              f"{did_you_mean(name, modules)}")
        if isinstance(layer, QuantLayer):
            raise ConfigError(f"quantization plan: layer '{name}' is already quantized")
        if type(layer).__name__ not in QUANTIZABLE:
            raise ConfigError(f"quantization plan: layer '{name}' is a {type(layer).__name__}; "
                              f"only {', '.join(QUANTIZABLE)} can be quantized")
        specs = {k: _spec(entry.get(k)) for k in ("weight", "input", "output")}
        unknown = set(entry) - set(specs)
        if unknown:
            raise ConfigError(f"quantization plan for '{name}': unknown keys {sorted(unknown)}")
        ql = QuantLayer(layer, **{k: (s.make() if s else None) for k, s in specs.items()})
        if ql.weight_fq is not None and hasattr(ql.weight_fq, "calibrate_from"):
            ql.weight_fq.calibrate_from(layer.weight.detach())
        replace_module(model, name, ql)
        out[name] = ql
    return out


def freeze(model: nn.Module) -> list[str]:
    """Store every QuantLayer's weight as integer codes; return their names."""
    done = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer) and m.weight_fq is not None:
            m.freeze()
            done.append(name)
    return done


@register_rebuilder("quant_layers")
def rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: wrap the planned layers (and freeze them if the plan says so)."""
    wrap_layers(model, plan["layers"])
    if plan.get("frozen"):
        freeze(model)
    return model


def byte_totals(layers: dict[str, dict]) -> dict[str, float]:
    """Layers quantized, their weight bytes before and after, and the ratio.

    ``layers`` are a plan's entries holding ``bytes_before`` / ``bytes_after`` (weight-only
    and dynamic quantization report their totals with it).
    """
    before = sum(e["bytes_before"] for e in layers.values())
    after = sum(e["bytes_after"] for e in layers.values())
    return {"layers": len(layers), "bytes_before": before, "bytes_after": after,
            "ratio": before / after if after else 1.0}


def add_quant_transforms(record: Record) -> None:
    """Let the artifact rebuild the quantized layers (plain frozen and bit-packed ones)."""
    if record.details.get("plan"):
        record.transforms.append(("quant_layers", record.details["plan"]))
    if record.details.get("packed_plan"):
        record.transforms.append(("packed_quant", record.details["packed_plan"]))
