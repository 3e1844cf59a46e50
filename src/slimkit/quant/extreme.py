"""Extreme weight quantization: binary and ternary weights, stored packed.

* **Binary** (BinaryConnect / BWN, Rastegari et al. 2016, XNOR-Net): ``W_b = alpha * sign(W)``
  with one ``alpha = mean|W|`` per output channel (the L2-optimal scale for fixed signs).
* **Ternary** (TWN, Li et al. 2016): threshold ``delta = 0.7 * mean|W|``, codes
  ``sign(W) * [|W| > delta]`` and ``alpha`` = mean of ``|W|`` over the weights above ``delta``.

Both train with a straight-through estimator: the forward pass uses the quantized weight, the
backward pass hands its gradient unchanged to the float weight (BinaryConnect's rule), and
``alpha`` is recomputed from the float weight at every step. They are registered in
``QUANTIZERS`` as ``binary`` and ``ternary`` (QAT selects them with ``weight_quantizer``).

:class:`PackedQuantLayer` is the frozen form: a :class:`QuantLayer` whose integer codes are
stored packed into uint8 (1 bit per binary weight, 2 per ternary one, two INT4 per byte for
4-bit codes) plus the per-channel scales, so the saved state really is ~1/32, ~1/16 or ~1/8 of
the float weight. Its ``weight_q`` is the unpacked int8 code tensor, so it reads like any frozen
QuantLayer (codes in [-1, 1] with scale ``alpha``: an ordinary symmetric 2-bit narrow range).
The ``packed_quant`` rebuilder replays the structure for artifacts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.core.stages import register_rebuilder
from slimkit.io.model import replace_module
from slimkit.quant.modules import FakeQuant, QuantLayer
from slimkit.quant.plan import QUANTIZERS, QuantSpec
from slimkit.quant.primitives import SCALE_FLOOR, Granularity, pack, reduce_range, unpack

#: TWN's threshold factor: delta = 0.7 * mean|W| approximates the optimal ternary threshold
#: for roughly Gaussian / uniform weights (Li et al. 2016, eq. 9).
TWN_DELTA = 0.7


def _block_dims(w: torch.Tensor, g: Granularity) -> list[int]:
    """The dims reduced to get one value per scale-sharing block (all, or all but the axis)."""
    if g.kind == "tensor":
        return list(range(w.dim()))
    axis = g.axis % w.dim()
    return [d for d in range(w.dim()) if d != axis]


class SignQuant(nn.Module):
    """Base of the binary/ternary quantizers: codes in [-1, 1] times one alpha per block.

    Accepts the :class:`QuantSpec` fields so the registry can build it; ``bits``,
    ``symmetric``, ``signed`` and ``narrow`` are implied (codes -1/0/+1) and ignored.
    """

    binary = False
    code_bits = 2
    qmin, qmax = -1, 1

    def __init__(self, bits: int = 2, symmetric: bool = True, signed: bool = True,
                 granularity: str | Granularity = "channel", narrow: bool = True) -> None:
        super().__init__()
        self.granularity = Granularity.parse(granularity)
        if self.granularity.kind == "group":
            raise ConfigError(f"{type(self).__name__}: granularity must be tensor or "
                              f"channel[:AXIS], not '{self.granularity}'")
        self.bits = 2
        self.register_buffer("scale", torch.ones(()))

    def extra_repr(self) -> str:
        return f"{'binary' if self.binary else 'ternary'} {self.granularity}"

    def codes_and_alpha(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (float, in {-1, 0, 1}) and per-block alpha (keepdim shape)."""
        raise NotImplementedError

    def calibrate_from(self, w: torch.Tensor) -> None:
        """Store ``w``'s alpha in the ``scale`` buffer."""
        self.scale = self.codes_and_alpha(w.detach())[1].to(torch.float32)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes, alpha = self.codes_and_alpha(w.detach())
        # Straight-through: value alpha * codes, gradient passed unchanged to the float weight.
        return alpha * codes + (w - w.detach())  # exact values, identity gradient

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Int8 codes of ``w`` (its alpha is kept in ``scale`` for :meth:`dequantize`)."""
        codes, alpha = self.codes_and_alpha(w.detach())
        self.scale = alpha.to(torch.float32)
        return codes.to(torch.int8)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return q.to(torch.float32) * self.scale

    def to_fixed(self) -> FakeQuant:
        """The frozen form: a symmetric narrow 2-bit FakeQuant (codes -1..1, scale alpha)."""
        fq = FakeQuant(2, True, True, self.granularity, narrow=True)
        fq.scale = self.scale.clone()
        fq.zero_point = torch.zeros(self.scale.shape, dtype=torch.int32)
        return fq.to(self.scale.device)


class BinaryQuant(SignQuant):
    """``alpha * sign(W)``, ``alpha = mean|W|`` per block (BWN / XNOR-Net weights)."""

    binary = True
    code_bits = 1

    def codes_and_alpha(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = _block_dims(w, self.granularity)
        alpha = w.abs().mean(dim=dims, keepdim=True).clamp(min=SCALE_FLOOR)
        codes = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)  # sign(0) -> +1: exactly 2 values
        return codes, alpha


class TernaryQuant(SignQuant):
    """TWN: ``alpha * sign(W) * [|W| > 0.7 mean|W|]``, alpha = mean|W| above the threshold."""

    def codes_and_alpha(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = _block_dims(w, self.granularity)
        a = w.abs()
        delta = TWN_DELTA * a.mean(dim=dims, keepdim=True)
        keep = (a > delta).to(w.dtype)
        count = keep.sum(dim=dims, keepdim=True).clamp(min=1)
        alpha = ((a * keep).sum(dim=dims, keepdim=True) / count).clamp(min=SCALE_FLOOR)
        return torch.sign(w) * keep, alpha


QUANTIZERS.register("binary", BinaryQuant)
QUANTIZERS.register("ternary", TernaryQuant)


def code_bits_for(fq: nn.Module) -> int:
    """Packed width of a quantizer's codes: 1 (binary), else the smallest of 2/4/8 that fits."""
    if getattr(fq, "binary", False):
        return 1
    span = int(fq.qmax) - int(fq.qmin)
    return next(b for b in (2, 4, 8) if span < 1 << b)


class PackedQuantLayer(QuantLayer):
    """A QuantLayer whose frozen integer weight codes are stored bit-packed.

    Args:
        layer, weight, input, output: as for :class:`QuantLayer`.
        code_bits: packed width (1, 2, 4 or 8); by default from the weight quantizer.
        binary: codes are -1/+1 stored as one bit each (default: the quantizer's ``binary``).
    """

    def __init__(self, layer: nn.Module, weight: nn.Module, input: FakeQuant | None = None,
                 output: FakeQuant | None = None, code_bits: int | None = None,
                 binary: bool | None = None) -> None:
        super().__init__(layer, weight, input, output)
        self.binary = bool(getattr(weight, "binary", False) if binary is None else binary)
        self.code_bits = code_bits_for(weight) if code_bits is None else code_bits
        self.weight_shape = tuple(layer.weight.shape)

    def extra_repr(self) -> str:
        return f"packed {self.code_bits}-bit{' binary' if self.binary else ''}"

    @property
    def weight_q(self) -> torch.Tensor:
        """The unpacked int8 codes (as a plain frozen QuantLayer stores them)."""
        numel = 1
        for d in self.weight_shape:
            numel *= d
        u = unpack(self.weight_packed, self.code_bits, numel).to(torch.int16)
        codes = 2 * u - 1 if self.binary else u + int(self.weight_fq.qmin)
        return codes.to(torch.int8).reshape(self.weight_shape)

    def freeze(self) -> None:
        """Quantize the weight, keep fixed qparams and store the codes packed; idempotent."""
        if self.frozen:
            return
        with torch.no_grad():
            codes = self.weight_fq.quantize(self.layer.weight.detach()).to(torch.int16)
        if hasattr(self.weight_fq, "to_fixed"):
            self.weight_fq = self.weight_fq.to_fixed()
        if self.binary:
            if not bool(((codes == 1) | (codes == -1)).all()):
                raise ModelError("binary packing needs codes in {-1, +1}")
            u = (codes + 1) // 2
        else:
            u = codes - int(self.weight_fq.qmin)
        self._store(pack(u, self.code_bits))

    def freeze_empty(self) -> None:
        """Take the frozen structure without reading the weight (artifact loading).

        The packed codes and the weight quantizer's qparams get the shapes :meth:`freeze`
        gives them and placeholder values, which a state dict then overwrites. Runs on the
        ``meta`` device, so an artifact's sizes are checked before anything is allocated.

        Raises:
            ConfigError: the weight quantizer is not a fixed :class:`FakeQuant` (what
                :meth:`freeze` leaves) or the code width is not 1, 2, 4 or 8.
        """
        if self.frozen:
            return
        fq, dev = self.weight_fq, self.layer.weight.device
        if type(fq) is not FakeQuant:
            raise ConfigError(f"a packed layer's weight quantizer is a fixed 'affine' one, not "
                              f"{type(fq).__name__}")
        if self.code_bits not in (1, 2, 4, 8):
            raise ConfigError(f"packed codes are 1, 2, 4 or 8 bits wide, not {self.code_bits}")
        shape = qparam_shape(self.weight_shape, fq.granularity)
        fq.scale = torch.ones(shape, dtype=torch.float32, device=dev)
        fq.zero_point = torch.zeros(shape, dtype=torch.int32, device=dev)
        per_byte = 8 // self.code_bits
        n_bytes = -(-math.prod(self.weight_shape) // per_byte)
        self._store(torch.zeros(n_bytes, dtype=torch.uint8, device=dev))

    def _store(self, packed: torch.Tensor) -> None:
        """Keep ``packed`` as the weight and drop the float one."""
        self.register_buffer("weight_packed", packed)
        del self.layer.weight
        self.layer.register_buffer("weight", None)
        self.frozen = True


def qparam_shape(weight_shape: tuple[int, ...], granularity: Granularity) -> tuple[int, ...]:
    """Shape of a fixed weight quantizer's scale for a weight of ``weight_shape``.

    ``()`` per tensor (as :meth:`FakeQuant.set_range` stores it; a sign quantizer's alpha is
    saved as ``[1, 1]``, the same one value, which loading accepts too), else one value per
    block, broadcastable against the weight (:func:`reduce_range`'s shape, on ``meta``).
    """
    if granularity.kind == "tensor":
        return ()
    return tuple(reduce_range(torch.empty(weight_shape, device="meta"), granularity)[0].shape)


def spec_of(fq: nn.Module | None) -> dict | None:
    """The QuantSpec dict that rebuilds a fixed :class:`FakeQuant` (None stays None)."""
    if fq is None:
        return None
    if type(fq) is not FakeQuant:
        raise ModelError(f"spec_of: {type(fq).__name__} is not a fixed FakeQuant; call "
                         "to_fixed() first")
    return QuantSpec(bits=fq.bits, symmetric=fq.symmetric, signed=fq.signed,
                     granularity=str(fq.granularity), narrow=fq.narrow).model_dump()


def pack_layer(model: nn.Module, name: str) -> dict:
    """Freeze the QuantLayer ``name`` of ``model`` into a :class:`PackedQuantLayer` (in place).

    Activation quantizers are converted to fixed ones (``to_fixed``) first.

    Returns:
        The layer's ``packed_quant`` plan entry (weight/input/output specs, code width).

    Raises:
        ConfigError: ``name`` is not a QuantLayer with a weight quantizer.
    """
    ql = model.get_submodule(name)
    if not isinstance(ql, QuantLayer) or ql.weight_fq is None or ql.frozen:
        raise ConfigError(f"pack_layer: '{name}' is not an unfrozen QuantLayer with a weight "
                          "quantizer")
    fixed = {k: (q.to_fixed() if hasattr(q, "to_fixed") else q)
             for k, q in (("input", ql.input_fq), ("output", ql.output_fq))}
    packed = PackedQuantLayer(ql.layer, ql.weight_fq, **fixed)
    packed.freeze()
    replace_module(model, name, packed)
    return {"weight": spec_of(packed.weight_fq), "input": spec_of(packed.input_fq),
            "output": spec_of(packed.output_fq), "code_bits": packed.code_bits,
            "binary": packed.binary}


def packed_bytes(layer: PackedQuantLayer) -> int:
    """Bytes the layer's frozen weight takes: packed codes plus its float32 scales."""
    return layer.weight_packed.numel() + 4 * layer.weight_fq.scale.numel()


@register_rebuilder("packed_quant")
def rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: replace the planned layers by frozen PackedQuantLayers.

    Structure only (:meth:`PackedQuantLayer.freeze_empty`): buffers get their shapes from the
    plan and the layers' shapes, their values from the artifact's state dict afterwards.
    """
    for name, entry in plan["layers"].items():
        layer = model.get_submodule(name)
        specs = {k: (QuantSpec.model_validate(entry[k]).make() if entry.get(k) else None)
                 for k in ("weight", "input", "output")}
        if specs["weight"] is None:
            raise ConfigError(f"packed_quant plan: layer '{name}' has no weight quantizer")
        ql = PackedQuantLayer(layer, specs["weight"], specs["input"], specs["output"],
                              code_bits=int(entry["code_bits"]), binary=bool(entry["binary"]))
        try:
            ql.freeze_empty()
        except ConfigError as exc:
            raise ConfigError(f"packed_quant plan: layer '{name}': {exc}") from None
        replace_module(model, name, ql)
    return model
