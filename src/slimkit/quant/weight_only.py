"""Packed low-bit weights: group-wise qparams, round-to-nearest codes and ``PackedLinear``.

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
registers the rebuilder that lets artifacts of zoo models replay the packed structure.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from slimkit.core.config import SlimConfig
from slimkit.core.errors import ConfigError, DataError, did_you_mean
from slimkit.core.record import Record
from slimkit.data.bundle import DataBundle
from slimkit.data.split import calibration_subset
from slimkit.graph.select import select_layers
from slimkit.io.model import set_mode
from slimkit.io.transforms import register_rebuilder
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


class PackedLinear(nn.Module):
    """A Linear layer whose weight is stored as packed low-bit group-quantized codes.

    Buffers: ``weight_packed`` (uint8 ``[N, n_blocks, block * storage_bits / 8]``),
    ``scales`` (fp16 or fp32 ``[N, n_blocks]``), ``zero_points`` (uint8, packed per row);
    ``bias`` (float, optional). The forward dequantizes and runs ``F.linear``; ONNX export
    emits ``com.microsoft::MatMulNBits`` over the same bytes.

    Args:
        in_features, out_features: as in ``nn.Linear``.
        bits: code width, 2..8.
        block: group size along the input dimension (power of two >= 16).
        symmetric: zero point fixed at ``2**(bits-1)``.
        scale_dtype: ``float16`` or ``float32``.
        bias: whether the layer has a bias.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, block: int = 128,
                 symmetric: bool = True, scale_dtype: str = "float16", bias: bool = True) -> None:
        super().__init__()
        check_group_size(block)
        if scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"scale_dtype '{scale_dtype}' is not one of {list(SCALE_DTYPES)}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.block, self.symmetric = bits, block, symmetric
        self.storage_bits = storage_bits(bits)
        self.scale_dtype = scale_dtype
        self.n_blocks = -(-in_features // block)
        per = 8 // self.storage_bits
        self.register_buffer("weight_packed", torch.zeros(
            out_features, self.n_blocks, block // per, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, self.n_blocks,
                                                  dtype=SCALE_DTYPES[scale_dtype]))
        # symmetric codes filling their container use the runtime's default zero point
        # 2**(bits-1): nothing to store
        self.stores_zeros = not (symmetric and bits == self.storage_bits)
        if self.stores_zeros:
            self.register_buffer("zero_points", torch.zeros(
                out_features, -(-self.n_blocks // per), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, layer: nn.Linear, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, bits: int, block: int, symmetric: bool,
                   scale_dtype: str) -> PackedLinear:
        """Build from ``layer`` (for its bias) and codes/scales/zeros as :func:`rtn_quantize`."""
        new = cls(layer.in_features, layer.out_features, bits, block, symmetric, scale_dtype,
                  layer.bias is not None)
        sb = new.storage_bits
        new.weight_packed.copy_(pack(codes, sb).view_as(new.weight_packed))
        new.scales.copy_(scales.to(new.scales.dtype))
        if new.stores_zeros:
            new.zero_points.copy_(_pack_rows(zeros, sb))
        elif not bool((zeros == 1 << (bits - 1)).all()):
            raise ConfigError("symmetric codes must have the zero point 2**(bits-1)")
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach().float())
        return new

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits} {kind} group={self.block}, scales={self.scale_dtype}")

    def codes(self) -> torch.Tensor:
        """Unsigned codes ``(N, n_blocks * block)`` (uint8)."""
        return unpack(self.weight_packed.flatten(), self.storage_bits,
                      self.weight_packed.numel() * (8 // self.storage_bits)
                      ).view(self.out_features, -1)

    def zeros(self) -> torch.Tensor:
        """Zero points ``(N, n_blocks)`` (uint8)."""
        if not self.stores_zeros:
            return torch.full((self.out_features, self.n_blocks), 1 << (self.bits - 1),
                              dtype=torch.uint8, device=self.scales.device)
        per = 8 // self.storage_bits
        z = unpack(self.zero_points.flatten(), self.storage_bits, self.zero_points.numel() * per)
        return z.view(self.out_features, -1)[:, : self.n_blocks]

    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight ``(out_features, in_features)`` (not cached)."""
        return dequantize_codes(self.codes(), self.scales, self.zeros(), self.in_features)

    def _traceable_weight(self) -> torch.Tensor:
        """:meth:`weight` in float arithmetic only (exportable ops; the exporter drops it)."""
        sb, per = self.storage_bits, 8 // self.storage_bits

        def split(packed: torch.Tensor) -> torch.Tensor:
            p = packed.to(torch.float32).unsqueeze(-1)
            div = torch.tensor([float(1 << (sb * i)) for i in range(per + 1)])
            levels = torch.floor(p / div)
            return (levels[..., :-1] - levels[..., 1:] * float(1 << sb)).flatten(-2)

        codes = split(self.weight_packed).flatten(1)
        zeros = (split(self.zero_points)[:, : self.n_blocks] if self.stores_zeros
                 else self.zeros())
        return dequantize_codes(codes, self.scales, zeros, self.in_features)

    def nbytes(self) -> int:
        """Bytes of the state (packed codes, scales, zero points, bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            y = _MatMulNBits.apply(x, self.weight_packed, self.scales.float().flatten(),
                                   self.zero_points.flatten() if self.stores_zeros else None,
                                   self._traceable_weight(),
                                   self.in_features,
                                   self.out_features, self.storage_bits, self.block)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight().to(x.dtype), self.bias)


def packed_nbytes(in_features: int, out_features: int, bits: int, block: int,
                  scale_dtype: str, bias: bool, symmetric: bool = True) -> int:
    """Bytes a :class:`PackedLinear` of this shape stores (without building it)."""
    sb, nb = storage_bits(bits), -(-in_features // block)
    per = 8 // sb
    zeros = 0 if symmetric and bits == sb else out_features * -(-nb // per)
    return (out_features * nb * (block // per)
            + out_features * nb * SCALE_DTYPES[scale_dtype].itemsize + zeros
            + 4 * out_features * int(bias))


# ----------------------------------------------------------------------------- the technique

PLAN_FORMAT = "slimkit-weight-only-plan"
OTHER_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Embedding")


class WeightOnlyConfig(SlimConfig):
    """Weight-only quantization of Linear layers to packed 2..8-bit group-wise codes.

    Activations stay float; each weight row is cut into groups of ``group_size`` input
    columns with their own scale (and zero point). ``method="rtn"`` rounds to nearest;
    ``method="gptq"`` (Frantar et al. 2023) compensates each column's rounding error on the
    remaining columns using the layer's input Hessian from calibration data.

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
        "float16", description="Storage type of the per-group scales.")
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


def _entry(name: str, layer: nn.Linear, cfg: WeightOnlyConfig) -> dict[str, Any]:
    block = block_for(layer.in_features, cfg.group_size)
    k, n = layer.in_features, layer.out_features
    before = 4 * (n * k + (n if layer.bias is not None else 0))
    after = packed_nbytes(k, n, cfg.bits, block, cfg.scale_dtype, layer.bias is not None,
                          cfg.symmetric)
    return {"in_features": k, "out_features": n, "bias": layer.bias is not None,
            "bits": cfg.bits, "storage_bits": storage_bits(cfg.bits), "block": block,
            "symmetric": cfg.symmetric, "scale_dtype": cfg.scale_dtype, "method": cfg.method,
            "granularity": f"group:{block}", "padded_columns": (-k) % block,
            "bytes_before": before, "bytes_after": after}


def _quantize_layer(layer: nn.Linear, e: dict, cfg: WeightOnlyConfig,
                    hess: Any) -> tuple[PackedLinear, dict[str, Any]]:
    """Codes for one layer (RTN or GPTQ) and its error statistics."""
    from slimkit.quant.gptq import gptq_quantize, output_error

    w = layer.weight.detach().float()
    args = (cfg.bits, e["block"], cfg.symmetric, cfg.scale_dtype)
    stats: dict[str, Any] = {}
    rtn = rtn_quantize(w, *args)
    codes, scales, zeros = rtn
    if cfg.method == "gptq":
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
        if cfg.method == "gptq":
            w_rtn = dequantize_codes(*rtn, w.shape[1])
            stats["output_rel_error_rtn"] = output_error(w, w_rtn, hess.h)
    packed = PackedLinear.from_codes(layer, codes, scales, zeros, *args)
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
    chosen, skipped = select_layers(model, ["Linear"], cfg.include, cfg.exclude)
    for name, mod in model.named_modules():
        if type(mod).__name__ in OTHER_TYPES:
            skipped.append({"what": name, "why": f"{type(mod).__name__}: weight-only packing "
                                                 "covers Linear layers only; left float"})
    if not chosen:
        raise ConfigError("weight_only_quant: the model has no Linear layer to quantize "
                          f"(after include={cfg.include}, exclude={cfg.exclude})")
    return chosen, skipped


def weight_only_quant(model: nn.Module, cfg: WeightOnlyConfig, data: DataBundle | None = None,
                      example_inputs: Sequence[torch.Tensor] | None = None,
                      calib_x: torch.Tensor | None = None) -> tuple[nn.Module, Record]:
    """Replace a copy's Linear layers by :class:`PackedLinear` (``model`` is left untouched).

    Args:
        model: any module with Linear layers.
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
        ConfigError: no Linear layer selected, bad selectors, GPTQ without data.
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
    if calib is not None:
        batches = [(calib[i:i + cfg.calib_batch],) for i in range(0, len(calib), cfg.calib_batch)]
        hess = collect_hessians(work, list(chosen), batches)
    plan = {"format": PLAN_FORMAT, "version": 1, "layers": {}}
    for name, layer in chosen.items():
        e = _entry(name, layer, cfg)
        if e["bytes_after"] >= e["bytes_before"]:
            skipped.append({"what": name, "why": f"packed form ({e['bytes_after']} B) would not "
                            f"be smaller than float ({e['bytes_before']} B): in_features "
                            f"{e['in_features']} pads to a block of {e['block']}"})
            continue
        packed, stats = _quantize_layer(layer, e, cfg, hess.get(name))
        replace_module(work, name, packed)
        plan["layers"][name] = {**e, **stats,
                                "calibration_samples": None if calib is None else len(calib)}
    if plan["layers"] and hasattr(work, "slimkit_spec"):
        del work.slimkit_spec  # the zoo spec alone rebuilds float layers: the plan is needed
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
        fb = f" [{e['fallback']}]" if e.get("fallback") else ""
        record.changed.append(f"{name}: int{e['bits']} {scheme} group {e['block']} "
                              f"{e['method']}{pad}, {e['bytes_before']} -> {e['bytes_after']} B"
                              f"{err}{fb}")
    record.details["totals"] = byte_totals(layers)
    return record


def apply_plan(model: nn.Module, plan: dict) -> list[str]:
    """Put an empty :class:`PackedLinear` of the planned shape at every planned layer.

    Raises:
        ConfigError: not a weight-only plan, or a layer missing / of another shape.
    """
    if plan.get("format") != PLAN_FORMAT:
        raise ConfigError(f"not a weight-only quantization plan (format {plan.get('format')!r})")
    modules = dict(model.named_modules())
    for name, e in plan["layers"].items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise ConfigError(f"weight-only plan: layer '{name}' is not a Linear of the model."
                              f"{did_you_mean(name, modules)}")
        if (layer.in_features, layer.out_features) != (e["in_features"], e["out_features"]):
            raise ConfigError(f"weight-only plan: layer '{name}' is {layer.in_features}->"
                              f"{layer.out_features}, the plan expects {e['in_features']}->"
                              f"{e['out_features']}")
        replace_module(model, name, PackedLinear(
            e["in_features"], e["out_features"], e["bits"], e["block"], e["symmetric"],
            e["scale_dtype"], e["bias"]))
    return list(plan["layers"])


@register_rebuilder("weight_only_quant")
def _rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: give a freshly built model the packed layers of ``plan``."""
    apply_plan(model, plan)
    return model
