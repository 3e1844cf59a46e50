"""Packed low-bit weights: group-wise qparams, round-to-nearest codes and packed layers.

A weight ``W`` of shape ``(N, K)`` is cut along its input dimension into blocks of ``block``
columns (the last block zero-padded when ``K`` is not a multiple); each row of each block has
its own scale ``s`` and zero point ``z``, and holds unsigned codes ``u`` in ``[0, 2**bits)``
with ``W ~ (u - z) * s``. Symmetric schemes use ``z = 2**(bits-1)`` (signed codes shifted to
unsigned), asymmetric ones the ``z`` covering the group's ``[min, max]``.

Codes are stored packed in uint8 (``storage_bits``: 2 for 2-bit, 4 for 3/4-bit, 8 above; two
INT4 per byte), in exactly the layout of ONNX Runtime's ``com.microsoft::MatMulNBits``
(``B: [N, n_blocks, block * storage_bits / 8]``, zero points packed per row), so the ONNX
export hands the same bytes to a native blockwise-int4/int8 kernel (symmetric 2/4/8-bit codes
use its default zero point and store none). The forward dequantizes at every call and caches
nothing in its state: the state dict holds only packed integers, scales, zero points and the
bias, so files really shrink.

:func:`weight_only_quant` (stage kind ``weight_only_quant``) replaces a model's Linear layers
by ``PackedLinear`` with codes from round-to-nearest or GPTQ (:mod:`slimkit.quant.gptq`), and
optionally its convs and embedding tables by ``PackedConv`` / ``PackedEmbedding`` (their ONNX
graph unpacks the stored bytes with standard ops that ONNX Runtime folds at load); it
registers the rebuilder that lets artifacts of zoo models replay the packed structure.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from slimkit.core.config import SlimConfig
from slimkit.core.errors import ConfigError, DataError, did_you_mean
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_rebuilder, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.data.split import calibration_subset
from slimkit.graph.select import select_layers
from slimkit.io.model import SlimModel, set_mode
from slimkit.measure import verify_finite
from slimkit.quant.plan import replace_module
from slimkit.quant.primitives import choose_qparams, pack, qrange, unpack

SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_F16 = torch.finfo(torch.float16)


def storage_bits(bits: int) -> int:
    """Width of the container a ``bits``-wide code is packed in (2, 4 or 8)."""
    qrange(bits)  # validates 2..8
    return 2 if bits == 2 else 4 if bits <= 4 else 8


def block_for(in_features: int, group_size: int) -> int:
    """The block (group) size used for a layer: ``group_size``, or one block per row for 0.

    ONNX Runtime's MatMulNBits takes power-of-two blocks of at least 16, so a whole-row group
    is the power of two covering the row (the padding columns hold zero codes). A layer
    narrower than ``group_size`` gets that smaller block too, rather than mostly padding.
    """
    row = max(16, 1 << max(0, in_features - 1).bit_length())
    return min(group_size, row) if group_size else row


def check_group_size(group_size: int) -> int:
    """Validate a group size: 0 (one group per row) or a power of two >= 16.

    Raises:
        ConfigError: any other value.
    """
    if group_size != 0 and (group_size < 16 or group_size & (group_size - 1)):
        raise ConfigError(f"group_size {group_size} must be 0 (one group per output row) or a "
                          "power of two >= 16 (ONNX Runtime's MatMulNBits needs such blocks)")
    return group_size


def round_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """The float32 value of ``scale`` once stored as ``scale_dtype`` (fp16 kept in its range)."""
    if scale_dtype == "float16":
        return scale.clamp(_F16.tiny, _F16.max).to(torch.float16).to(torch.float32)
    return scale.to(torch.float32)


def group_qparams(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: str = "float32",
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and unsigned zero point of each row of ``w``'s last dimension (one group).

    Args:
        w: ``(..., G)``; one (scale, zero point) per leading index.

    Returns:
        ``(scale, zero)``: float32 scale (already rounded to what ``scale_dtype`` stores) and
        int32 zero point in ``[0, 2**bits)``, both shaped ``w.shape[:-1]``.
    """
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale, zero = choose_qparams(lo, hi, bits, symmetric, signed=symmetric)
    qmin, _ = qrange(bits, signed=symmetric)
    return round_scale(scale, scale_dtype), (zero - qmin).to(torch.int32)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int) -> torch.Tensor:
    """Unsigned codes ``clamp(round_half_even(w / s) + z, 0, 2**bits - 1)`` (float tensor)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def pad_columns(w: torch.Tensor, block: int) -> torch.Tensor:
    """``w`` with zero columns appended so its width is a multiple of ``block``."""
    pad = (-w.shape[1]) % block
    return F.pad(w, (0, pad)) if pad else w


def rtn_quantize(w: torch.Tensor, bits: int, block: int, symmetric: bool,
                 scale_dtype: str = "float16",
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group quantization of a ``(N, K)`` weight.

    Returns:
        ``(codes, scales, zeros)``: uint8 codes ``(N, K_padded)``, float32 scales and int32
        zero points ``(N, n_blocks)``.

    Example:
        >>> codes, s, z = rtn_quantize(torch.randn(8, 100), bits=4, block=32, symmetric=True)
    """
    wp = pad_columns(w.detach().to(torch.float32), block)
    n, kp = wp.shape
    groups = wp.view(n, kp // block, block)
    scale, zero = group_qparams(groups, bits, symmetric, scale_dtype)
    codes = quantize_codes(groups, scale[..., None], zero[..., None], bits)
    return codes.reshape(n, kp).to(torch.uint8), scale, zero


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     in_features: int) -> torch.Tensor:
    """``(u - z) * s`` of ``(N, K_padded)`` codes, cropped to ``in_features`` columns."""
    n, nb = scales.shape
    u = codes.reshape(n, nb, -1).to(torch.float32)
    w = (u - zeros.to(torch.float32)[..., None]) * scales.to(torch.float32)[..., None]
    return w.reshape(n, -1)[:, :in_features]


def _pack_rows(values: torch.Tensor, sbits: int) -> torch.Tensor:
    """Pack each row of a ``(N, M)`` code matrix separately (rows start on a byte)."""
    per = 8 // sbits
    width = -(-values.shape[1] // per) * per
    padded = F.pad(values.to(torch.int32), (0, width - values.shape[1]))
    return pack(padded, sbits).view(values.shape[0], width // per)


def _typed_like(out, x, n: int):  # noqa: ANN001, ANN202
    """Give a custom op's output ``x``'s dtype and rank, last dim ``n`` (exporter shape info).

    The leading dims are left unknown: tracing sees one batch size, and a size fixed here
    would be baked into later reshapes, breaking the dynamic batch axis.
    """
    sizes = x.type().varyingSizes() if hasattr(x.type(), "varyingSizes") else None
    if sizes:
        out.setType(x.type().with_sizes([None] * (len(sizes) - 1) + [n]))
    return out


class _MatMulNBits(torch.autograd.Function):
    """ONNX export hook: ``x @ W.T`` as ``com.microsoft::MatMulNBits`` on the packed bytes."""

    @staticmethod
    def forward(ctx, x, packed, scales, zeros, w, k, n, bits, block):  # noqa: ANN001, ANN205
        # ``w`` (the dequantized weight) only gives the tracer the right values; the
        # exported node reads the packed bytes and the dead dequantization is dropped.
        return x @ w.T

    @staticmethod
    def symbolic(g, x, packed, scales, zeros, w, k, n, bits, block):  # noqa: ANN001, ANN205
        inputs = [x, packed, scales] + ([] if zeros is None else [zeros])
        out = g.op("com.microsoft::MatMulNBits", *inputs,
                   K_i=k, N_i=n, bits_i=bits, block_size_i=block)
        return _typed_like(out, x, n)


class _DequantizePacked(torch.autograd.Function):
    """ONNX export hook: the dequantized weight as standard ops on the packed bytes.

    The nodes (BitShift / Cast / Sub / Mul / Reshape) read the packed initializers, so the
    file keeps 2/4-bit codes; ONNX Runtime folds them into a float constant when it loads the
    session (the layer then runs at float speed). The TorchScript exporter does not fold
    BitShift, so it cannot undo the packing at export time.
    """

    @staticmethod
    def forward(ctx, packed, scales, zero_points, rows, cols, sb, block, zero):  # noqa: ANN001, ANN205
        return _dequantize_packed(packed, scales, zero_points, rows, cols, sb, zero)

    @staticmethod
    def symbolic(g, packed, scales, zero_points, rows, cols, sb, block, zero):  # noqa: ANN001, ANN205
        nb = scales.type().sizes()[1]
        codes = _onnx_unpack(g, packed, sb, [rows, nb, block])
        if zero_points is None:
            zeros = g.op("Constant", value_t=torch.tensor(float(zero)))
        else:
            per = 8 // sb
            flat = _onnx_unpack(g, zero_points, sb, [rows, -(-nb // per) * per])
            zeros = g.op("Slice", flat, _const(g, [0]), _const(g, [nb]), _const(g, [1]))
            zeros = g.op("Unsqueeze", zeros, _const(g, [2]))
        # Expand (which the exporter does not fold) keeps fp16 scales stored as fp16
        sc = g.op("Unsqueeze", scales, _const(g, [2]))
        sc = g.op("Cast", g.op("Expand", sc, _const(g, [1, 1, 1])), to_i=1)
        w = g.op("Mul", g.op("Sub", codes, zeros), sc)
        w = g.op("Reshape", w, _const(g, [rows, nb * block]))
        return g.op("Slice", w, _const(g, [0]), _const(g, [cols]), _const(g, [1]))


class _CastAtLoad(torch.autograd.Function):
    """ONNX export hook: a float16 constant cast to float32 behind an Expand, which the
    exporter does not fold (the file keeps float16) and ONNX Runtime folds at load."""

    @staticmethod
    def forward(ctx, t):  # noqa: ANN001, ANN205
        return t.float()

    @staticmethod
    def symbolic(g, t):  # noqa: ANN001, ANN205
        return g.op("Cast", g.op("Expand", t, _const(g, [1])), to_i=1)


def _unpack_rows(t: torch.Tensor, sb: int, rows: int) -> torch.Tensor:
    """The uint8 codes of a per-row packed buffer, ``(rows, -1)``."""
    if sb == 8:
        return t.reshape(rows, -1)
    return unpack(t.flatten(), sb, t.numel() * (8 // sb)).view(rows, -1)


def _dequantize_packed(packed: torch.Tensor, scales: torch.Tensor,
                       zero_points: torch.Tensor | None, rows: int, cols: int, sb: int,
                       zero: int) -> torch.Tensor:
    """``(u - z) * s`` from the packed buffers, cropped to ``cols`` columns (float32)."""
    nb = scales.shape[1]
    zeros = (torch.full((rows, nb), zero, dtype=torch.uint8, device=scales.device)
             if zero_points is None else _unpack_rows(zero_points, sb, rows)[:, :nb])
    return dequantize_codes(_unpack_rows(packed, sb, rows), scales, zeros, cols)


def _const(g, values: list[int]):  # noqa: ANN001, ANN202
    return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))


def _onnx_unpack(g, packed, sb: int, shape: list[int]):  # noqa: ANN001, ANN202
    """Float codes of a uint8 tensor holding ``8 // sb`` codes per byte (low bits first).

    Every path starts with a BitShift, which the exporter's constant folding leaves alone.
    """
    per = 8 // sb
    width = g.op("Constant", value_t=torch.tensor(sb % 8, dtype=torch.uint8))
    parts = []
    for i in range(per):
        shift = g.op("Constant", value_t=torch.tensor(sb * i, dtype=torch.uint8))
        hi = g.op("BitShift", packed, shift, direction_s="RIGHT")  # codes i.. of each byte
        code = g.op("Cast", hi, to_i=1)
        if i < per - 1:  # drop the codes above: hi - ((hi >> sb) << sb)
            top = g.op("BitShift", g.op("BitShift", hi, width, direction_s="RIGHT"), width,
                       direction_s="LEFT")
            code = g.op("Sub", code, g.op("Cast", top, to_i=1))
        parts.append(g.op("Unsqueeze", code, _const(g, [-1])))
    out = parts[0] if per == 1 else g.op("Concat", *parts, axis_i=-1)
    return g.op("Reshape", out, _const(g, shape))


class PackedWeight(nn.Module):
    """A module whose weight is stored as packed low-bit group-quantized codes.

    The weight is seen as a matrix ``(rows, cols)`` (a Linear's ``(out, in)``, a conv's
    ``(out, in / groups * kernel)``, an embedding table's ``(tokens, dim)``) cut into groups of
    ``block`` columns. Buffers: ``weight_packed`` (uint8 ``[rows, n_blocks, block *
    storage_bits / 8]``), ``scales`` (fp16 or fp32 ``[rows, n_blocks]``), ``zero_points``
    (uint8, packed per row; only when not the default ``2**(bits-1)``). Subclasses hold the
    layer's own arguments and an optional float ``bias``.
    """

    def _init_packed(self, rows: int, cols: int, bits: int, block: int, symmetric: bool,
                     scale_dtype: str) -> None:
        check_group_size(block)
        if scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"scale_dtype '{scale_dtype}' is not one of {list(SCALE_DTYPES)}")
        self.rows, self.cols = rows, cols
        self.bits, self.block, self.symmetric = bits, block, symmetric
        self.storage_bits = storage_bits(bits)
        self.scale_dtype = scale_dtype
        self.n_blocks = -(-cols // block)
        per = 8 // self.storage_bits
        self.register_buffer("weight_packed", torch.zeros(
            rows, self.n_blocks, block // per, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(rows, self.n_blocks,
                                                  dtype=SCALE_DTYPES[scale_dtype]))
        # symmetric codes filling their container use the runtime's default zero point
        # 2**(bits-1): nothing to store
        self.stores_zeros = not (symmetric and bits == self.storage_bits)
        if self.stores_zeros:
            self.register_buffer("zero_points", torch.zeros(
                rows, -(-self.n_blocks // per), dtype=torch.uint8))

    def _init_bias(self, present: bool) -> None:
        """A frozen bias stored in ``scale_dtype`` (its rounding is far below the codes')."""
        self.bias = (nn.Parameter(torch.zeros(self.rows, dtype=SCALE_DTYPES[self.scale_dtype]),
                                  requires_grad=False) if present else None)

    def _float_bias(self) -> torch.Tensor | None:
        """The bias in float32; under ONNX export a Cast that ONNX Runtime folds at load."""
        if self.bias is None or self.bias.dtype == torch.float32:
            return self.bias
        if torch.onnx.is_in_onnx_export():
            return _CastAtLoad.apply(self.bias)
        return self.bias.float()

    def load_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: torch.Tensor | None) -> PackedWeight:
        """Store codes/scales/zeros as :func:`rtn_quantize` returns them, and the bias."""
        sb = self.storage_bits
        self.weight_packed.copy_(pack(codes, sb).view_as(self.weight_packed))
        self.scales.copy_(scales.to(self.scales.dtype))
        if self.stores_zeros:
            self.zero_points.copy_(_pack_rows(zeros, sb))
        elif not bool((zeros == 1 << (self.bits - 1)).all()):
            raise ConfigError("symmetric codes must have the zero point 2**(bits-1)")
        if bias is not None:
            self.bias.data.copy_(round_scale(bias.detach().float(), self.scale_dtype))
        return self

    def _packed_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {kind} group={self.block}, scales={self.scale_dtype}"

    def codes(self) -> torch.Tensor:
        """Unsigned codes ``(rows, n_blocks * block)`` (uint8)."""
        return _unpack_rows(self.weight_packed, self.storage_bits, self.rows)

    def zeros(self) -> torch.Tensor:
        """Zero points ``(rows, n_blocks)`` (uint8)."""
        if not self.stores_zeros:
            return torch.full((self.rows, self.n_blocks), 1 << (self.bits - 1),
                              dtype=torch.uint8, device=self.scales.device)
        return _unpack_rows(self.zero_points, self.storage_bits, self.rows)[:, : self.n_blocks]

    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight matrix ``(rows, cols)`` (not cached).

        Under ONNX export this is one node whose symbolic unpacks the stored bytes.
        """
        zp, zero = (self.zero_points if self.stores_zeros else None), 1 << (self.bits - 1)
        args = (self.weight_packed, self.scales, zp, self.rows, self.cols, self.storage_bits)
        if torch.onnx.is_in_onnx_export():
            return _DequantizePacked.apply(*args, self.block, zero)
        return _dequantize_packed(*args, zero)

    def nbytes(self) -> int:
        """Bytes of the state (packed codes, scales, zero points, bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


class PackedLinear(PackedWeight):
    """A Linear layer with packed low-bit weights; ONNX export emits ``MatMulNBits``.

    Args:
        in_features, out_features: as in ``nn.Linear``.
        bits: code width, 2..8.
        block: group size along the input dimension (power of two >= 16).
        symmetric: zero point fixed at ``2**(bits-1)``.
        scale_dtype: ``float16`` or ``float32``, for the scales and the bias.
        bias: whether the layer has a bias.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, block: int = 128,
                 symmetric: bool = True, scale_dtype: str = "float16", bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_packed(out_features, in_features, bits, block, symmetric, scale_dtype)
        self._init_bias(bias)

    @classmethod
    def from_codes(cls, layer: nn.Linear, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, bits: int, block: int, symmetric: bool,
                   scale_dtype: str) -> PackedLinear:
        """Build from ``layer`` (for its bias) and codes/scales/zeros as :func:`rtn_quantize`."""
        new = cls(layer.in_features, layer.out_features, bits, block, symmetric, scale_dtype,
                  layer.bias is not None)
        return new.load_codes(codes, scales, zeros, layer.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self._packed_repr()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # the dequantized weight is dead in the graph
            y = _MatMulNBits.apply(x, self.weight_packed, self.scales.float().flatten(),
                                   self.zero_points.flatten() if self.stores_zeros else None,
                                   self.weight(), self.in_features,
                                   self.out_features, self.storage_bits, self.block)
            return y if self.bias is None else y + self._float_bias()
        bias = self._float_bias()
        return F.linear(x, self.weight().to(x.dtype), None if bias is None else bias.to(x.dtype))


class PackedConv(PackedWeight):
    """A Conv1d/2d/3d (zero padding) with packed weights: rows = output channels, columns =
    ``in_channels / groups * prod(kernel_size)``. ONNX: the dequantized weight feeds a Conv.

    Args:
        spec: the conv's arguments (``dim``, channels, kernel_size, stride, padding,
            dilation, groups, bias), as :meth:`spec_of` gives them.
        bits, block, symmetric, scale_dtype: as in :class:`PackedLinear`.
    """

    def __init__(self, spec: dict[str, Any], bits: int = 4, block: int = 128,
                 symmetric: bool = True, scale_dtype: str = "float16") -> None:
        super().__init__()
        self.spec = dict(spec)
        shape = self.weight_shape
        self._init_packed(shape[0], math.prod(shape[1:]), bits, block, symmetric, scale_dtype)
        self._init_bias(spec["bias"])

    @staticmethod
    def spec_of(conv: nn.modules.conv._ConvNd) -> dict[str, Any]:
        """The JSON-able arguments that rebuild ``conv``'s computation."""
        return {"dim": conv.weight.dim() - 2, "in_channels": conv.in_channels,
                "out_channels": conv.out_channels, "kernel_size": list(conv.kernel_size),
                "stride": list(conv.stride), "padding": conv.padding if isinstance(
                    conv.padding, str) else list(conv.padding),
                "dilation": list(conv.dilation), "groups": conv.groups,
                "bias": conv.bias is not None}

    @property
    def weight_shape(self) -> list[int]:
        s = self.spec
        return [s["out_channels"], s["in_channels"] // s["groups"], *s["kernel_size"]]

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{s['in_channels']}, {s['out_channels']}, kernel_size={tuple(s['kernel_size'])}"
                f", stride={tuple(s['stride'])}, groups={s['groups']}, {self._packed_repr()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        w = self.weight().reshape(self.weight_shape).to(x.dtype)
        conv = (F.conv1d, F.conv2d, F.conv3d)[s["dim"] - 1]
        padding = s["padding"] if isinstance(s["padding"], str) else tuple(s["padding"])
        bias = self._float_bias()
        bias = None if bias is None else bias.to(x.dtype)
        return conv(x, w, bias, tuple(s["stride"]), padding, tuple(s["dilation"]),
                    s["groups"])


class PackedEmbedding(PackedWeight):
    """An Embedding whose table is packed row-wise (groups along the embedding dimension).

    ONNX: the dequantized table feeds a Gather.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 bits: int = 4, block: int = 128, symmetric: bool = True,
                 scale_dtype: str = "float16") -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self._init_packed(num_embeddings, embedding_dim, bits, block, symmetric, scale_dtype)
        self.bias = None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._packed_repr()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight(), self.padding_idx)


def packed_nbytes(in_features: int, out_features: int, bits: int, block: int,
                  scale_dtype: str, bias: bool, symmetric: bool = True) -> int:
    """Bytes a :class:`PackedLinear` of this shape stores (without building it)."""
    sb, nb = storage_bits(bits), -(-in_features // block)
    per = 8 // sb
    zeros = 0 if symmetric and bits == sb else out_features * -(-nb // per)
    return (out_features * nb * (block // per)
            + out_features * nb * SCALE_DTYPES[scale_dtype].itemsize + zeros
            + SCALE_DTYPES[scale_dtype].itemsize * out_features * int(bias))


# ----------------------------------------------------------------------------- the technique

PLAN_FORMAT = "slimkit-weight-only-plan"
OTHER_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Embedding")  # what Linear-only techniques skip
LAYER_TYPES = {"Linear": ("Linear",), "Conv": ("Conv1d", "Conv2d", "Conv3d"),
               "Embedding": ("Embedding",)}


class WeightOnlyConfig(SlimConfig):
    """Weight-only quantization to packed 2..8-bit group-wise codes.

    Activations stay float; each weight row is cut into groups of ``group_size`` input
    columns with their own scale (and zero point). ``method="rtn"`` rounds to nearest;
    ``method="gptq"`` (Frantar et al. 2023) compensates each column's rounding error on the
    remaining columns using the layer's input Hessian from calibration data (Linear layers;
    convolutions and embedding tables are rounded to nearest, and the record says so).
    Linear layers run as ONNX Runtime's ``MatMulNBits``; packed convs and embedding tables
    are unpacked by ONNX Runtime once, when the session loads.

    Example:
        >>> WeightOnlyConfig(bits=4, group_size=128, method="gptq", exclude=["head"])
    """

    kind: Literal["weight_only_quant"] = "weight_only_quant"
    version: Literal[1] = Field(1, description="Config schema version.")
    bits: int = Field(4, ge=2, le=8, description="Code width in bits (2..8); 2 and 4 pack "
                      "4 and 2 codes per byte, 3 is stored in 4-bit and 5..7 in 8-bit slots.")
    group_size: int = Field(128, ge=0, description="Input columns sharing one scale: a power "
                            "of two >= 16, or 0 for one group per output row. A layer whose "
                            "width is not a multiple gets its last group zero-padded "
                            "(reported per layer).")
    symmetric: bool = Field(True, description="Zero point fixed at the middle of the range "
                            "(else per-group zero points covering [min, max]).")
    method: Literal["rtn", "gptq"] = Field("rtn", description="rtn: round to nearest; gptq: "
                                           "second-order error compensation (needs data).")
    scale_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Storage type of the per-group scales and of the layer's "
        "bias (computed in float32 either way).")
    layer_types: list[Literal["Linear", "Conv", "Embedding"]] = Field(
        default_factory=lambda: ["Linear"], min_length=1,
        description="Kinds of layers to pack: Linear, Conv (1/2/3-d, weight seen as "
        "out x in*kernel) and Embedding (tables packed row-wise). Linear only by default: "
        "a 4-bit input layer (a ViT's patch embedding) can cost accuracy; opt in per model.")
    include: list[str] = Field(default_factory=list,
                               description="Only these layers (name, re:REGEX or type:Class).")
    exclude: list[str] = Field(default_factory=list,
                               description="Leave these layers float (name, re:REGEX, type:).")
    calib_samples: int = Field(128, ge=1, description="Training samples used for calibration "
                               "(GPTQ Hessians, output-error report).")
    calib_batch: int = Field(32, ge=1, description="Batch size of the calibration passes.")
    percdamp: float = Field(0.01, ge=0.0, le=1.0, description="GPTQ dampening, as a fraction "
                            "of the Hessian's mean diagonal.")
    gptq_blocksize: int = Field(128, ge=1, description="GPTQ lazy-batch width in columns.")
    act_order: bool = Field(False, description="GPTQ: quantize columns by decreasing Hessian "
                            "diagonal (group qparams then fixed from the original weights).")
    damp_tries: int = Field(4, ge=0, le=10, description="GPTQ: times the dampening is raised "
                            "tenfold when the Hessian is not positive definite, before the "
                            "layer falls back to round-to-nearest.")
    seed: int = Field(0, description="Seed of the calibration subset.")

    @field_validator("group_size")
    @classmethod
    def _valid_group(cls, v: int) -> int:
        try:
            return check_group_size(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


def check_calibration(x: torch.Tensor, where: str) -> torch.Tensor:
    """Raise DataError for calibration inputs that are empty, non-finite or constant.

    Returns:
        ``x`` unchanged.
    """
    if x.numel() == 0:
        raise DataError(f"{where}: the calibration set is empty; give data with samples")
    if x.is_floating_point():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise DataError(f"{where}: the calibration inputs hold {bad} NaN/Inf values; "
                            "clean the data before quantizing")
    if bool((x == x.flatten()[0]).all()):
        raise DataError(f"{where}: the calibration inputs are constant (every value is "
                        f"{float(x.flatten()[0]):g}); give real samples so activations vary")
    return x


def _shape(layer: nn.Module) -> tuple[int, int]:
    """(rows, columns) of a layer's weight seen as a matrix."""
    w = layer.weight
    return w.shape[0], w[0].numel()


def _entry(name: str, layer: nn.Module, cfg: WeightOnlyConfig) -> dict[str, Any]:
    n, k = _shape(layer)
    bias = getattr(layer, "bias", None) is not None
    block = block_for(k, cfg.group_size)
    linear = isinstance(layer, nn.Linear)
    e: dict[str, Any] = {"type": type(layer).__name__, "in_features": k, "out_features": n,
                         "bias": bias}
    if isinstance(layer, nn.modules.conv._ConvNd):
        e["conv"] = PackedConv.spec_of(layer)
    elif isinstance(layer, nn.Embedding):
        e["padding_idx"] = layer.padding_idx
    method = cfg.method if linear else "rtn"
    if method != cfg.method:
        e["method_note"] = f"gptq covers Linear layers; {e['type']} rounded to nearest"
    return {**e, "bits": cfg.bits, "storage_bits": storage_bits(cfg.bits), "block": block,
            "symmetric": cfg.symmetric, "scale_dtype": cfg.scale_dtype, "method": method,
            "granularity": f"group:{block}", "padded_columns": (-k) % block,
            "bytes_before": 4 * (n * k + n * bias),
            "bytes_after": packed_nbytes(k, n, cfg.bits, block, cfg.scale_dtype, bias,
                                         cfg.symmetric)}


def _empty_packed(e: dict[str, Any]) -> PackedWeight:
    """An empty packed layer of the planned type and shape."""
    args = (e["bits"], e["block"], e["symmetric"], e["scale_dtype"])
    if "conv" in e:
        return PackedConv(e["conv"], *args)
    if e.get("type") == "Embedding":
        return PackedEmbedding(e["out_features"], e["in_features"], e["padding_idx"], *args)
    return PackedLinear(e["in_features"], e["out_features"], *args, e["bias"])


def _quantize_layer(layer: nn.Module, e: dict, cfg: WeightOnlyConfig,
                    hess: Any) -> tuple[PackedWeight, dict[str, Any]]:
    """Codes for one layer (RTN or GPTQ) and its error statistics."""
    from slimkit.quant.gptq import gptq_quantize, output_error

    w = layer.weight.detach().float().reshape(e["out_features"], -1)
    args = (cfg.bits, e["block"], cfg.symmetric, cfg.scale_dtype)
    stats: dict[str, Any] = {}
    rtn = rtn_quantize(w, *args)
    codes, scales, zeros = rtn
    if e["method"] == "gptq":
        if hess is None:
            stats["fallback"] = "not called on the calibration inputs: rounded to nearest"
        else:
            res = gptq_quantize(w, hess.h, *args, percdamp=cfg.percdamp,
                                blocksize=cfg.gptq_blocksize, act_order=cfg.act_order,
                                damp_tries=cfg.damp_tries)
            codes, scales, zeros = res.codes, res.scales, res.zeros
            stats.update(damp=res.info["damp"], fallback=res.info["fallback"],
                         dead_columns=res.info["dead_columns"])
    w_hat = dequantize_codes(codes, scales, zeros, w.shape[1])
    stats["weight_rel_error"] = float((w_hat - w).norm() / w.norm().clamp(min=1e-12))
    if hess is not None:
        stats["output_rel_error"] = output_error(w, w_hat, hess.h)
        if e["method"] == "gptq":
            w_rtn = dequantize_codes(*rtn, w.shape[1])
            stats["output_rel_error_rtn"] = output_error(w, w_rtn, hess.h)
    packed = _empty_packed(e).load_codes(codes, scales, zeros, getattr(layer, "bias", None))
    return packed, stats


def _calibration(cfg: WeightOnlyConfig, data: DataBundle | None,
                 calib_x: torch.Tensor | None) -> torch.Tensor | None:
    if calib_x is None and data is not None:
        calib_x = calibration_subset(data, cfg.calib_samples, cfg.seed)
    if calib_x is None:
        if cfg.method == "gptq":
            raise ConfigError("weight_only_quant: method 'gptq' needs calibration data "
                              "(give --data, or calib_x)")
        return None
    return check_calibration(calib_x, "weight_only_quant")


def _select(model: nn.Module, cfg: WeightOnlyConfig) -> tuple[dict[str, nn.Module], list]:
    types = [t for kind in cfg.layer_types for t in LAYER_TYPES[kind]]
    chosen, skipped = select_layers(model, types, cfg.include, cfg.exclude)
    for name, mod in list(chosen.items()):
        if getattr(mod, "padding_mode", "zeros") != "zeros":
            del chosen[name]
            skipped.append({"what": name, "why": f"padding_mode '{mod.padding_mode}': packed "
                            "convs support zero padding only; left float"})
    left = {t for kind, ts in LAYER_TYPES.items() if kind not in cfg.layer_types for t in ts}
    for name, mod in model.named_modules():
        if type(mod).__name__ in left:
            skipped.append({"what": name, "why": f"{type(mod).__name__}: not in layer_types "
                            f"{cfg.layer_types}; left float"})
    if not chosen:
        raise ConfigError(f"weight_only_quant: the model has no {'/'.join(cfg.layer_types)} "
                          f"layer to quantize (after include={cfg.include}, "
                          f"exclude={cfg.exclude})")
    return chosen, skipped


def _weight_only_quant(model: nn.Module, cfg: WeightOnlyConfig, data: DataBundle | None = None,
                       example_inputs: Sequence[torch.Tensor] | None = None,
                       calib_x: torch.Tensor | None = None) -> tuple[nn.Module, Record]:
    """Replace a copy's Linear / Conv / Embedding layers by packed ones (``model`` untouched).

    Args:
        model: any module with layers of ``cfg.layer_types``.
        cfg: the weight-only config.
        data: calibration data (``cfg.calib_samples`` stratified training samples); needed by
            GPTQ, optional for RTN (then used to report each layer's output error).
        example_inputs: inputs for the verification forward pass when no data is given.
        calib_x: calibration inputs given directly (instead of ``data``).

    Returns:
        The quantized copy and a Record: per layer bits, scheme, group size, padding, bytes
        before/after, weight and output errors (GPTQ: also RTN's, for comparison), fallbacks;
        skipped layers with the reason; ``details["plan"]`` rebuilds the structure.

    Raises:
        ConfigError: no layer selected, bad selectors, GPTQ without data.
        DataError: calibration inputs empty, constant or non-finite.
        ModelError: the quantized model produces NaN/Inf.

    Example:
        >>> small, rec = weight_only_quant(net, WeightOnlyConfig(bits=4, method="gptq"), data)
        >>> rec.details["totals"]["ratio"]
    """
    from slimkit.quant.gptq import collect_hessians

    work = copy.deepcopy(model)
    chosen, skipped = _select(work, cfg)
    calib = _calibration(cfg, data, calib_x)
    hess = {}
    linears = [n for n, m in chosen.items() if isinstance(m, nn.Linear)]
    if calib is not None and linears:
        batches = [(calib[i:i + cfg.calib_batch],) for i in range(0, len(calib), cfg.calib_batch)]
        hess = collect_hessians(work, linears, batches)
    plan = {"format": PLAN_FORMAT, "version": 1, "layers": {}}
    for name, layer in chosen.items():
        e = _entry(name, layer, cfg)
        if e["bytes_after"] >= e["bytes_before"]:
            skipped.append({"what": name, "why": f"packed form ({e['bytes_after']} B) would not "
                            f"be smaller than float ({e['bytes_before']} B): rows of "
                            f"{e['in_features']} pad to a block of {e['block']}"})
            continue
        packed, stats = _quantize_layer(layer, e, cfg, hess.get(name))
        replace_module(work, name, packed)
        plan["layers"][name] = {**e, **stats,
                                "calibration_samples": None if calib is None else len(calib)}
    example = (calib[:2],) if calib is not None else example_inputs
    verify_finite(work, example, "weight_only_quant")
    set_mode(work, model.training)
    return work, _record(plan, skipped)


def byte_totals(layers: dict[str, dict]) -> dict[str, float]:
    """Layers quantized, their weight bytes before and after, and the ratio."""
    before = sum(e["bytes_before"] for e in layers.values())
    after = sum(e["bytes_after"] for e in layers.values())
    return {"layers": len(layers), "bytes_before": before, "bytes_after": after,
            "ratio": before / after if after else 1.0}


def _record(plan: dict, skipped: list[dict]) -> Record:
    layers = plan["layers"]
    record = Record(skipped=skipped, details={"plan": plan, "layers": layers})
    for name, e in layers.items():
        scheme = "sym" if e["symmetric"] else "asym"
        pad = f", last group padded by {e['padded_columns']}" if e["padded_columns"] else ""
        err = (f", output error {e['output_rel_error']:.4f}" if "output_rel_error" in e
               else f", weight error {e['weight_rel_error']:.4f}")
        fb = "".join(f" [{e[k]}]" for k in ("fallback", "method_note") if e.get(k))
        record.changed.append(f"{name}: int{e['bits']} {scheme} group {e['block']} "
                              f"{e['method']}{pad}, {e['bytes_before']} -> {e['bytes_after']} B"
                              f"{err}{fb}")
    record.details["totals"] = byte_totals(layers)
    return record


def apply_plan(model: nn.Module, plan: dict) -> list[str]:
    """Put an empty packed layer of the planned type and shape at every planned layer.

    Raises:
        ConfigError: not a weight-only plan, or a layer missing / of another type or shape.
    """
    if plan.get("format") != PLAN_FORMAT:
        raise ConfigError(f"not a weight-only quantization plan (format {plan.get('format')!r})")
    modules = dict(model.named_modules())
    for name, e in plan["layers"].items():
        layer, kind = modules.get(name), e.get("type", "Linear")
        if type(layer).__name__ != kind:
            raise ConfigError(f"weight-only plan: layer '{name}' is not a {kind} of the model."
                              f"{did_you_mean(name, modules)}")
        if _shape(layer) != (e["out_features"], e["in_features"]):
            raise ConfigError(f"weight-only plan: layer '{name}' has a {_shape(layer)} weight "
                              f"matrix, the plan expects {(e['out_features'], e['in_features'])}")
        replace_module(model, name, _empty_packed(e))
    return list(plan["layers"])


@register_rebuilder("weight_only_quant")
def _rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: give a freshly built model the packed layers of ``plan``."""
    apply_plan(model, plan)
    return model


@register_stage(WeightOnlyConfig)
def weight_only_quant(model: SlimModel, cfg: WeightOnlyConfig,
                      ctx: StageContext) -> tuple[SlimModel, Record]:
    """Replace a copy's Linear/Conv/Embedding layers by packed ones (see
    :func:`_weight_only_quant`).
    """
    module, record = _weight_only_quant(model.module, cfg, ctx.data,
                                        example_inputs=model.example_inputs(2))
    if record.details["layers"]:
        # layers became packed ones: the artifact rebuilds them by replaying the plan.
        record.transforms.append(("weight_only_quant", record.details["plan"]))
    return model.copy(module), record
