"""Pure quantization primitives: choose qparams, quantize, dequantize, pack.

Affine quantization maps a real ``x`` to an integer ``q = clamp(round(x / s) + z, qmin, qmax)``
and back with ``x_hat = (q - z) * s``. Rounding is half-to-even (``torch.round``), like ONNX
Runtime's QuantizeLinear, so slimkit's simulation and the runtime agree bit for bit.

One ``granularity`` argument says which elements share a scale:

- ``"tensor"``: one scale for the whole tensor;
- ``"channel"`` / ``"channel:AXIS"``: one per index along ``AXIS`` (default 0, output channels);
- ``"group:SIZE"`` / ``"group:SIZE:AXIS"``: one per block of ``SIZE`` consecutive elements along
  ``AXIS`` (default -1, the input dimension of a weight), for every index of the other dims.

These functions are pure (no modules, no state); modules and techniques call them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.core.errors import ConfigError

#: Smallest scale ever used: an all-zero or constant range must never divide by zero.
SCALE_FLOOR = 1e-8


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
