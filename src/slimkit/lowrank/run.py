"""The ``lowrank`` technique: plan, apply, verify, record, and optionally fine-tune."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.data.split import calibration_subset
from slimkit.distill.run import finetune
from slimkit.io import batch as B
from slimkit.io.linear import prepare_layers
from slimkit.io.model import SlimModel, set_mode
from slimkit.lowrank.config import LowRankConfig
from slimkit.lowrank.plan import apply_in_place, build_plan
from slimkit.measure import verify_finite
from slimkit.measure.counts import count_flops, count_params


def _flops(model: nn.Module, example: B.Inputs | None) -> dict | None:
    return None if example is None else count_flops(model, example)


def _layer_flops(counts: dict | None, name: str) -> int | None:
    """FLOPs of layer ``name`` or, once factorized, of every leaf layer under it."""
    if counts is None:
        return None
    per = counts["per_layer"]
    if name in per:
        return per[name]["flops"]
    return sum(v["flops"] for k, v in per.items() if k.startswith(name + "."))


def _record(plan: dict, before: dict | None, after: dict | None) -> Record:
    """Per-layer method, rank, params, FLOPs and error; skipped layers with the reason."""
    record = Record(skipped=list(plan["skipped"]), details={"plan": plan})
    layers: dict[str, Any] = {}
    for name, e in plan["layers"].items():
        if "reason" in e:
            record.skipped.append({"what": name, "why": e["reason"]})
            continue
        row = {k: e.get(k) for k in ("method", "rank", "params_before", "params_after",
                                     "rel_error", "latency")}
        row.update(flops_before=_layer_flops(before, name), flops_after=_layer_flops(after, name))
        layers[name] = row
        record.changed.append(
            f"{name}: {e['method']} rank {e['rank']}, params {e['params_before']:,} -> "
            f"{e['params_after']:,} ({e['params_after'] / e['params_before']:.0%}), "
            f"relative error {e['rel_error']:.3f}")
    record.details["layers"] = layers
    return record


def _totals(record: Record, model: nn.Module, new: nn.Module, before: dict | None,
            after: dict | None) -> dict[str, Any]:
    rows = record.details["layers"].values()
    return {"layers_factorized": len(rows),
            "factorized_params_before": sum(r["params_before"] for r in rows),
            "factorized_params_after": sum(r["params_after"] for r in rows),
            "model_params_before": count_params(model)["params"],
            "model_params_after": count_params(new)["params"],
            "model_flops_before": before["flops"] if before else None,
            "model_flops_after": after["flops"] if after else None}


def _lowrank(model: nn.Module, cfg: LowRankConfig, data: DataBundle | None = None,
             teacher: nn.Module | None = None, progress: bool = False,
             example_inputs: B.Inputs | None = None) -> tuple[nn.Module, Record]:
    """Factorize a copy of ``model``'s Linear/Conv layers; ``model`` itself is left untouched.

    Each selected layer is replaced by an ``nn.Sequential`` of smaller layers at the same
    module path, so the model keeps its inputs, outputs and readable state_dict names.

    Args:
        model: any module with Linear/Conv layers.
        cfg: the lowrank config.
        data: training data; its first ``cfg.calib_samples`` training inputs are the
            calibration batch (sensitivity, latency check); needed for ``cfg.finetune``.
        teacher: for ``finetune.distill``; defaults to the original ``model``.
        progress: show the fine-tuning progress bar.
        example_inputs: inputs for FLOPs, verification and the latency check when no data
            is given (``data.example_inputs(1)`` otherwise): a tuple or a dict of tensors as
            :func:`slimkit.io.batch.call` takes them.

    Returns:
        The factorized copy and a Record: per layer the method, rank, params and FLOPs
        before/after and the relative reconstruction error; skipped layers with the reason;
        ``details["plan"]`` replays with :func:`apply_lowrank`.

    Raises:
        ConfigError: bad selectors or ranks (naming the layer and its maximum rank), or
            fine-tuning/sensitivity/latency check without the data they need.

    Example:
        >>> small, rec = lowrank(net, LowRankConfig(rank="energy", energy=0.8), data)
        >>> rec.details["layers"]["fc1"]["params_after"]
    """
    if cfg.finetune is not None and data is None:
        raise ConfigError("lowrank: finetune needs data (give --data)")
    teacher = model if teacher is None else teacher
    work = copy.deepcopy(model)
    calib = calibration_subset(data, cfg.calib_samples, cfg.seed) if data is not None else None
    example = data.example_inputs(1) if data is not None else example_inputs
    timing = calib if calib is not None else example
    plan, factors = build_plan(work, cfg, calib, timing)
    before = _flops(work, example)
    apply_in_place(work, plan, factors)
    after = _flops(work, example)
    verify_finite(work, example, "lowrank")
    record = _record(plan, before, after)
    record.details["totals"] = _totals(record, model, work, before, after)
    if cfg.finetune is not None and cfg.finetune.epochs > 0:
        record.details["finetune"] = finetune(work, data, cfg.finetune, teacher=teacher,
                                              progress=progress, label="lowrank fine-tune")
    set_mode(work, model.training)
    return work, record


@register_stage(LowRankConfig)
def lowrank(model: SlimModel, cfg: LowRankConfig,
            ctx: StageContext) -> tuple[SlimModel, Record]:
    """Factorize a copy of ``model``'s Linear/Conv layers (see :func:`_lowrank`).

    Hugging Face Conv1D layers are converted to Linear first; a tied layer is left float
    unless named in ``include`` (see :func:`slimkit.io.linear.prepare_layers`).
    """
    model, cfg, prep = prepare_layers(model, cfg, "lowrank", convert=cfg.linear != "none")
    module, record = _lowrank(model.module, cfg, ctx.data, teacher=ctx.teacher_module,
                              progress=ctx.progress, example_inputs=model.example_inputs(1))
    if record.details["layers"]:
        # The architecture changed: the artifact rebuilds it by replaying the plan.
        record.transforms.append(("lowrank", record.details["plan"]))
    return model.copy(module), prep.finish(record)
