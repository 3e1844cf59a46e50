"""Depth before width: which residual branches a structured-pruning run removes (``blocks``).

A share removes that many of the removable branches, those the output depends on least first
(:mod:`slimkit.prune.depth`); ``auto`` searches the block count with which channel pruning
meets every target and the output moves least (:func:`auto_blocks`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.io import batch as B
from slimkit.io.model import modes_kept
from slimkit.prune.depth import output_change, rank_branches, without_branches
from slimkit.prune.hf_loadable import hold_branches, loadable_scopes
from slimkit.prune.structured_plan import Job
from slimkit.prune.structured_target import Step, Target, width_step
from slimkit.train.bn import recalibrate_batchnorm


@dataclass(frozen=True)
class Depth:
    """The outcome of depth pruning.

    Attributes:
        model: the model without the chosen branches.
        blocks: the chosen branches (a plan's ``blocks``).
        details: ``removable``, ``removed``, ``asked``, ``scores``, ``trials``, ``judge``.
        skipped: the branches kept because they hold an excluded layer, and why.
        step: with ``auto``, the width step the winning candidate already took (not searched
            again), else None.
    """

    model: nn.Module
    blocks: list[dict[str, Any]]
    details: dict[str, Any]
    skipped: list[dict[str, str]]
    step: Step | None


def prune_depth(model: nn.Module, job: Job, target: Target | None) -> Depth:
    """Remove the residual branches ``job.cfg.blocks`` asks for (see :class:`Depth`)."""
    cfg, data, example = job.cfg, job.data, job.example
    n = cfg.calib_batches * cfg.calib_batch_size
    inputs = (data.calibration_batch(n, cfg.seed)[0],) if data is not None else example
    ranked, skipped = rank_branches(model, example, inputs, job.selection.covers)
    scopes, _ = loadable_scopes(model, cfg.hf_loadable, cfg.attention)
    ranked, held = hold_branches(scopes, ranked)
    skipped = [*skipped, *held]
    trials: list[dict[str, Any]] = []
    step, judge = None, None
    if cfg.blocks == "auto":
        assert target is not None  # the config validator guarantees it
        k, step, judge = auto_blocks(model, job, ranked, target, trials, inputs)
    else:
        k = round(float(cfg.blocks) * len(ranked))
    chosen = ranked[:k]
    details = {"removable": len(ranked), "removed": len(chosen), "asked": cfg.blocks,
               "scores": {f"{b['module']}/{b['add']}": b["score"] for b in ranked},
               "trials": trials, "judge": judge}
    return Depth(without_branches(model, chosen), chosen, details, skipped, step)


def auto_blocks(model: nn.Module, job: Job, ranked: list[dict[str, Any]], target: Target,
                trials: list[dict], inputs: B.Inputs) -> tuple[int, Step, str]:
    """How many blocks to remove: of the ways to meet every target, the one that changes least.

    For k = 0, 1, ... blocks (least important first), channels are pruned to the flops/params
    target, and further where that is not fast enough, until the latency is met too; stops
    at the first k that needs no extra channel pruning. Of the candidates meeting every
    target, the one whose output on the calibration ``inputs`` moves least from the
    original's wins (fewer blocks on a tie; if none meets them, the fastest). Each candidate
    is judged after its BatchNorm statistics are re-estimated on those inputs (on a copy):
    with the stale ones every candidate's output is about 100% off and the measure cannot
    tell them apart (adaptive-BN candidate evaluation, EagleEye, ECCV 2020). Without data
    there is nothing to judge outputs on (one or two example inputs, stale statistics): the
    candidate keeping the most FLOPs (params) wins, fewer blocks on a tie.

    Returns:
        The block count, the winner's width step (pruned model, plan, target record) and
        the rule that picked it.
    """
    counts = target.only([k for k in target.fractions if k != "latency"])
    first = counts.keys[0]  # flops if asked, else params
    change = _judge(model, job, inputs)
    best: tuple[tuple, int, Step] | None = None
    for k in range(len(ranked) + 1):
        shallow = without_branches(model, ranked[:k])
        pruned, plan, found = width_step(shallow, job, None, counts)
        assert found is not None
        lat = target.fractions["latency"](pruned)
        fast = lat <= target.asked["latency"]
        if fast:
            found = {**found, "asked": dict(target.asked),
                     "achieved": {**found["achieved"], "latency": lat}}
        else:  # prune channels further until the latency is met as well
            pruned, plan, found = width_step(shallow, job, None, target)
            assert found is not None
        reached = bool(found["reached"])
        trials.append({"blocks": k, "extra_channels": not fast, **found["achieved"],
                       "reached": reached})
        t = trials[-1]
        if not reached:
            rank = (1, t["latency"], k)
        elif change is None:  # no data to judge outputs on: keep the most of the count
            rank = (0, -t[first], k)
        else:
            t["output_change"] = change(pruned)
            rank = (0, t["output_change"], k)
        if best is None or rank < best[0]:
            best = (rank, k, (pruned, plan, found))
        if fast:
            break
    assert best is not None
    judge = (f"most {first} kept (no data to judge outputs on)" if job.data is None
             else "least output change after BatchNorm re-estimation")
    return best[1], best[2], judge


def _judge(model: nn.Module, job: Job, inputs: B.Inputs,
           ) -> Callable[[nn.Module], float] | None:
    """``candidate -> output change`` on the calibration inputs, or None without data."""
    if job.data is None:
        return None
    with modes_kept(model), torch.no_grad():
        reference = B.call(model.eval(), inputs)

    def change(candidate: nn.Module) -> float:
        candidate = copy.deepcopy(candidate)  # the statistics it returns with stay as pruned
        recalibrate_batchnorm(candidate, inputs, job.cfg.calib_batch_size)
        return output_change(candidate, inputs, reference)

    return change


__all__ = ["Depth", "auto_blocks", "prune_depth"]
