"""Packed low-bit weight layers (``PackedLinear``, ``PackedConv``, ``PackedEmbedding``) and
their ONNX export functions.

The codes are group-wise (see :mod:`slimkit.quant.primitives`) and stored packed in uint8
(``storage_bits``: 2 for 2-bit, 4 for 3/4-bit, 8 above; two INT4 per byte), in exactly the
layout of ONNX Runtime's ``com.microsoft::MatMulNBits`` (``B: [N, n_blocks, block *
storage_bits / 8]``, zero points packed per row), so the ONNX export hands the same bytes to a
native blockwise-int4/int8 kernel (symmetric 2/4/8-bit codes use its default zero point and
store none). The forward dequantizes at every call and caches nothing in its state: the state
dict holds only packed integers, scales, zero points and the bias, so files really shrink.
The bias is stored as it is (in ``scale_dtype`` when that holds every value, else float32;
never clamped like the positive scales), so negative biases keep their sign.

Packed convs and embedding tables export a graph that unpacks the stored bytes with standard
ops, which ONNX Runtime folds at load. The technique that builds these layers is
:mod:`slimkit.quant.weight_only`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.quant.config import check_group_size
from slimkit.quant.primitives import (
    bias_dtype,
    dequantize_packed,
    pack,
    pack_rows,
    storage_bits,
    unpack_rows,
)

SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


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
        return dequantize_packed(packed, scales, zero_points, rows, cols, sb, zero)

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

    def _init_bias(self, present: bool, dtype: str | None = None) -> None:
        """A frozen bias stored in ``dtype`` (default ``scale_dtype``; fp16 rounding is far
        below the codes')."""
        dtype = dtype or self.scale_dtype
        if dtype not in SCALE_DTYPES:
            raise ConfigError(f"bias dtype '{dtype}' is not one of {list(SCALE_DTYPES)}")
        self.bias = (nn.Parameter(torch.zeros(self.rows, dtype=SCALE_DTYPES[dtype]),
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
        """Store codes/scales/zeros as :func:`~slimkit.quant.primitives.rtn_quantize` returns
        them, and the bias."""
        sb = self.storage_bits
        self.weight_packed.copy_(pack(codes, sb).view_as(self.weight_packed))
        self.scales.copy_(scales.to(self.scales.dtype))
        if self.stores_zeros:
            self.zero_points.copy_(pack_rows(zeros, sb))
        elif not bool((zeros == 1 << (self.bits - 1)).all()):
            raise ConfigError("symmetric codes must have the zero point 2**(bits-1)")
        if bias is not None:
            # a plain cast (round to nearest, sign kept); round_scale's clamp is for scales
            stored = bias.detach().to(self.bias.dtype)
            if not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(bias).all()):
                raise ConfigError(f"a bias value of {float(bias.abs().max()):.4g} does not fit "
                                  f"{self.bias.dtype}: build the layer with bias_dtype "
                                  "'float32'")
            self.bias.data.copy_(stored)
        return self

    def _packed_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {kind} group={self.block}, scales={self.scale_dtype}"

    def codes(self) -> torch.Tensor:
        """Unsigned codes ``(rows, n_blocks * block)`` (uint8)."""
        return unpack_rows(self.weight_packed, self.storage_bits, self.rows)

    def zeros(self) -> torch.Tensor:
        """Zero points ``(rows, n_blocks)`` (uint8)."""
        if not self.stores_zeros:
            return torch.full((self.rows, self.n_blocks), 1 << (self.bits - 1),
                              dtype=torch.uint8, device=self.scales.device)
        return unpack_rows(self.zero_points, self.storage_bits, self.rows)[:, : self.n_blocks]

    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight matrix ``(rows, cols)`` (not cached).

        Under ONNX export this is one node whose symbolic unpacks the stored bytes.
        """
        zp, zero = (self.zero_points if self.stores_zeros else None), 1 << (self.bits - 1)
        args = (self.weight_packed, self.scales, zp, self.rows, self.cols, self.storage_bits)
        if torch.onnx.is_in_onnx_export():
            return _DequantizePacked.apply(*args, self.block, zero)
        return dequantize_packed(*args, zero)

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
        scale_dtype: ``float16`` or ``float32``, for the scales (and by default the bias).
        bias: whether the layer has a bias.
        bias_dtype: the bias's storage type (None: ``scale_dtype``); see
            :func:`~slimkit.quant.primitives.bias_dtype`.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, block: int = 128,
                 symmetric: bool = True, scale_dtype: str = "float16", bias: bool = True,
                 bias_dtype: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_packed(out_features, in_features, bits, block, symmetric, scale_dtype)
        self._init_bias(bias, bias_dtype)

    @classmethod
    def from_codes(cls, layer: nn.Linear, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, bits: int, block: int, symmetric: bool,
                   scale_dtype: str) -> PackedLinear:
        """Build from ``layer`` (for its bias) and codes/scales/zeros as
        :func:`~slimkit.quant.primitives.rtn_quantize` returns them."""
        new = cls(layer.in_features, layer.out_features, bits, block, symmetric, scale_dtype,
                  layer.bias is not None, bias_dtype(layer.bias, scale_dtype))
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
        bits, block, symmetric, scale_dtype, bias_dtype: as in :class:`PackedLinear`.
    """

    def __init__(self, spec: dict[str, Any], bits: int = 4, block: int = 128,
                 symmetric: bool = True, scale_dtype: str = "float16",
                 bias_dtype: str | None = None) -> None:
        super().__init__()
        self.spec = dict(spec)
        shape = self.weight_shape
        self._init_packed(shape[0], math.prod(shape[1:]), bits, block, symmetric, scale_dtype)
        self._init_bias(spec["bias"], bias_dtype)

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
                  scale_dtype: str, bias: bool, symmetric: bool = True,
                  bias_dtype: str | None = None) -> int:
    """Bytes a :class:`PackedLinear` of this shape stores (without building it)."""
    sb, nb = storage_bits(bits), -(-in_features // block)
    per = 8 // sb
    zeros = 0 if symmetric and bits == sb else out_features * -(-nb // per)
    return (out_features * nb * (block // per)
            + out_features * nb * SCALE_DTYPES[scale_dtype].itemsize + zeros
            + SCALE_DTYPES[bias_dtype or scale_dtype].itemsize * out_features * int(bias))
