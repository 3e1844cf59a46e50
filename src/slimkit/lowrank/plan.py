"""Plan, then apply: choose a method and rank per layer (JSON), then replace the layers.

The plan names every considered layer with its method, rank, parameter counts and
reconstruction error, or the reason it stays dense. :func:`apply_lowrank` replays a plan on a
fresh copy of the model: decompositions are deterministic (numpy SVD; seeded CP-ALS and HOOI),
so replaying gives the same factors and outputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.core.errors import ConfigError, did_you_mean
from slimkit.core.stages import register_rebuilder
from slimkit.graph.select import select_layers
from slimkit.io import batch as B
from slimkit.io.model import replace_module
from slimkit.lowrank import matrix, tensor  # noqa: F401  (register the factorizers)
from slimkit.lowrank.base import (
    CONV_TYPES,
    FACTORIZERS,
    LAYER_TYPES,
    Factorizer,
    Factors,
    dense_params,
    relative_error,
    single_threaded_blas,
)
from slimkit.lowrank.config import LowRankConfig
from slimkit.lowrank.ranks import RANK_RULES, RankRequest
from slimkit.measure.hooks import hooked_passes
from slimkit.measure.latency import time_interleaved

PLAN_FORMAT = "slimkit-lowrank-plan"


def method_for(layer: nn.Module, cfg: LowRankConfig) -> tuple[str, str]:
    """The factorizer for ``layer`` and a note; 1x1 convs always use svd (it is optimal)."""
    if isinstance(layer, nn.Linear):
        return cfg.linear, ""
    ks = getattr(layer, "kernel_size", ())
    if cfg.conv != "none" and ks and all(k == 1 for k in ks):
        return "svd", "1x1 kernel: svd of the (C_out, C_in) matrix"
    return cfg.conv, ""


def _active_types(cfg: LowRankConfig) -> list[str]:
    types = (["Linear"] if cfg.linear != "none" else []) + \
        (list(CONV_TYPES) if cfg.conv != "none" else [])
    if not types:
        raise ConfigError("lowrank: linear and conv are both 'none'; nothing would be factorized")
    return types


def _select(model: nn.Module, cfg: LowRankConfig) -> tuple[dict[str, nn.Module], dict, list]:
    """Layers to plan, layers named by include that cannot be factorized, selection skips."""
    types = _active_types(cfg)
    chosen, skipped = select_layers(model, types, cfg.include, cfg.exclude)
    refused: dict[str, dict] = {}
    if cfg.include:
        own = {type(m).__name__ for n, m in model.named_modules()
               if n and any(True for _ in m.parameters(recurse=False))}
        named, _ = select_layers(model, own - set(types), cfg.include, cfg.exclude)
        for name, mod in named.items():
            kind = type(mod).__name__
            why = (f"{kind} layers are set to 'none' in the config" if kind in LAYER_TYPES else
                   f"{kind} layers cannot be factorized (supported: {', '.join(LAYER_TYPES)})")
            refused[name] = {"type": kind, "method": None, "reason": why}
    unknown = [n for n in cfg.ranks if n not in chosen]
    if unknown:
        raise ConfigError(f"lowrank: 'ranks' names layer '{unknown[0]}', which is not among the "
                          f"layers to factorize.{did_you_mean(unknown[0], chosen)} "
                          f"Layers: {', '.join(chosen) or 'none'}.")
    return chosen, refused, skipped


def capture_inputs(model: nn.Module, names: list[str], x: B.Inputs) -> dict[str, torch.Tensor]:
    """The input each named layer sees on ``x`` (first call only), from one forward pass.

    ``x`` is a batch as :func:`slimkit.io.batch.call` takes it (a tensor, a tuple or a dict).
    The model's train/eval flags are restored afterwards, so the caller's model is unchanged.
    """
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def fn(_: nn.Module, args: tuple, kwargs: dict) -> None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(first, torch.Tensor):
                seen.setdefault(name, first.detach().clone())
        return fn

    hooked_passes(model, [modules[n].register_forward_pre_hook(hook(n), with_kwargs=True)
                          for n in names], [x])
    return seen


def output_error_fn(layer: nn.Module, fac: Factorizer, w: np.ndarray, x: torch.Tensor,
                    n_iter: int = 100, seed: int = 0,
                    tol: float = 1e-6) -> Callable[[list[int]], float]:
    """``rank -> ||f(x; W_hat) - f(x; W)||_F / ||f(x; W)||_F`` in float64, biases left out.

    The bias is the same in both forms, so leaving it out measures the error relative to what
    the weight contributes rather than hiding it behind a large bias.
    """
    x64 = x.detach().to(torch.float64)
    if isinstance(layer, nn.Linear):
        x64 = x64.reshape(-1, x64.shape[-1])

        def f(wt: torch.Tensor) -> torch.Tensor:
            return x64 @ wt.T
    else:
        def f(wt: torch.Tensor) -> torch.Tensor:
            return layer._conv_forward(x64, wt, None)

    ref = f(torch.from_numpy(w))
    ref_norm = float(torch.linalg.vector_norm(ref)) or 1.0

    def err(rank: list[int]) -> float:
        w_hat = fac.reconstruct(fac.decompose(w, rank, n_iter, seed, tol), w.shape)
        return float(torch.linalg.vector_norm(f(torch.from_numpy(w_hat)) - ref)) / ref_norm

    return err


def _check_rank(name: str, fac: Factorizer, shape: tuple[int, ...], rank: list[int]) -> None:
    """Raise a ConfigError naming the layer when ``rank`` does not fit it."""
    top = fac.max_rank(shape)
    if len(rank) != len(top):
        form = "[r_out, r_in]" if len(top) == 2 else "[r]"
        raise ConfigError(f"lowrank: layer '{name}' ({fac.name}) takes a rank {form}, "
                          f"got {rank}")
    if any(r > m for r, m in zip(rank, top, strict=True)) or min(rank) < 1:
        raise ConfigError(f"lowrank: rank {rank} of layer '{name}' (weight {list(shape)}, "
                          f"{fac.name}) is out of range: the maximum rank is {top}")


def _choose(name: str, layer: nn.Module, fac: Factorizer, w: np.ndarray, cfg: LowRankConfig,
            calib: torch.Tensor | None) -> tuple[list[int] | None, str]:
    if name in cfg.ranks:
        rank = list(cfg.ranks[name])
        _check_rank(name, fac, w.shape, rank)
        return rank, "explicit rank from the config"
    err = (output_error_fn(layer, fac, w, calib, cfg.n_iter, cfg.seed, cfg.iter_tol)
           if calib is not None and cfg.rank == "sensitivity" else None)
    choice = RANK_RULES.get(cfg.rank)(RankRequest(name, fac, w, cfg, err))
    return choice.rank, choice.note


def _time_layer(layer: nn.Module, replacement: nn.Module, x: torch.Tensor,
                repeats: int) -> dict[str, Any]:
    """Median latency of the dense layer and its replacement on ``x`` (torch eager)."""
    def runner(mod: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return mod(x)
        return run

    t = time_interleaved({"dense": runner(layer), "factorized": runner(replacement)},
                         warmup=3, repeats=repeats)
    dense, fact = t["dense"]["median_ms"], t["factorized"]["median_ms"]
    return {"dense_ms": dense, "factorized_ms": fact, "speedup": dense / fact,
            "batch": int(x.shape[0]), "threads": torch.get_num_threads(), "runtime": "torch"}


def plan_layer(name: str, layer: nn.Module, cfg: LowRankConfig,
               calib: torch.Tensor | None = None,
               timing_input: torch.Tensor | None = None) -> tuple[dict, Factors | None]:
    """Plan one layer: method, rank, counts and error, or the reason it stays dense.

    Returns:
        The plan entry and the factors (None when the layer is skipped).
    """
    method, note = method_for(layer, cfg)
    shape = tuple(layer.weight.shape)
    bias = 0 if getattr(layer, "bias", None) is None else layer.bias.numel()
    entry: dict[str, Any] = {"type": type(layer).__name__, "shape": list(shape),
                             "method": method, "params_before": dense_params(shape) + bias}
    if note:
        entry["note"] = note
    fac = FACTORIZERS.get(method)
    reason = fac.unsupported(layer)
    if reason:
        return {**entry, "params_after": entry["params_before"], "reason": reason}, None
    w = layer.weight.detach().to(torch.float64).cpu().numpy()
    rank, how = _choose(name, layer, fac, w, cfg, calib)
    entry.update(max_rank=fac.max_rank(shape), rank_rule=how)
    if rank is None:
        return {**entry, "params_after": entry["params_before"], "reason": how}, None
    after, dense = fac.weight_params(shape, rank), dense_params(shape)
    entry.update(rank=rank, weight_params_before=dense, weight_params_after=after)
    if not after < dense * (1.0 - cfg.margin):
        why = (f"rank {rank} needs {after:,} weights, not fewer than (1 - margin) x "
               f"{dense:,} = {math.floor(dense * (1 - cfg.margin)):,}: it would not be smaller")
        return {**entry, "params_after": entry["params_before"], "reason": why}, None
    factors = fac.decompose(w, rank, cfg.n_iter, cfg.seed, cfg.iter_tol)
    entry.update(params_after=after + bias,
                 rel_error=relative_error(w, fac.reconstruct(factors, shape)))
    if cfg.check_latency and timing_input is not None:
        x = timing_input[: cfg.latency_batch]
        entry["latency"] = _time_layer(layer, fac.build(layer, factors), x, cfg.latency_repeats)
        lat = entry["latency"]
        if lat["factorized_ms"] >= lat["dense_ms"]:
            entry["params_after"] = entry["params_before"]
            entry["reason"] = (f"factorized form is not faster: {lat['factorized_ms']:.4f} ms "
                               f"vs dense {lat['dense_ms']:.4f} ms (batch {lat['batch']}, "
                               f"torch eager, {lat['threads']} thread"
                               f"{'' if lat['threads'] == 1 else 's'})")
            return entry, None
    return entry, factors


def build_plan(model: nn.Module, cfg: LowRankConfig, calib_x: B.Inputs | None = None,
               timing_x: B.Inputs | None = None) -> tuple[dict, dict[str, Factors]]:
    """The plan and the factors computed on the way (so applying need not recompute them).

    Args:
        calib_x: the calibration batch (a tensor, a tuple or a dict, as
            :func:`slimkit.io.batch.call` takes it).
        timing_x: input batch for ``check_latency`` (defaults to ``calib_x``).
    """
    chosen, refused, skipped = _select(model, cfg)
    timing_x = calib_x if timing_x is None else timing_x
    if cfg.check_latency and timing_x is None:
        raise ConfigError("lowrank: check_latency needs an input batch to time the layers; "
                          "give data (or calib_x)")
    need = list(chosen) if cfg.rank == "sensitivity" and calib_x is not None else []
    calib = capture_inputs(model, need, calib_x) if need else {}
    timing = (capture_inputs(model, list(chosen), B.take(timing_x, slice(0, cfg.latency_batch)))
              if cfg.check_latency else {})
    layers, factors = dict(refused), {}
    with single_threaded_blas():
        for name, layer in chosen.items():
            if need and name not in calib:
                layers[name] = {"type": type(layer).__name__, "method": method_for(layer, cfg)[0],
                                "reason": "not called on the calibration batch, so its output "
                                          "error cannot be measured"}
                continue
            entry, fac = plan_layer(name, layer, cfg, calib.get(name), timing.get(name))
            layers[name] = entry
            if fac is not None:
                factors[name] = fac
    plan = {"format": PLAN_FORMAT, "version": 1, "rank_rule": cfg.rank, "margin": cfg.margin,
            "n_iter": cfg.n_iter, "seed": cfg.seed, "iter_tol": cfg.iter_tol,
            "layers": layers, "skipped": skipped}
    return plan, factors


def plan_lowrank(model: nn.Module, cfg: LowRankConfig,
                 calib_x: B.Inputs | None = None) -> dict:
    """Choose a method and rank for every selected layer; ``model`` is not modified.

    Args:
        model: any module with Linear/Conv layers.
        cfg: the lowrank config.
        calib_x: a calibration batch (a tensor, a tuple or a dict of model inputs), needed by
            ``rank="sensitivity"`` and ``check_latency``.

    Returns:
        A JSON-serializable plan: ``{"layers": {name: {"method", "rank", "params_before",
        "params_after", "rel_error", ...}}}``; skipped layers carry a ``"reason"``.

    Raises:
        ConfigError: unknown layer selectors, explicit ranks out of range (naming the layer
            and its maximum rank), a rule that needs a calibration batch without one.

    Example:
        >>> plan = plan_lowrank(net, LowRankConfig(rank="ratio", ratio=0.3))
        >>> json.dumps(plan)  # printable, savable, replayable with apply_lowrank
    """
    return build_plan(model, cfg, calib_x)[0]


def _planned_layers(model: nn.Module,
                    plan: dict) -> Iterator[tuple[str, nn.Module, Factorizer, list[int]]]:
    """``(name, layer, factorizer, rank)`` of every planned layer, each checked against
    ``model`` (shapes and hyperparameters only, so it runs on ``meta`` tensors).

    Raises:
        ConfigError: the plan does not fit the model (missing layer, other shape, a layer the
            method cannot factorize, bad rank).
    """
    if plan.get("format") != PLAN_FORMAT:
        raise ConfigError(f"lowrank: not a lowrank plan (format {plan.get('format')!r}, "
                          f"expected {PLAN_FORMAT!r})")
    modules = dict(model.named_modules())
    for name, entry in plan["layers"].items():
        if "reason" in entry or entry.get("rank") is None:
            continue
        layer = modules.get(name)
        if layer is None:
            raise ConfigError(f"lowrank plan: layer '{name}' is not in the model."
                              f"{did_you_mean(name, modules)}")
        if list(getattr(layer, "weight", torch.empty(0)).shape) != entry["shape"]:
            raise ConfigError(f"lowrank plan: layer '{name}' has weight shape "
                              f"{list(layer.weight.shape)}, the plan expects {entry['shape']}")
        fac = FACTORIZERS.get(entry["method"])
        reason = fac.unsupported(layer)
        if reason:
            raise ConfigError(f"lowrank plan: layer '{name}' cannot use {fac.name}: {reason}")
        _check_rank(name, fac, tuple(entry["shape"]), list(entry["rank"]))
        yield name, layer, fac, list(entry["rank"])


def apply_in_place(model: nn.Module, plan: dict,
                   factors: dict[str, Factors] | None = None) -> list[str]:
    """Replace every planned layer of ``model`` itself; return the names replaced.

    Layers missing from ``factors`` are decomposed here (deterministically, as when planned).

    Raises:
        ConfigError: the plan does not fit the model (missing layer, other shape, a layer the
            method cannot factorize, bad rank).
    """
    done = []
    for name, layer, fac, rank in _planned_layers(model, plan):
        got = (factors or {}).get(name)
        if got is None:
            w = layer.weight.detach().to(torch.float64).cpu().numpy()
            with single_threaded_blas():
                got = fac.decompose(w, rank, plan["n_iter"], plan["seed"], plan["iter_tol"])
        replace_module(model, name, fac.build(layer, got))
        done.append(name)
    return done


def shape_in_place(model: nn.Module, plan: dict) -> list[str]:
    """Give ``model`` the factorized structure of ``plan`` without decomposing anything.

    Each planned layer becomes its factorizer's :meth:`~Factorizer.shell` at the planned rank:
    the same modules, names and shapes as :func:`apply_in_place` gives, freshly initialized.
    For loading, where the saved weights overwrite every value; reads no weight, so it also
    runs on the ``meta`` device (the artifact's size check before allocation).

    Raises:
        ConfigError: the plan does not fit the model.
    """
    done = []
    for name, layer, fac, rank in _planned_layers(model, plan):
        replace_module(model, name, fac.shell(layer, rank))
        done.append(name)
    return done


def apply_lowrank(model: nn.Module, plan: dict) -> nn.Module:
    """Replay ``plan`` on a copy of ``model`` (the input is left untouched).

    Returns:
        The copy, with each planned layer replaced by an ``nn.Sequential`` at the same path.

    Raises:
        ConfigError: the plan does not fit the model.
    """
    model = copy.deepcopy(model)
    apply_in_place(model, plan)
    return model


@register_rebuilder("lowrank")
def _rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Artifact loading: give a freshly built model the factorized structure of ``plan``.

    Structure only: the artifact's weights replace the values, so decomposing the fresh
    model's random weights would be wasted work (and impossible on the ``meta`` device).
    """
    shape_in_place(model, plan)
    return model
