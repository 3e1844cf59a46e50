"""Structured pruning that a transformers config can still describe (``hf_loadable``).

``from_pretrained`` builds a model from its ``config`` and then loads the saved tensors, so a
pruned model reloads only when its config, one value per key, builds exactly its sizes. The
config of BERT, GPT-2 or ViT has one FFN width (``intermediate_size``; GPT-2 ``n_inner``) for
every layer, one hidden size (which BERT and GPT-2 also divide into the head size), and one
head count; transformers 5 has no ``config.pruned_heads`` any more (BERT's ``prune_heads``
and the re-pruning at load are gone), so per-layer head counts cannot be said at all.

Rather than hard-coding those rules per architecture, each config key is *probed*: the
model's class is built from a copy of its config with the key one unit smaller, on the
``meta`` device (no memory; :func:`slimkit.prune.hf_config.rebuild_shapes`), and the tensor
dims that shrink are compared with the dependency groups. A key is usable when the groups it
shrinks are exactly whole groups, by one unit each (an FFN channel; a head of the same size,
which ViT can say with ``num_attention_heads`` and ``head_dim`` but BERT and GPT-2, deriving
the head size from ``hidden_size``, cannot), and together cover every dim it shrinks. Those
groups are *tied*: they keep one count (:func:`slimkit.prune.allocate.tie_counts`), and the
config sync writes it. Every other group inside the transformers model is left whole, with
the reason: the hidden size (residual stream, embeddings, pooler, classifier input), heads
the config cannot count, widths no key sets alone. Residual branches are kept too
(``num_hidden_layers`` counts whole layers).

Example:
    >>> scopes, notes = loadable_scopes(bert, "auto", "heads")
    >>> allowed, ties, skipped = constrain(scopes, groups)   # FFN groups, tied across layers
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from slimkit.graph.dependency import Group
from slimkit.prune.hf_config import Owner, ffn_width, hf_owners, rebuild_shapes

#: ``hf_loadable`` values: on, off, or on for transformers models whose config can say a
#: pruned width (see :func:`loadable_scopes`).
Mode = bool | Literal["auto"]
Dims = dict[tuple[str, int], int]  # (tensor, dim) -> how much it shrinks per unit


@dataclass(frozen=True)
class Probe:
    """One config key made one unit smaller, and what the rebuilt model shows for it.

    Attributes:
        label: the key as records name it (``config.intermediate_size``).
        kind: ``ffn``, ``heads`` or ``head_dims``.
        delta: ``{(tensor, dim): shrink}`` of the rebuilt model against the config as it
            is; empty when no tensor changes.
        error: why the rebuild failed (then ``delta`` is empty), or None.
    """

    label: str
    kind: str
    delta: Dims
    error: str | None = None

    def fits(self, group: Group) -> bool:
        """Whether removing one channel of ``group`` shrinks tensors as this key's unit does."""
        return bool(self.delta) and group.size > 1 and all(
            self.delta.get((m.param, m.dim)) == len(m.indices[0]) for m in group.members)

    def outcome(self) -> str:
        if self.error is not None:
            return f"{self.label}: the rebuild fails ({self.error})"
        return f"{self.label}: changes no tensor" if not self.delta else \
            f"{self.label}: changes {len(self.delta)} tensor dims"


@dataclass(frozen=True)
class Scope:
    """A transformers model whose pruning stays within what its config can say.

    Attributes:
        owner: the model (its name, module, config).
        probes: the keys tried, in order (FFN width, then heads or head size).
        hidden: the config's (and sub-configs') ``hidden_size`` values.
    """

    owner: Owner
    probes: list[Probe]
    hidden: frozenset[int]

    @property
    def cls(self) -> str:
        return type(self.owner.module).__name__

    def holds(self, group: Group) -> bool:
        return any(self.owner.covers(m.param) for m in group.members)


def _version() -> str:
    return str(getattr(sys.modules.get("transformers"), "__version__", "?"))


def _sub_configs(cfg: object) -> list[tuple[tuple[str, ...], object]]:
    """The config and the configs it holds (CLIP's ``text_config``...), by attribute path."""
    base = sys.modules["transformers"].PretrainedConfig
    subs = [((k,), v) for k, v in vars(cfg).items() if isinstance(v, base) and v is not cfg]
    return [((), cfg), *subs]


def _changes(cfg: object, path: tuple[str, ...]) -> list[tuple[str, str, dict[str, int]]]:
    """The probes of one (sub-)config: ``(label, kind, {key: value})`` with one unit less."""
    prefix = "config." + "".join(f"{p}." for p in path)
    hidden = getattr(cfg, "hidden_size", None)
    out: list[tuple[str, str, dict[str, int]]] = []
    key, inter = ffn_width(cfg, hidden)
    if isinstance(inter, int) and inter > 1:
        out.append((prefix + key, "ffn", {key: inter - 1}))
    heads = getattr(cfg, "num_attention_heads", None)
    if type(heads) is int and heads > 0:
        size = getattr(cfg, "head_dim", None)
        if type(size) is not int:
            size = hidden // heads if type(hidden) is int else None
        if isinstance(size, int) and heads > 1:
            out.append((f"{prefix}num_attention_heads (head_dim {size})", "heads",
                        {"num_attention_heads": heads - 1, "head_dim": size}))
        if isinstance(size, int) and size > 1:
            out.append((prefix + "head_dim", "head_dims", {"head_dim": size - 1}))
    return out


def _probe(owner: Owner, base: dict[str, tuple[int, ...]], path: tuple[str, ...], label: str,
           kind: str, values: dict[str, int]) -> Probe:
    cfg = copy.deepcopy(owner.config)
    target: Any = cfg
    for p in path:
        target = getattr(target, p)
    for k, v in values.items():
        setattr(target, k, v)
    try:
        built = rebuild_shapes(owner, cfg)
    except Exception as exc:  # the class refuses the config (BERT: heads not dividing hidden)
        return Probe(label, kind, {}, f"{type(exc).__name__}: {str(exc)[:160]}")
    delta: Dims = {}
    for name in sorted(set(base) | set(built)):
        old, new = base.get(name), built.get(name)
        if old is None or new is None or len(old) != len(new):
            return Probe(label, kind, {}, f"tensor {name} appears, vanishes or changes rank")
        for d, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                delta[(name, d)] = a - b
    if any(v < 0 for v in delta.values()):
        return Probe(label, kind, {}, "a smaller value makes some tensor larger")
    return Probe(label, kind, delta)


def _probes(owner: Owner, attention: str) -> list[Probe]:
    """The FFN-width probe and the head probe of ``attention``'s kind, per (sub-)config."""
    try:
        base = rebuild_shapes(owner)
    except Exception as exc:  # the config does not even build the unpruned model
        return [Probe("config", "ffn", {}, f"{type(exc).__name__}: {str(exc)[:160]}")]
    wanted = {"ffn", "heads" if attention == "heads" else "head_dims"}
    return [_probe(owner, base, path, label, kind, values)
            for path, cfg in _sub_configs(owner.config)
            for label, kind, values in _changes(cfg, path) if kind in wanted]


def loadable_scopes(model: nn.Module, mode: Mode, attention: str,
                    ) -> tuple[list[Scope], list[dict[str, str]]]:
    """The transformers models inside ``model`` whose pruning stays loadable, with their probes.

    Args:
        model: the model about to be pruned (not modified).
        mode: ``hf_loadable``: False (none), True (every transformers model), ``"auto"`` (those
            whose config can say at least one pruned width; the others, CNNs such as ResNet
            whose config derives every width from a few stage sizes, are pruned as any
            model, and a note says so).
        attention: ``heads`` or ``head_dims`` (which head key to probe).

    Returns:
        The scopes, and the notes for transformers models ``auto`` left unconstrained.
    """
    if mode is False:
        return [], []
    scopes: list[Scope] = []
    notes: list[dict[str, str]] = []
    for owner in hf_owners(model):
        probes = _probes(owner, attention)
        cls = type(owner.module).__name__
        if mode == "auto" and not any(p.delta for p in probes):
            tried = "; ".join(p.outcome() for p in probes) or "it has no FFN width or head count"
            notes.append({"what": f"hf_loadable ({cls})",
                          "why": f"auto: no key of its config sets a prunable width alone "
                                 f"({tried}); pruned as any model: the slimkit artifact "
                                 "reloads it, save_pretrained output would not "
                                 "(hf_loadable: true prunes only what the config can say)"})
            continue
        hidden = frozenset(c.hidden_size for _, c in _sub_configs(owner.config)
                           if type(getattr(c, "hidden_size", None)) is int)
        scopes.append(Scope(owner, probes, hidden))
    return scopes, notes


def constrain(scopes: list[Scope], groups: list[Group],
              ) -> tuple[list[Group], list[list[int]], list[dict[str, str]]]:
    """Keep only the groups a usable config key sets, tied per key; skip the rest with reasons.

    Returns:
        ``(allowed groups, ties: [[group id, ...] per key], skipped)``; groups outside every
        scope are allowed untouched.
    """
    if not scopes:
        return groups, [], []
    dropped: set[int] = set()
    ties: list[list[int]] = []
    skipped: list[dict[str, str]] = []
    for scope in scopes:
        mine = [g for g in groups if g.id not in dropped and scope.holds(g)]
        by_probe: dict[int, list[Group]] = {}
        for g in mine:
            i = next((i for i, p in enumerate(scope.probes) if p.fits(g)), None)
            if i is None:
                dropped.add(g.id)
                skipped.append({"what": g.describe(), "why": _why(scope, g)})
            else:
                by_probe.setdefault(i, []).append(g)
        for i, tie in by_probe.items():
            probe = scope.probes[i]
            left = sorted(set(probe.delta) - {(m.param, m.dim) for g in tie for m in g.members})
            if not left:
                ties.append([g.id for g in tie])
                continue
            why = (f"kept (hf_loadable): {probe.label} sets this width in every layer at once, "
                   f"and {left[0][0]} (dim {left[0][1]}) cannot be pruned with the others "
                   "(excluded, outside include, or tied to a fixed size), so none is pruned")
            dropped.update(g.id for g in tie)
            skipped += [{"what": g.describe(), "why": why} for g in tie]
    return [g for g in groups if g.id not in dropped], ties, skipped


def _why(scope: Scope, group: Group) -> str:
    """Why ``group`` stays whole in a loadable ``scope``."""
    kind = "heads" if group.heads else "head_dims" if group.head_dims else "ffn"
    tried = [p for p in scope.probes if p.kind == kind]
    outcome = "; ".join(p.outcome() for p in tried) or "the config has no such key"
    if kind == "heads":
        return (f"attention heads kept (hf_loadable): the installed transformers {_version()} "
                f"has no config.pruned_heads, so heads pruned per layer cannot be saved, and "
                f"{scope.cls} rebuilt with one head fewer of the same size does not lose "
                f"exactly one head per layer ({outcome})")
    if kind == "head_dims":
        return (f"head size kept (hf_loadable): {scope.cls} rebuilt with a smaller head_dim "
                f"does not shrink exactly these heads ({outcome})")
    if group.size in scope.hidden:
        return ("hidden size kept (hf_loadable): transformers' config has one hidden size "
                "tied to heads x head size (and to the embeddings, pooler and classifier "
                "input)")
    keys = ", ".join(p.label for p in scope.probes) or "none"
    return (f"kept (hf_loadable): no key of {scope.cls}'s config sets this width alone "
            f"(probed: {keys}); hf_loadable: false prunes it (the slimkit artifact reloads "
            "it, save_pretrained output would not)")


def hold_branches(scopes: list[Scope], ranked: list[dict[str, Any]],
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Residual branches outside every scope, and the others kept with the reason."""
    free, kept = [], []
    for b in ranked:
        names = [b["module"], *b["modules"]]
        scope = next((s for s in scopes if any(s.owner.covers(m) for m in names)), None)
        if scope is None:
            free.append(b)
        else:
            kept.append({"what": f"block {b['module']}/{b['add']}",
                         "why": f"kept (hf_loadable): {scope.cls}'s config counts whole layers "
                                "(num_hidden_layers) and cannot say that one residual branch "
                                "of a layer is gone"})
    return free, kept


__all__ = ["Mode", "Probe", "Scope", "constrain", "hold_branches", "loadable_scopes"]
