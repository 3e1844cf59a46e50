"""The search space on one model: its dimensions, and a candidate's concrete recipe.

A dimension is one categorical choice (a group's pruning ratio, a layer's bits, a layer's
low-rank share, a stage on/off). A candidate (``{dimension: choice}``) maps to plain stage
configs: one ``structured_prune`` stage per distinct ratio (``include`` naming the group
roots), one ``weight_only_quant`` stage per width, one ``lowrank`` stage per share, then the
recipe's own stages. The result is an ordinary recipe that ``slimkit compress`` replays.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from slimkit.core.errors import ConfigError
from slimkit.search.config import SearchConfig

QUANT_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
LOWRANK_TYPES = ("Linear", "Conv2d")


@dataclass
class Dim:
    """One categorical choice: its name (a parameter of the study), choices, and the layers
    (selectors) it governs."""

    name: str
    choices: list[Any]
    layers: list[str] = field(default_factory=list)


@dataclass
class Space:
    """Every dimension of a search on one model, in model order."""

    prune: list[Dim] = field(default_factory=list)
    blocks: Dim | None = None
    quant: list[Dim] = field(default_factory=list)
    lowrank: list[Dim] = field(default_factory=list)
    toggles: list[Dim] = field(default_factory=list)

    def dims(self) -> list[Dim]:
        return [*self.prune, *([self.blocks] if self.blocks else []), *self.quant,
                *self.lowrank, *self.toggles]

    def describe(self) -> dict[str, Any]:
        """JSON for the study's attributes and the report."""
        return {d.name: {"choices": d.choices, "layers": d.layers} for d in self.dims()}


def _bucket(names: list[str], most: int) -> list[list[str]]:
    """Split ``names`` (model order) into at most ``most`` contiguous buckets."""
    n = len(names)
    k = min(most, n)
    return [names[i * n // k:(i + 1) * n // k] for i in range(k)]


def _dims(prefix: str, names: list[str], choices: list[Any], grouping: str,
          most: int) -> list[Dim]:
    if not names:
        return []
    if grouping == "uniform":
        return [Dim(f"{prefix}:all", list(choices), list(names))]
    return [Dim(f"{prefix}:{b[0]}" + (f"+{len(b) - 1}" if len(b) > 1 else ""), list(choices), b)
            for b in _bucket(names, most)]


def build_space(module: Any, example: Any, cfg: SearchConfig, base_stages: list[dict]) -> Space:
    """The dimensions ``cfg`` declares, on ``module`` (found by graph analysis and layer type).

    Raises:
        ConfigError: the space declares a kind of change the model has no layer for.
    """
    from slimkit.graph.select import select_layers

    space = Space()
    if cfg.prune is not None:
        from slimkit.graph.dependency import build_dependency_graph

        roots = list(dict.fromkeys(g.root for g in
                                   build_dependency_graph(module, example).prunable()))
        if not roots and cfg.prune.blocks == [0.0]:
            raise ConfigError("search.prune: the model has no prunable channel group; set "
                              "search.prune to null and search something else")
        if len(cfg.prune.ratios) > 1:
            space.prune = _dims("prune", roots, cfg.prune.ratios, cfg.prune.groups,
                                cfg.prune.max_groups)
        if len(cfg.prune.blocks) > 1:
            space.blocks = Dim("blocks", list(cfg.prune.blocks))
    if cfg.quant is not None:
        layers = list(select_layers(module, QUANT_TYPES)[0])
        space.quant = _dims("bits", layers, cfg.quant.bits, cfg.quant.groups, cfg.quant.max_groups)
    if cfg.lowrank is not None:
        layers = list(select_layers(module, LOWRANK_TYPES)[0])
        space.lowrank = _dims("lowrank", layers, cfg.lowrank.ratios, "layer",
                              cfg.lowrank.max_groups)
    if cfg.toggle_stages:
        space.toggles = [Dim(f"stage:{i}:{s['kind']}", [True, False])
                         for i, s in enumerate(base_stages) if s["kind"] not in
                         _replaced_kinds(cfg)]
    if not space.dims():
        raise ConfigError("search: the space has no choice to make on this model (every "
                          "searched dimension has one value); widen search.prune.ratios, "
                          "search.quant.bits or search.lowrank.ratios")
    return space


def _replaced_kinds(cfg: SearchConfig) -> set[str]:
    """Stage kinds of the recipe that the searched stages replace."""
    return ({"structured_prune"} if cfg.prune is not None else set()) | \
        ({"weight_only_quant"} if cfg.quant is not None else set()) | \
        ({"lowrank"} if cfg.lowrank is not None else set())


def _by_choice(dims: list[Dim], params: dict[str, Any], skip: Any) -> dict[Any, list[str]]:
    """Layers per chosen value (in model order), leaving out those choosing ``skip``."""
    out: dict[Any, list[str]] = {}
    for d in dims:
        value = params[d.name]
        if value != skip:
            out.setdefault(value, []).extend(d.layers)
    return out


def candidate_stages(space: Space, cfg: SearchConfig, params: dict[str, Any],
                     base_stages: list[dict], finetune: dict | None = None) -> list[dict]:
    """The concrete stages of candidate ``params`` (``{dimension: choice}``).

    Args:
        finetune: a FinetuneConfig dict put on the last searched pruning stage (the front
            candidates' short fine-tuning), or None.
    """
    stages: list[dict] = []
    if cfg.prune is not None:
        ratios = (_by_choice(space.prune, params, 0.0) if space.prune
                  else ({cfg.prune.ratios[0]: []} if cfg.prune.ratios[0] > 0 else {}))
        common = {"kind": "structured_prune", "criterion": cfg.prune.criterion,
                  "round_to": cfg.prune.round_to, "allocation": "uniform"}  # ratio per group
        for ratio, layers in sorted(ratios.items()):
            stages.append({**common, "ratio": ratio, "include": layers})
        blocks = params[space.blocks.name] if space.blocks else cfg.prune.blocks[0]
        if blocks > 0:  # last: removing a block first would unname the roots pruned after it
            stages.append({**common, "ratio": 0.0, "blocks": blocks})
        if finetune is not None and stages:
            stages[-1]["finetune"] = copy.deepcopy(finetune)
    if cfg.quant is not None:
        for bits, layers in sorted(_by_choice(space.quant, params, "float").items()):
            stages.append({"kind": "weight_only_quant", "bits": bits, "include": layers,
                           "group_size": cfg.quant.group_size,
                           "layer_types": ["Linear", "Conv"]})
    if cfg.lowrank is not None:
        for share, layers in sorted(_by_choice(space.lowrank, params, 1.0).items()):
            stages.append({"kind": "lowrank", "rank": "ratio", "ratio": share,
                           "include": layers})
    replaced = _replaced_kinds(cfg)
    toggles = {d.name: params[d.name] for d in space.toggles}
    for i, stage in enumerate(base_stages):
        if stage["kind"] in replaced or not toggles.get(f"stage:{i}:{stage['kind']}", True):
            continue
        stages.append(copy.deepcopy(stage))
    # The candidate that changes nothing (the baseline itself) as a recipe, which holds at
    # least one stage: pruning nothing.
    return stages or [{"kind": "structured_prune", "ratio": 0.0}]


def without_finetune(stages: list[dict]) -> list[dict]:
    """The stages with every optional fine-tuning removed (the cheap trial tier); a stage
    that cannot run without its training keeps it."""
    from slimkit.core.stages import STAGE_CONFIGS

    out = []
    for stage in stages:
        if stage.get("finetune") is not None:
            trimmed = {**stage, "finetune": None}
            try:
                STAGE_CONFIGS.get(stage["kind"]).model_validate(trimmed)
                stage = trimmed
            except ValueError:
                pass
        out.append(stage)
    return out


__all__ = ["Dim", "Space", "build_space", "candidate_stages", "without_finetune"]
