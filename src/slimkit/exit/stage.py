"""The ``early_exit`` stage: plan the exits, train their heads, calibrate, verify, record."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, register_stage
from slimkit.data.bundle import DataBundle
from slimkit.exit import calibrate as C
from slimkit.exit.config import EarlyExitConfig
from slimkit.exit.model import EarlyExitModel
from slimkit.exit.plan import build_plan, default_exits
from slimkit.exit.train import held_out, train_heads
from slimkit.io import batch as B
from slimkit.io.model import SlimModel
from slimkit.measure import verify_finite

DEFAULT_DROP = 0.5


def allowed_drop(cfg: EarlyExitConfig, ctx: StageContext) -> tuple[float, str]:
    """The top-1 drop (points) the thresholds may cost, and where the number came from:
    the config, else the recipe's target (``ctx.extras["target"]``), else 0.5."""
    if cfg.max_drop is not None:
        return cfg.max_drop, "config max_drop"
    target = ctx.extras.get("target")
    points = getattr(target, "max_accuracy_drop", None)
    if points is not None:
        return float(points), "target max_accuracy_drop"
    top1 = (getattr(target, "max_metric_drop", None) or {}).get("top1")
    if top1 is not None:
        return 100.0 * float(top1), "target max_metric_drop.top1"
    return DEFAULT_DROP, "default"


def _calibration_split(data: DataBundle, cfg: EarlyExitConfig) -> tuple[Any, Any]:
    """(data the heads train on, calibration batches): an in-memory bundle is split so the
    heads never see the calibration samples; a stream trains on ``train`` and calibrates
    on its ``val`` split."""
    if data.streaming:
        from slimkit.data.stream import StreamData

        # Training reads the test split once at its end: give it the validation stream.
        train = StreamData(f"{data.name} (early-exit heads)", train=lambda: data.batches("train"),
                           test=lambda: data.batches("val"), task=data.task,
                           num_classes=data.num_classes, length=data.epoch_batches())
        return train, lambda: data.batches("val")
    train, (x_cal, y_cal) = held_out(data, cfg.val_fraction)
    return train, lambda: ((B.take(x_cal, slice(i, i + 256)), y_cal[i:i + 256])
                           for i in range(0, len(y_cal), 256))


def _skip(model: SlimModel, why: str, ctx: StageContext, **details: Any) -> tuple[SlimModel,
                                                                                 Record]:
    ctx.log(f"early_exit: {why}")
    return model.copy(), Record(skipped=[{"what": "early_exit", "why": why}], details=details)


@register_stage(EarlyExitConfig)
def early_exit(model: SlimModel, cfg: EarlyExitConfig,
               ctx: StageContext) -> tuple[SlimModel, Record]:
    """Attach exit heads after ``cfg.exits`` (or every residual stage), train them by
    self-distillation, and choose one confidence threshold per exit on a validation split
    so that top-1 stays within the allowed drop; the output stops early at inference.

    Returns the model unchanged, with the reason in ``record.skipped``, when no exit can be
    placed automatically, or when no threshold keeps top-1 within the allowed drop.

    Raises:
        ConfigError: an unknown block name, a block that does not run exactly once, a task
            other than classification.
        ModelError: the forward cannot be cut after a block, or a block's output cannot feed
            a head.
    """
    data = ctx.data
    assert data is not None  # the contract refuses a missing dataset (needs_data)
    if data.task != "classification":
        if cfg.exits:
            raise ConfigError(f"early_exit: exits need a classifier's confidence; the data's "
                              f"task is '{data.task}' (use classification data)")
        return _skip(model, f"the data's task is '{data.task}'; exits need a classifier", ctx)
    x = data.head("train", 4)[0]
    exits = list(cfg.exits)
    if not exits:
        exits, why = default_exits(model.module, x)
        if not exits:
            return _skip(model, f"no exit placed: {why}", ctx)
    plan = build_plan(model.module, exits, x, data.num_classes, cfg.confidence, cfg.pooling,
                      cfg.head)
    if model.output is not None:  # the wrapper returns this output of the backbone's
        plan["output"] = model.output
    with torch.random.fork_rng():  # the heads' initialization depends on the seed alone
        torch.manual_seed(cfg.train.seed)
        wrapped = EarlyExitModel(copy.deepcopy(model.module), plan)
    # The wrapper returns one tensor, the judged logits: nothing below selects an output.
    with B.judging(None):
        return _train_and_calibrate(model, wrapped, data, cfg, ctx, x)


def _train_and_calibrate(model: SlimModel, wrapped: EarlyExitModel, data: DataBundle,
                         cfg: EarlyExitConfig, ctx: StageContext, x: Any,
                         ) -> tuple[SlimModel, Record]:
    plan = wrapped.plan
    train_data, cal = _calibration_split(data, cfg)
    summary = train_heads(wrapped, train_data, cfg, progress=ctx.progress,
                          checkpoint_dir=ctx.workdir)
    stats = C.gather(wrapped, cal())
    drop, source = allowed_drop(cfg, ctx)
    spent = _spent(ctx, model, stats, cal) if source.startswith("target") else 0.0
    drop = max(0.0, drop - spent)
    level = cfg.margin_level()
    thresholds = C.choose(stats, drop, cfg.min_exit_fraction, level)
    details: dict[str, Any] = {"exits": plan["exits"], "max_drop": drop, "max_drop_from": source,
                               "drop_spent_before": spent, "train": _train_summary(summary),
                               "margin": _margin(stats, thresholds, level)}
    if all(t is None for t in thresholds):
        bound = "" if level is None else f" (its one-sided {level:.0%} upper bound)"
        return _skip(model, (f"no threshold keeps top-1{bound} within {drop:g} points of the "
                             f"static model's {stats.final_correct.double().mean():.2%} on the "
                             f"validation split ({stats.n} samples); kept the static model"),
                     ctx, **details, val=C.summarize(stats, thresholds))
    wrapped, stats = _drop_closed(wrapped, stats, thresholds, details)
    wrapped.eval()
    verify_finite(wrapped, x, "early_exit")
    from slimkit.exit.measure import measure_exits

    out = model.copy(wrapped)
    out.output = None  # the wrapper returns the judged logits as its one output
    details.update(plan=copy.deepcopy(wrapped.plan), thresholds=wrapped.thresholds,
                   **measure_exits(wrapped, model.module, stats, data, cfg, x, spec=out))
    record = _record(details)
    record.transforms.append(("early_exit", copy.deepcopy(wrapped.plan)))
    return out, record


def _margin(stats: C.ExitStats, thresholds: list[float | None],
            level: float | None) -> dict[str, Any]:
    """The margin the thresholds hold: the validation drop (points) and the bound kept within
    the target (the drop itself with no margin)."""
    right = C.dynamic_correct(stats, C.exits_taken(stats, thresholds))
    return {"level": level, "method": None if level is None else
            "Newcombe paired (method 10), one-sided upper bound",
            "val_drop": 100 * C.drop_bound(stats.final_correct, right, None),
            "val_drop_bound": 100 * C.drop_bound(stats.final_correct, right, level)}


def _spent(ctx: StageContext, model: SlimModel, stats: C.ExitStats, cal: Any) -> float:
    """Top-1 points the earlier stages of the recipe already cost on the calibration split
    (the teacher, the model before compression, against this stage's input): the target is
    for the whole recipe, so the exits get what is left of it."""
    import torch

    teacher = ctx.teacher_module
    if teacher is None or teacher is model.module:
        return 0.0
    hits = 0
    with torch.inference_mode():
        teacher.eval()
        for x, y in cal():
            hits += int((B.select(B.call(teacher, x), model.output).argmax(-1) == y)
                        .sum())
    return max(0.0, 100.0 * (hits / max(stats.n, 1) - float(stats.final_correct.double().mean())))


def _drop_closed(model: EarlyExitModel, stats: C.ExitStats, thresholds: list[float | None],
                 details: dict[str, Any]) -> tuple[EarlyExitModel, C.ExitStats]:
    """Remove the exits no threshold opened (each would cost its head and a step boundary for
    nothing), set the others' thresholds, and say which were removed in ``details``."""
    keep = [k for k, t in enumerate(thresholds) if t is not None]
    if len(keep) < len(thresholds):
        details["closed_exits"] = [row["block"] for row, t in zip(
            model.plan["exits"], thresholds, strict=True) if t is None]
        model = _keep_exits(model, keep)
        stats = C.ExitStats(stats.conf[:, keep], stats.correct[:, keep], stats.final_correct)
        details["exits"] = model.plan["exits"]
    model.set_thresholds([thresholds[k] for k in keep])
    return model, stats


def _keep_exits(model: EarlyExitModel, keep: list[int]) -> EarlyExitModel:
    """The model with only the exits ``keep`` (their trained heads), on the same backbone."""
    plan = copy.deepcopy(model.plan)
    plan["exits"] = [plan["exits"][k] for k in keep]
    out = EarlyExitModel(model.backbone, plan)
    out.heads = nn.ModuleList(model.heads[k] for k in keep)  # trained, same dtype and device
    return out


def _train_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """fit's summary, its last "test" metric renamed: the heads' run reads the held-out
    calibration part as its test split, never the real test."""
    epochs = [{("heldout_top1" if k == "test_top1" else k): v for k, v in e.items()}
              for e in summary.get("epochs", [])]
    return {**summary, "epochs": epochs}


def _record(details: dict[str, Any]) -> Record:
    record = Record(details=details)
    val = details["val"]
    for block in details.get("closed_exits", []):
        record.skipped.append({"what": f"exit after {block}",
                               "why": "no threshold keeps top-1 within the allowed drop; the "
                                      "exit was removed"})
    for row, t, frac, acc in zip(details["exits"], details["thresholds"], val["exit_fraction"],
                                 val["exit_top1"], strict=False):
        record.changed.append(
            f"exit after {row['block']} ("
            + (f"{row['conv'][1]}-channel conv, " if row.get("conv") else "")
            + f"{row['pool']} pool, {row['channels']} head inputs): "
            f"threshold {t:.4g}, takes {frac:.1%} of the validation samples"
            + (f" at top-1 {acc:.2%}" if acc is not None else ""))
    record.changed.append(
        f"validation top-1 {val['static_top1']:.2%} static -> {val['top1']:.2%} dynamic, "
        f"mean MACs {details['costs']['mean_macs_ratio_val']:.1%} of the static model's")
    return record
