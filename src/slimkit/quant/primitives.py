"""Pure quantization primitives: choose qparams, quantize, dequantize, pack.

Affine quantization maps a real ``x`` to an integer ``q = clamp(round(x / s) + z, qmin, qmax)``
and back with ``x_hat = (q - z) * s``. Rounding is half-to-even (``torch.round``), like ONNX
Runtime's QuantizeLinear, so slimkit's simulation and the runtime agree bit for bit.

One ``granularity`` argument says which elements share a scale:

- ``"tensor"``: one scale for the whole tensor;
- ``"channel"`` / ``"channel:AXIS"``: one per index along ``AXIS`` (default 0, output channels);
- ``"group:SIZE"`` / ``"group:SIZE:AXIS"``: one per block of ``SIZE`` consecutive elements along
  ``AXIS`` (default -1, the input dimension of a weight), for every index of the other dims.

Group-wise packed weight codes (weight-only quantization, GPTQ): a weight ``W`` of shape
``(N, K)`` is cut along its input dimension into blocks of ``block`` columns (the last block
zero-padded when ``K`` is not a multiple); each row of each block has its own scale ``s`` and
zero point ``z`` and holds unsigned codes ``u`` in ``[0, 2**bits)`` with ``W ~ (u - z) * s``.
Symmetric schemes use ``z = 2**(bits-1)`` (signed codes shifted to unsigned), asymmetric ones
the ``z`` covering the group's ``[min, max]``. Codes are stored packed per row in uint8
containers of ``storage_bits`` (2, 4 or 8).

Dynamic activation qparams (:func:`activation_qparams`) follow ONNX's DynamicQuantizeLinear.

These functions are pure (no modules, no state); modules and techniques call them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimkit.core.errors import ConfigError

#: Smallest scale ever used: an all-zero or constant range must never divide by zero.
SCALE_FLOOR = 1e-8
_F16 = torch.finfo(torch.float16)


@dataclass(frozen=True)
class Granularity:
    """Which elements share one scale: ``tensor``, ``channel`` (along ``axis``) or ``group``."""

    kind: str = "tensor"
    axis: int = 0
    group_size: int = 0

    @classmethod
    def parse(cls, spec: str | Granularity) -> Granularity:
        """``"tensor"``, ``"channel"``, ``"channel:1"``, ``"group:128"``, ``"group:64:0"``."""
        if isinstance(spec, Granularity):
            return spec
        parts = str(spec).split(":")
        try:
            if parts[0] == "tensor" and len(parts) == 1:
                return cls("tensor")
            if parts[0] == "channel" and len(parts) <= 2:
                return cls("channel", int(parts[1]) if len(parts) == 2 else 0)
            if parts[0] == "group" and len(parts) in (2, 3):
                size = int(parts[1])
                if size < 1:
                    raise ValueError
                return cls("group", int(parts[2]) if len(parts) == 3 else -1, size)
        except ValueError:
            pass
        raise ConfigError(f"granularity '{spec}' is not one of tensor, channel[:AXIS], "
                          "group:SIZE[:AXIS] (SIZE >= 1)")

    def __str__(self) -> str:
        if self.kind == "tensor":
            return "tensor"
        if self.kind == "channel":
            return f"channel:{self.axis}"
        return f"group:{self.group_size}:{self.axis}"


def qrange(bits: int, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
    """The integer range of a ``bits``-wide code (``narrow`` drops the most negative value).

    Raises:
        ConfigError: ``bits`` outside 2..8.
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"bit width {bits!r} is out of range: use an integer from 2 to 8")
    if signed:
        return -(1 << (bits - 1)) + int(narrow), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1 - int(narrow)


def _grouped(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    """View ``x`` with the group axis split into ``(n_groups, group_size)`` at that position."""
    axis = g.axis % x.dim()
    n = x.shape[axis]
    if n % g.group_size:
        raise ConfigError(f"dimension {axis} of size {n} is not divisible by the group size "
                          f"{g.group_size}: pad the tensor or choose another group size")
    return x.unflatten(axis, (n // g.group_size, g.group_size))


def reduce_range(x: torch.Tensor, granularity: str | Granularity = "tensor",
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` per scale-sharing block, shaped to broadcast against ``x``.

    For ``group`` granularity the results broadcast against ``_grouped(x)``: use
    :func:`quantize` / :func:`dequantize`, which handle the reshaping.
    """
    g = Granularity.parse(granularity)
    x = x.detach()
    if g.kind == "tensor":
        return x.amin().reshape([1] * x.dim()), x.amax().reshape([1] * x.dim())
    if g.kind == "channel":
        axis = g.axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    xg = _grouped(x, g)
    axis = g.axis % x.dim() + 1  # the within-group axis
    return xg.amin(dim=axis, keepdim=True), xg.amax(dim=axis, keepdim=True)


def choose_qparams(min_val: torch.Tensor, max_val: torch.Tensor, bits: int = 8,
                   symmetric: bool = True, signed: bool = True, narrow: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[min_val, max_val]`` (elementwise, any shape).

    The range is widened to include 0 so that zero (padding, ReLU output) is exact. Symmetric
    schemes put the zero point at the middle of the integer range (0 when signed).

    Returns:
        ``(scale, zero_point)``: float32 scale >= ``SCALE_FLOOR``, int32 zero point.

    Example:
        >>> s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), symmetric=False)
    """
    qmin, qmax = qrange(bits, signed, narrow)
    lo = torch.clamp(torch.as_tensor(min_val, dtype=torch.float64), max=0.0)
    hi = torch.clamp(torch.as_tensor(max_val, dtype=torch.float64), min=0.0)
    if symmetric:
        absmax = torch.maximum(-lo, hi)
        scale = absmax / ((qmax - qmin) / 2)
        zero = torch.full_like(scale, (qmin + qmax + 1) // 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.clamp(qmin - torch.round(lo / scale.clamp(min=SCALE_FLOOR)), qmin, qmax)
    scale = scale.clamp(min=SCALE_FLOOR).to(torch.float32)
    return scale, zero.to(torch.int32)


def _int_dtype(qmin: int, qmax: int) -> torch.dtype:
    return torch.uint8 if qmin >= 0 and qmax <= 255 else torch.int8


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
             qmax: int, granularity: str | Granularity = "tensor") -> torch.Tensor:
    """``clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` as int8/uint8.

    ``scale`` and ``zero_point`` are shaped as returned by :func:`choose_qparams` applied to
    :func:`reduce_range` (or plain scalars for ``tensor``).
    """
    g = Granularity.parse(granularity)
    xv = _grouped(x, g) if g.kind == "group" else x
    q = torch.clamp(torch.round(xv / scale) + zero_point, qmin, qmax)
    if g.kind == "group":
        q = q.flatten(g.axis % x.dim(), g.axis % x.dim() + 1)
    return q.to(_int_dtype(qmin, qmax))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               granularity: str | Granularity = "tensor") -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32."""
    g = Granularity.parse(granularity)
    qv = _grouped(q, g) if g.kind == "group" else q
    x = (qv.to(torch.float32) - zero_point.to(torch.float32)) * scale
    if g.kind == "group":
        x = x.flatten(g.axis % q.dim(), g.axis % q.dim() + 1)
    return x


def fake_quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = True, signed: bool = True,
                  granularity: str | Granularity = "tensor", narrow: bool = False,
                  ) -> torch.Tensor:
    """Quantize then dequantize ``x`` with qparams from its own min/max (weights, references)."""
    qmin, qmax = qrange(bits, signed, narrow)
    scale, zero = choose_qparams(*reduce_range(x, granularity), bits, symmetric, signed, narrow)
    return dequantize(quantize(x, scale, zero, qmin, qmax, granularity), scale, zero, granularity)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes of ``bits`` in {1, 2, 4, 8} (values in ``[0, 2**bits)``) into uint8 bytes.

    Element ``i`` goes to byte ``i // (8 // bits)``, low bits first (two INT4 per byte); the
    last byte is zero-padded. Signed codes must be offset to unsigned first (``q - qmin``).

    Raises:
        ConfigError: ``bits`` not in {1, 2, 4, 8} or codes out of range.
    """
    if bits not in (1, 2, 4, 8):
        raise ConfigError(f"can only pack 1, 2, 4 or 8-bit codes, not {bits}")
    flat = q.flatten().to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ConfigError(f"codes out of the unsigned {bits}-bit range; offset them by -qmin")
    per = 8 // bits
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as uint8 (reshape as needed)."""
    if bits not in (1, 2, 4, 8):
        raise ConfigError(f"can only unpack 1, 2, 4 or 8-bit codes, not {bits}")
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten()[:numel].to(torch.uint8)


# ------------------------------------------------------------- group-wise packed weight codes


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


def round_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """The float32 value of a *scale* once stored as ``scale_dtype``.

    A scale is positive by construction, so fp16 storage clamps it into ``[tiny, max]`` (a
    scale flushed to 0 would dequantize a whole group to 0). Only for scales: any signed
    value (a bias) goes through :func:`bias_dtype` and a plain cast instead.
    """
    if scale_dtype == "float16":
        return scale.clamp(_F16.tiny, _F16.max).to(torch.float16).to(torch.float32)
    return scale.to(torch.float32)


def bias_dtype(bias: torch.Tensor | None, scale_dtype: str) -> str:
    """The storage type of a packed layer's bias: ``scale_dtype`` when it holds every value.

    fp16 keeps a bias's sign and about 3 significant digits (a rounding far below the
    codes'), but not magnitudes beyond 65504 nor non-finite values; such a bias stays float32.

    Example:
        >>> bias_dtype(torch.tensor([-0.5, 1e5]), "float16")
        'float32'
    """
    if scale_dtype != "float16" or bias is None:
        return scale_dtype
    b = bias.detach().float()
    fits = b.numel() == 0 or (bool(torch.isfinite(b).all()) and float(b.abs().max()) <= _F16.max)
    return "float16" if fits else "float32"


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


def pack_rows(values: torch.Tensor, sbits: int) -> torch.Tensor:
    """Pack each row of a ``(N, M)`` code matrix separately (rows start on a byte)."""
    per = 8 // sbits
    width = -(-values.shape[1] // per) * per
    padded = F.pad(values.to(torch.int32), (0, width - values.shape[1]))
    return pack(padded, sbits).view(values.shape[0], width // per)


def unpack_rows(t: torch.Tensor, sb: int, rows: int) -> torch.Tensor:
    """The uint8 codes of a per-row packed buffer, ``(rows, -1)``."""
    if sb == 8:
        return t.reshape(rows, -1)
    return unpack(t.flatten(), sb, t.numel() * (8 // sb)).view(rows, -1)


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor,
                      zero_points: torch.Tensor | None, rows: int, cols: int, sb: int,
                      zero: int) -> torch.Tensor:
    """``(u - z) * s`` from the packed buffers, cropped to ``cols`` columns (float32)."""
    nb = scales.shape[1]
    zeros = (torch.full((rows, nb), zero, dtype=torch.uint8, device=scales.device)
             if zero_points is None else unpack_rows(zero_points, sb, rows)[:, :nb])
    return dequantize_codes(unpack_rows(packed, sb, rows), scales, zeros, cols)


# --------------------------------------------------------------- dynamic activation qparams


def activation_qparams(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 scale and zero point of ``x`` ``(..., K)``, as ONNX's DynamicQuantizeLinear.

    The range is widened to hold 0; ``scale = (max - min) / 255`` (1 for an all-zero range,
    as ONNX Runtime does) and ``zero = round(-min / scale)``.

    Returns:
        ``(scale, zero)`` float tensors shaped ``(..., 1)`` (per row) or ``()``.
    """
    if per_row:
        lo = x.amin(dim=-1, keepdim=True).clamp(max=0.0)
        hi = x.amax(dim=-1, keepdim=True).clamp(min=0.0)
    else:
        lo, hi = x.amin().clamp(max=0.0), x.amax().clamp(min=0.0)
    span = hi - lo
    scale = torch.where(span > 0, span / 255.0, 1.0)  # (a scalar: no shape baked in ONNX)
    zero = torch.clamp(torch.round(-lo / scale), 0.0, 255.0)
    return scale, zero
