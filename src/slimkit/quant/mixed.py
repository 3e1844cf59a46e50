"""Mixed precision: per-layer sensitivity, float fallback and bit-width allocation.

Each selected layer's *sensitivity* at a width ``b`` is the damage done when only that layer's
weight is rounded to ``b`` bits (per output channel, symmetric, round-to-nearest): the
relative MSE ``||f_q(x) - f(x)||^2 / ||f(x)||^2`` or ``1 - cosine`` of the model output on a
calibration batch, or the top-1 accuracy drop on the evaluation data.

Two policies use it:

* ``fallback``: quantize every layer at the highest width, then move the most sensitive
  layers back to float one at a time until the measured accuracy drop is within budget
  (the automatic float fallback of accuracy-aware quantization tools);
* ``size``: choose a width from {8, 4, 2, float} per layer so that the weights fit a byte
  budget while the summed sensitivity is smallest: an exact search over every assignment
  when there are few, else greedy by sensitivity added per byte saved. The accuracy of the
  result is then measured; an unreachable budget is reported and the smallest assignment kept.

Weights only by default; ``act_bits`` adds min/max-calibrated per-tensor activation
quantization to every quantized layer. 8-bit weights are stored as int8 codes, 2/4-bit ones
bit-packed, so the bytes reported are the bytes saved.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.data.split import calibration_subset
from slimkit.graph.select import select_layers
from slimkit.io.linear import prepare_layers, shared_weights
from slimkit.io.model import SlimModel, set_mode
from slimkit.measure.quality import predict
from slimkit.quant.calibrate import calibrate_inputs, check_calibration
from slimkit.quant.config import MixedPrecisionConfig
from slimkit.quant.extreme import pack_layer
from slimkit.quant.modules import QUANTIZABLE, snap_bias
from slimkit.quant.plan import QuantSpec, add_quant_transforms, wrap_layers
from slimkit.quant.primitives import fake_quantize
from slimkit.train.loop import score

FLOAT = 32  # "bits" of a layer left in float
#: Most assignments searched exhaustively before falling back to the greedy allocation.
EXACT_LIMIT = 4096


def weight_bytes(weight: torch.Tensor, bits: int) -> int:
    """Stored bytes of ``weight`` at ``bits`` (codes packed + one float32 scale per output
    channel), or its float32 bytes for ``FLOAT``."""
    if bits == FLOAT:
        return 4 * weight.numel()
    return math.ceil(weight.numel() * bits / 8) + 4 * weight.shape[0]


def _rtn(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest weights: symmetric narrow range, one scale per output channel."""
    return fake_quantize(weight, bits, True, True, "channel", narrow=True)


def _damage(out: torch.Tensor, ref: torch.Tensor, metric: str) -> float:
    out, ref = out.double().flatten(1), ref.double().flatten(1)
    if metric == "cosine":
        return float(1 - F.cosine_similarity(out, ref, dim=1).mean())
    return float(((out - ref) ** 2).sum() / (ref ** 2).sum().clamp(min=1e-30))


def layer_sensitivity(model: nn.Module, layers: dict[str, nn.Module], bits: list[int],
                      x: torch.Tensor, metric: str = "mse",
                      eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                      ) -> dict[str, dict[int, float]]:
    """Damage of quantizing one layer's weight at a time (``model`` is restored after).

    Args:
        layers: the candidate layers by name (Linear/Conv with a ``weight``).
        bits: widths to measure.
        x: calibration inputs (``mse`` / ``cosine``).
        metric: ``mse`` (relative), ``cosine`` (1 - cos) or ``accuracy`` (top-1 drop in
            points on ``eval_data``).

    Returns:
        ``{name: {bits: damage}}``; float (``FLOAT``) is 0 by definition.
    """
    set_mode(model, False)
    if metric == "accuracy":
        if eval_data is None:
            raise ConfigError("sensitivity 'accuracy' needs evaluation data")
        base = score(model, *eval_data)
    else:
        ref = predict(model, x)
    table: dict[str, dict[int, float]] = {}
    for name, layer in layers.items():
        w = layer.weight.data
        table[name] = {FLOAT: 0.0}
        for b in bits:
            layer.weight.data = _rtn(w, b)
            try:
                if metric == "accuracy":
                    table[name][b] = base - score(model, *eval_data)
                else:
                    table[name][b] = _damage(predict(model, x), ref, metric)
            finally:
                layer.weight.data = w
    return table


def allocate_bits(sens: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]],
                  budget: int) -> tuple[dict[str, int], bool, str]:
    """Widths per layer with the smallest summed sensitivity whose bytes fit ``budget``.

    Exact (every assignment) when there are at most ``EXACT_LIMIT``; otherwise greedy from
    all-float, each step taking the width reduction with the least sensitivity added per
    byte saved.

    Returns:
        ``(assignment, met, method)``; when no assignment fits, the smallest one and False.
    """
    names = list(sens)
    options = {n: sorted(sens[n], reverse=True) for n in names}
    total = math.prod(len(o) for o in options.values())
    if total <= EXACT_LIMIT:
        best, best_key = None, None
        for combo in itertools.product(*(options[n] for n in names)):
            nbytes = sum(sizes[n][b] for n, b in zip(names, combo, strict=True))
            cost = sum(sens[n][b] for n, b in zip(names, combo, strict=True))
            key = (nbytes > budget, cost if nbytes <= budget else nbytes)
            if best_key is None or key < best_key:
                best, best_key = dict(zip(names, combo, strict=True)), key
        return best, not best_key[0], "exact"
    assign = {n: options[n][0] for n in names}
    while sum(sizes[n][assign[n]] for n in names) > budget:
        moves = []
        for n in names:
            i = options[n].index(assign[n])
            # A narrower width that saves nothing (a tied layer: float costs 0) is no move.
            if i + 1 < len(options[n]) and sizes[n][assign[n]] > sizes[n][options[n][i + 1]]:
                b = options[n][i + 1]
                saved = sizes[n][assign[n]] - sizes[n][b]
                added = sens[n][b] - sens[n][assign[n]]
                moves.append((added / max(saved, 1), n, b))
        if not moves:
            return assign, False, "greedy"
        _, n, b = min(moves)
        assign[n] = b
    return assign, True, "greedy"


def build_mixed(model: nn.Module, assign: dict[str, int], act_bits: int | None,
                calib: torch.Tensor) -> tuple[nn.Module, dict, dict]:
    """A frozen copy of ``model`` with each layer at its width (``FLOAT``: left alone).

    Returns:
        The copy, its ``quant_layers`` plan (8-bit, int8 codes) and its ``packed_quant`` plan
        (2/4-bit, bit-packed).
    """
    work = copy.deepcopy(model)
    act = None if act_bits is None else QuantSpec(bits=act_bits, symmetric=False, signed=False)
    specs = {n: {"weight": QuantSpec(bits=b, granularity="channel", narrow=True),
                 "input": act} for n, b in assign.items() if b != FLOAT}
    layers = wrap_layers(work, specs)
    if act is not None and layers:
        calibrate_inputs(work, layers, calib)
    plain, packed = {}, {}
    for name, ql in layers.items():
        if assign[name] == 8:
            ql.freeze()
            plain[name] = {"weight": specs[name]["weight"].model_dump(),
                           "input": act.model_dump() if act else None, "output": None}
        else:
            packed[name] = pack_layer(work, name)
        snap_bias(work.get_submodule(name))  # the int32 bias grid of the integer kernels
    set_mode(work, False)
    return (work, {"layers": plain, "frozen": True} if plain else {},
            {"layers": packed} if packed else {})


def _fallback(model: nn.Module, names: list[str], sens: dict, cfg: MixedPrecisionConfig,
              calib: torch.Tensor, ev: tuple, base: float) -> tuple[dict, list[dict], bool]:
    """All layers at the top width; most sensitive back to float until the drop fits."""
    top = cfg.bits[0]
    assign = {n: top for n in names}
    order = sorted(names, key=lambda n: sens[n][top], reverse=True)
    trail = []
    for step in range(len(order) + 1):
        if step:
            assign[order[step - 1]] = FLOAT
        drop = base - score(build_mixed(model, assign, cfg.act_bits, calib)[0], *ev)
        trail.append({"float_layers": order[:step], "accuracy_drop": drop})
        if drop <= cfg.max_accuracy_drop:
            return assign, trail, True
    best = min(range(len(trail)), key=lambda i: trail[i]["accuracy_drop"])
    assign = {n: FLOAT if n in order[:best] else top for n in names}
    return assign, trail, False


def _mixed_precision(model: nn.Module, cfg: MixedPrecisionConfig, data: DataBundle,
                     ) -> tuple[nn.Module, Record]:
    """Quantize a copy of ``model`` with a per-layer width chosen from sensitivities.

    Args:
        model: a float model with Linear/Conv layers (left untouched).
        cfg: the mixed-precision config.
        data: training split (calibration, and a 20% validation slice the choices are made
            on) and test split (the reported accuracy, never used for choosing).

    Returns:
        The frozen copy and a Record: per layer bits, sensitivity per width, bytes; what was
        asked and what was achieved (bytes, accuracy drop, met); ``details["plan"]`` and
        ``details["packed_plan"]`` replay the structure.

    Raises:
        ConfigError: no quantizable layer, bad selectors, no data.
        DataError: calibration data empty, NaN/Inf or constant.

    Example:
        >>> q, rec = mixed_precision(net, MixedPrecisionConfig(size_ratio=0.2), data)
        >>> rec.details["achieved"]["weight_bytes"]
    """
    if data is None:
        raise ConfigError("mixed_precision needs data (give --data)")
    ref = copy.deepcopy(model)
    chosen, skipped = select_layers(ref, QUANTIZABLE, cfg.include, cfg.exclude)
    if not chosen:
        raise ConfigError("mixed_precision: the model has no Linear/Conv layer to quantize "
                          "(check include/exclude)")
    calib = calibration_subset(data, min(cfg.calib_samples, data.n_train or cfg.calib_samples))
    check_calibration(calib)
    # Choices are made on the validation split (a fixed slice of the training split, or a
    # stream's own); the test split only reports the outcome (selecting on it would make the
    # reported drop optimistic). Both are bounded by eval_samples.
    limit = cfg.eval_samples or 10**9
    ev = (*data.head("val", limit), 256, data.task)
    from slimkit.data.guard import record_split  # a stage's data hides the test split

    test = (*data.head(record_split(data), limit), 256, data.task)
    base = score(ref, *ev)
    sens = layer_sensitivity(ref, chosen, cfg.bits, calib, cfg.sensitivity, ev)
    sizes = {n: {b: weight_bytes(m.weight, b) for b in [FLOAT, *cfg.bits]}
             for n, m in chosen.items()}
    # A weight another module also holds (a tied LM head) keeps its float matrix for that
    # module whatever happens here: left float it costs nothing more, quantized it adds its
    # codes. Counting its float bytes would claim a saving the model never sees.
    tied = {n: o for n, o in shared_weights(ref).items() if n in sizes}
    for n in tied:
        sizes[n][FLOAT] = 0
    float_bytes = sum(s[FLOAT] for s in sizes.values())
    asked: dict[str, Any] = {"policy": cfg.policy}
    if cfg.policy == "fallback":
        asked["max_accuracy_drop"] = cfg.max_accuracy_drop
        assign, trail, met = _fallback(ref, list(chosen), sens, cfg, calib, ev, base)
        method = "float fallback"
    else:
        budget = cfg.size_bytes or int(cfg.size_ratio * float_bytes)
        asked["weight_bytes"] = budget
        assign, met, method = allocate_bits(sens, sizes, budget)
        trail = []
    work, plan, packed_plan = build_mixed(ref, assign, cfg.act_bits, calib)
    test_float = score(ref, *test)
    achieved = {"weight_bytes": sum(sizes[n][b] for n, b in assign.items()),
                "float_weight_bytes": float_bytes,
                "validation_accuracy_drop": base - score(work, *ev),
                "accuracy_float": test_float, "accuracy": score(work, *test)}
    achieved["accuracy_drop"] = test_float - achieved["accuracy"]
    achieved["met"] = met
    return work, _record(assign, sens, sizes, skipped, tied, {
        "asked": asked, "achieved": achieved, "method": method, "trail": trail,
        "plan": plan, "packed_plan": packed_plan, "sensitivity_metric": cfg.sensitivity,
        "activations": (f"{cfg.act_bits}-bit per tensor, min/max calibrated" if cfg.act_bits
                        else "float (weights-only mixed precision)")})


def _record(assign: dict, sens: dict, sizes: dict, skipped: list, tied: dict[str, list[str]],
            details: dict) -> Record:
    rows = {n: {"bits": None if b == FLOAT else b,
                "scheme": None if b == FLOAT else "symmetric narrow, round-to-nearest",
                "granularity": None if b == FLOAT else "channel:0",
                "stored": ("float32" if b == FLOAT else "int8 codes" if b == 8
                           else f"{b}-bit packed codes"),
                "sensitivity": {("float" if k == FLOAT else str(k)): v
                                for k, v in sens[n].items()},
                "bytes": sizes[n][b], "float_bytes": sizes[n][FLOAT]}
            for n, b in assign.items()}
    for n, others in tied.items():
        rows[n]["shared_with"] = others
    record = Record(skipped=list(skipped), details={"layers": rows, **details})
    for n, r in rows.items():
        width = "float" if r["bits"] is None else f"{r['bits']}-bit"
        note = (f" [weight shared with {', '.join(tied[n])}: its float matrix stays]"
                if n in tied else "")
        record.changed.append(f"{n}: {width} weights, {r['float_bytes']:,} -> {r['bytes']:,} "
                              f"bytes{note}")
        if r["bits"] is None:
            why = f"kept in float by the mixed-precision {details['method']}"
            if n in tied:
                why += (f" (weight shared with {', '.join(tied[n])}: quantizing it would add "
                        f"{min(v for k, v in sizes[n].items() if k != FLOAT):,} bytes and "
                        "free none)")
            record.skipped.append({"what": n, "why": why})
    ach = details["achieved"]
    if not ach["met"]:
        record.skipped.append({"what": "budget", "why": f"not reachable: asked "
                               f"{details['asked']}, kept the best found ({ach['weight_bytes']:,}"
                               f" bytes, drop {ach['accuracy_drop']:.2f} points)"})
    return record


@register_stage(MixedPrecisionConfig)
def mixed_precision(model: SlimModel, cfg: MixedPrecisionConfig,
                    ctx: StageContext) -> tuple[SlimModel, Record]:
    """Quantize a copy of ``model`` with per-layer widths from sensitivities (see
    :func:`_mixed_precision`).

    Hugging Face Conv1D layers are converted to Linear first; a tied layer is left float
    unless named in ``include`` (see :func:`slimkit.io.linear.prepare_layers`).
    """
    model, cfg, prep = prepare_layers(model, cfg, "mixed_precision")
    module, record = _mixed_precision(model.module, cfg, ctx.data)
    add_quant_transforms(record)
    return model.copy(module), prep.finish(record)
