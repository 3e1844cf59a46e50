"""Quantization-aware training with LSQ learned step sizes (Esser et al. 2019, "Learned Step
Size Quantization"); binary/ternary weights come from :mod:`slimkit.quant.extreme`.

The forward pass is the usual ``x_hat = (round(clip(x / s + z, qmin, qmax)) - z) * s``; the
rounding passes gradients straight through (STE), so

* ``d x_hat / d x`` is 1 inside the range and 0 where ``x`` is clipped;
* ``d x_hat / d s`` is ``round(x/s) - x/s`` inside the range and ``qmin - z`` / ``qmax - z``
  where it clips (the LSQ step-size gradient), multiplied by the gradient scale
  ``g = 1 / sqrt(N * qmax)`` with ``N`` the number of elements sharing one step size, so that
  the step size learns at the same relative pace as the weights.

The step size starts at ``2 * mean|x| / sqrt(qmax)`` (the paper's initialization, used by
:meth:`LsqQuant.calibrate_from`) or from a calibration range (:meth:`LsqQuant.set_range`).
After training :meth:`LsqQuant.to_fixed` returns a plain :class:`FakeQuant` with the learned
qparams, so a QAT model freezes and exports exactly like a PTQ model.

The ``qat`` technique: select layers -> wrap them (weights per output channel, symmetric; each
layer's input per tensor) -> activation ranges from a calibration pass (observers) ->
fine-tune with the shared training loop (optionally distilled from the float model) -> fixed
qparams, biases on the int32 grid ``s_x * s_w``, integer weight codes (bit-packed at <= 4
bits). The plans in the Record rebuild the structure (``quant_layers``, ``packed_quant``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.data.split import calibration_subset
from slimkit.distill.run import finetune
from slimkit.graph.select import select_layers
from slimkit.io import batch as B
from slimkit.io.linear import prepare_layers, shared_weights
from slimkit.io.model import SlimModel, set_mode
from slimkit.measure import verify_finite
from slimkit.quant.calibrate import calibrate_inputs, check_calibration
from slimkit.quant.config import QatConfig
from slimkit.quant.extreme import SignQuant, pack_layer, packed_bytes, spec_of
from slimkit.quant.modules import QUANTIZABLE, FakeQuant, QuantLayer, snap_bias
from slimkit.quant.plan import QUANTIZERS, QuantSpec, add_quant_transforms, wrap_layers
from slimkit.quant.primitives import SCALE_FLOOR, _grouped, choose_qparams, reduce_range
from slimkit.train.loop import evaluate_data


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, its gradient multiplied by ``g`` in the backward pass."""
    y = x * g
    return (x - y).detach() + y


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half-to-even in the forward pass, identity gradient (straight-through)."""
    return (torch.round(x) - x).detach() + x


class LsqQuant(FakeQuant):
    """A :class:`FakeQuant` whose ``scale`` is an ``nn.Parameter`` trained with LSQ.

    The zero point stays fixed (0 for symmetric signed codes; from the calibration range for
    asymmetric activations). Takes the same arguments as :class:`FakeQuant`.

    Example:
        >>> fq = LsqQuant(bits=4, granularity="channel")
        >>> fq.calibrate_from(weight)          # s = 2 mean|w| / sqrt(qmax) per channel
        >>> fq(weight).sum().backward()        # fq.scale.grad holds the LSQ gradient
    """

    def __init__(self, bits: int = 8, symmetric: bool = True, signed: bool = True,
                 granularity: str = "tensor", narrow: bool = False) -> None:
        super().__init__(bits, symmetric, signed, granularity, narrow)
        self.scale = nn.Parameter(torch.ones(()))  # replaces FakeQuant's buffer

    def extra_repr(self) -> str:
        return "lsq " + super().extra_repr()

    def _set(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        if self.granularity.kind == "tensor":
            scale, zero = scale.reshape(()), zero.reshape(())
        with torch.no_grad():
            self.scale.data = scale.to(self.scale.device, self.scale.dtype).clone()
        self.zero_point = zero.to(self.zero_point.device)

    def set_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        """Initialize the step size from a calibration range (as :class:`FakeQuant` does)."""
        self._set(*choose_qparams(min_val, max_val, self.bits, self.symmetric, self.signed,
                                  self.narrow))

    def calibrate_from(self, x: torch.Tensor) -> None:
        """LSQ initialization ``s = 2 mean|x| / sqrt(qmax)`` per scale-sharing block.

        Asymmetric quantizers take the zero point (and step) from ``x``'s range instead, since
        LSQ's mean-magnitude rule assumes a range centred on zero.
        """
        if not self.symmetric:
            return super().calibrate_from(x)
        x = x.detach().abs()
        g = self.granularity
        if g.kind == "tensor":
            mean = x.mean().reshape([1] * x.dim())
        elif g.kind == "channel":
            axis = g.axis % x.dim()
            mean = x.mean(dim=[d for d in range(x.dim()) if d != axis], keepdim=True)
        else:
            mean = _grouped(x, g).mean(dim=g.axis % x.dim() + 1, keepdim=True)
        scale = (2 * mean / math.sqrt(self.qmax)).clamp(min=SCALE_FLOOR)
        zero = torch.full_like(scale, (self.qmin + self.qmax + 1) // 2, dtype=torch.int32)
        self._set(scale, zero)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Saved qparams may have any shape: resize the parameter in place, keep its identity.
        if prefix + "scale" in state_dict:
            self.scale.data = torch.empty_like(state_dict[prefix + "scale"])
        if prefix + "zero_point" in state_dict:
            self.zero_point = torch.empty_like(state_dict[prefix + "zero_point"])
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def _broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Shape a per-channel qparam to broadcast against ``x`` (no-op for tensor/group)."""
        g = self.granularity
        if g.kind != "channel" or t.dim() == x.dim():
            return t
        shape = [1] * x.dim()
        shape[g.axis % x.dim()] = -1
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.granularity
        xv = _grouped(x, g) if g.kind == "group" else x
        s = self.scale.clamp(min=SCALE_FLOOR)
        # Gradient scale: 1 / sqrt(elements per step size * qmax).
        s = grad_scale(s, 1.0 / math.sqrt(max(1.0, x.numel() / s.numel()) * self.qmax))
        s = self._broadcast(s, xv)
        z = self._broadcast(self.zero_point, xv).to(x.dtype)
        q = round_ste(torch.clamp(xv / s + z, self.qmin, self.qmax))
        out = (q - z) * s
        if g.kind == "group":
            out = out.flatten(g.axis % x.dim(), g.axis % x.dim() + 1)
        return out

    def to_fixed(self) -> FakeQuant:
        """A plain :class:`FakeQuant` holding the learned qparams (frozen, exportable)."""
        fq = FakeQuant(self.bits, self.symmetric, self.signed, self.granularity, self.narrow)
        fq.scale = self.scale.detach().clamp(min=SCALE_FLOOR).to(torch.float32).clone()
        fq.zero_point = self.zero_point.clone()
        return fq.to(self.scale.device)


QUANTIZERS.register("lsq", LsqQuant)


def _layer_plan(names: list[str], cfg: QatConfig) -> dict[str, dict]:
    """The training-time spec of every selected layer (first/last may get their own width)."""
    ends = {names[0], names[-1]} if cfg.first_last_bits is not None else set()
    plan = {}
    for name in names:
        if name in ends:
            weight = QuantSpec(bits=cfg.first_last_bits, granularity=cfg.weight_granularity,
                               quantizer="lsq")
        else:
            weight = QuantSpec(bits=cfg.weight_bits, granularity=cfg.weight_granularity,
                               quantizer=cfg.weight_quantizer)
        act = None
        if cfg.act_bits is not None:
            act = QuantSpec(bits=cfg.act_bits, symmetric=cfg.act_symmetric,
                            signed=cfg.act_symmetric, quantizer=cfg.act_quantizer)
        plan[name] = {"weight": weight, "input": act, "output": None}
    return plan


def _scale_mean(fq: nn.Module | None) -> float | None:
    return None if fq is None else float(fq.scale.detach().float().mean())


def _convert(model: nn.Module, layers: dict[str, QuantLayer], cfg: QatConfig,
             ) -> tuple[dict, dict, dict[str, dict]]:
    """Fix the learned scales and freeze every layer (packed where asked).

    Returns:
        The ``quant_layers`` plan, the ``packed_quant`` plan and per-layer rows.
    """
    plain: dict[str, dict] = {}
    packed: dict[str, dict] = {}
    rows: dict[str, dict] = {}
    for name, ql in layers.items():
        wq = ql.weight_fq
        row = {"quantizer": type(wq).__name__, "granularity": str(wq.granularity),
               "scheme": "symmetric", "scale_mean_trained": _scale_mean(wq)}
        if isinstance(wq, SignQuant) or (cfg.pack and wq.qmax - wq.qmin < 16):
            entry = pack_layer(model, name)
            packed[name] = entry
            new = model.get_submodule(name)
            row.update(bits=1 if entry["binary"] else new.weight_fq.bits,
                       stored_bits=entry["code_bits"], bytes=packed_bytes(new))
        else:
            ql.weight_fq = wq.to_fixed() if hasattr(wq, "to_fixed") else wq
            if hasattr(ql.input_fq, "to_fixed"):
                ql.input_fq = ql.input_fq.to_fixed()
            ql.freeze()
            plain[name] = {"weight": spec_of(ql.weight_fq), "input": spec_of(ql.input_fq),
                           "output": None}
            new = ql
            row.update(bits=ql.weight_fq.bits, stored_bits=8,
                       bytes=ql.weight_q.numel() + 4 * ql.weight_fq.scale.numel())
        # Integer kernels add the bias on the int32 grid s_x * s_w: put it there (as PTQ does)
        # so the exported QDQ model computes what the frozen torch model computes.
        row["bias_clipped_to_int32"] = snap_bias(new)
        act = new.input_fq
        row.update(float_bytes=4 * new.weight_q.numel(),
                   act_scheme=None if act is None else
                   ("symmetric" if act.symmetric else "asymmetric"),
                   act_bits=None if new.input_fq is None else new.input_fq.bits,
                   act_scale=_scale_mean(new.input_fq))
        rows[name] = row
    return ({"layers": plain, "frozen": True} if plain else {},
            {"layers": packed} if packed else {}, rows)


def _qat(model: nn.Module, cfg: QatConfig, data: DataBundle,
         teacher: nn.Module | None = None, progress: bool = False,
         checkpoint_dir: str | Path | None = None) -> tuple[nn.Module, Record]:
    """Quantization-aware training of a copy of ``model``; ``model`` itself is untouched.

    Args:
        model: a float model with Linear/Conv layers.
        cfg: the QAT config.
        data: training data (calibration pass and fine-tuning; accuracy on its test split).
        teacher: for ``finetune.distill``; defaults to the float ``model``.
        progress: show the training progress bar.
        checkpoint_dir: resumable training checkpoints.

    Returns:
        The frozen quantized copy and a Record: per layer bits, quantizer, granularity,
        learned scales and bytes; accuracies float / quantized before training / after;
        ``details["plan"]`` (``quant_layers``) and ``details["packed_plan"]``
        (``packed_quant``) replay the structure.

    Raises:
        ConfigError: no quantizable layer, unknown quantizer, bad selectors.
        DataError: calibration data missing, NaN/Inf or constant.

    Example:
        >>> q, rec = qat(net, QatConfig(weight_bits=4, finetune={"epochs": 1}), data)
    """
    if data is None:
        raise ConfigError("qat needs training data (give --data)")
    for qname in {cfg.weight_quantizer, cfg.act_quantizer}:
        QUANTIZERS.get(qname)  # unknown names fail here, listing the known ones
    teacher = model if teacher is None else teacher
    work = copy.deepcopy(model)
    chosen, skipped = select_layers(work, QUANTIZABLE, cfg.include, cfg.exclude)
    if not chosen:
        raise ConfigError("qat: the model has no Linear/Conv layer to quantize (check "
                          "include/exclude)")
    calib = calibration_subset(data, min(cfg.calib_samples, data.n_train or cfg.calib_samples))
    check_calibration(calib)
    # Named tied layers (an LM head): the float matrix stays for the other holder, so
    # quantizing frees none of its bytes (found before wrapping renames the holder).
    tied = {n: o for n, o in shared_weights(work).items() if n in chosen}
    layers = wrap_layers(work, _layer_plan(list(chosen), cfg))
    for ql in layers.values():
        if cfg.weight_init == "range" and isinstance(ql.weight_fq, FakeQuant):
            ql.weight_fq.set_range(*reduce_range(ql.layer.weight, ql.weight_fq.granularity))
    init = {n: _scale_mean(ql.weight_fq) for n, ql in layers.items()}
    ranges = (calibrate_inputs(work, layers, calib, cfg.act_calibration)
              if cfg.act_bits is not None else {})
    # evaluate() switches to eval mode: measure a copy so the caller's model keeps its mode.
    acc = {"float": evaluate_data(copy.deepcopy(model), data),
           "quantized_before_training": evaluate_data(work, data)}
    history = finetune(work, data, cfg.finetune, teacher=teacher, progress=progress,
                       label="qat", checkpoint_dir=checkpoint_dir)
    acc["trained_fake_quant"] = evaluate_data(work, data)
    plan, packed_plan, rows = _convert(work, layers, cfg)
    verify_finite(work, (B.take(calib, slice(0, 8)),), "qat",
                  hint="; lower the learning rate or use more bits")
    acc["after"] = evaluate_data(work, data)
    record = Record(skipped=skipped, details={"plan": plan, "packed_plan": packed_plan,
                                              "accuracy": acc, "finetune": history})
    for name, row in rows.items():
        row.update(scale_mean_init=init[name], act_range=ranges.get(name),
                   calibration=cfg.act_calibration if name in ranges else None)
        note = ""
        if name in tied:
            row.update(float_bytes=0, shared_with=tied[name])
            note = f" [weight shared with {', '.join(tied[name])}: its float matrix stays]"
        record.changed.append(
            f"{name}: {row['quantizer']} {row['bits']}-bit weights ({row['granularity']}), "
            f"activations {row['act_bits'] or 'float'}, {row['float_bytes']:,} -> "
            f"{row['bytes']:,} bytes{note}")
    record.details["layers"] = rows
    set_mode(work, model.training)
    return work, record


@register_stage(QatConfig)
def qat(model: SlimModel, cfg: QatConfig,
        ctx: StageContext) -> tuple[SlimModel, Record]:
    """Quantization-aware training of a copy of ``model`` (see :func:`_qat`).

    Hugging Face Conv1D layers are converted to Linear first; a tied layer is left float
    unless named in ``include`` (see :func:`slimkit.io.linear.prepare_layers`).
    """
    model, cfg, prep = prepare_layers(model, cfg, "qat")
    module, record = _qat(model.module, cfg, ctx.data, teacher=ctx.teacher_module,
                          progress=ctx.progress, checkpoint_dir=ctx.workdir)
    add_quant_transforms(record)
    return model.copy(module), prep.finish(record)
