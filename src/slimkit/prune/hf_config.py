"""Hugging Face configs that follow a pruned model's sizes (where one value per key can say it).

A transformers model rebuilds itself from its ``config``; after structured pruning the config
must describe the smaller layers, or reloading builds the unpruned sizes. This lives with
pruning (not in :mod:`slimkit.io`) because it reads the attention attributes that the
dependency graph and the slicer know about.

:func:`rebuild_shapes` builds a transformers model from a config on the ``meta`` device (no
memory): what ``from_pretrained`` would build from a saved directory. :func:`rebuild_report`
compares it with the pruned model, so the record says whether ``save_pretrained`` output
reloads; :mod:`slimkit.prune.hf_loadable` probes configs with it before pruning.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from slimkit.graph.attention import HEAD_ATTRS, HEAD_SIZE_ATTRS
from slimkit.graph.layers import linear_features


def _hf_configs(model: nn.Module) -> dict[int, tuple[object, list[tuple[str, nn.Module]]]]:
    """Each transformers config inside ``model`` and the modules that hold it."""
    found: dict[int, tuple[object, list[tuple[str, nn.Module]]]] = {}
    for name, m in model.named_modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and type(cfg).__module__.startswith("transformers."):
            found.setdefault(id(cfg), (cfg, []))[1].append((name, m))
    return found


def _int_attrs(mods: list[tuple[str, nn.Module]], attrs: tuple[str, ...]) -> dict[str, int]:
    """``{module: value}`` of the first int attribute of ``attrs`` each module has."""
    out = {}
    for name, m in mods:
        v = next((getattr(m, a) for a in attrs if isinstance(getattr(m, a, None), int)), None)
        if v is not None:
            out[name] = v
    return out


def _widths(before: nn.Module, after: nn.Module, width: int | None,
            in_width: int | None = None) -> dict[str, int]:
    """Width in ``after`` of each LayerNorm of ``before`` of ``width`` (no ``in_width``) or
    each Linear ``in_width -> width``."""
    new = dict(after.named_modules())
    out = {}
    for n, m in before.named_modules():
        if in_width is None and isinstance(m, nn.LayerNorm) and \
                int(m.normalized_shape[-1]) == width:
            out[n] = int(new[n].normalized_shape[-1])
        elif in_width is not None and linear_features(m) == (in_width, width):
            out[n] = linear_features(new[n])[1]  # nn.Linear, or an HF Conv1D (GPT-2)
    return out


def ffn_width(cfg: object, hidden: int | None) -> tuple[str, int | None]:
    """The config key of the FFN width and the width it gives: ``intermediate_size``, or
    GPT-2's ``n_inner``, whose ``None`` means ``4 * hidden_size``."""
    if not isinstance(getattr(cfg, "intermediate_size", None), int) and hasattr(cfg, "n_inner"):
        inner = cfg.n_inner
        if isinstance(inner, int):
            return "n_inner", inner
        return "n_inner", 4 * hidden if isinstance(hidden, int) else None
    return "intermediate_size", getattr(cfg, "intermediate_size", None)


def sync_hf_config(original: nn.Module, pruned: nn.Module,
                   ) -> tuple[list[str], list[dict[str, str]]]:
    """Make the transformers configs inside ``pruned`` describe its pruned sizes.

    ``num_attention_heads`` and the head size follow the attention modules, ``hidden_size``
    the LayerNorms of the hidden width, ``intermediate_size`` (GPT-2: ``n_inner``) the
    Linears (or HF ``Conv1D`` s) that had that width, each when every layer agrees. A config
    holds one value per key: per-layer sizes, and a head size that the architecture derives
    from ``hidden_size / num_attention_heads``, cannot be expressed and are reported instead.

    Args:
        original: the model before pruning (not modified).
        pruned: the pruned copy; its configs (not shared with ``original``) are updated.

    Returns:
        ``(changed, skipped)``: one line per updated key, and ``{"what", "why"}`` per key the
        config cannot express.
    """

    changed: list[str] = []
    skipped: list[dict[str, str]] = []
    for cfg, mods in _hf_configs(pruned).values():
        # the pruned copy's config still holds the original sizes until it is updated here
        hidden = getattr(cfg, "hidden_size", None)
        inter_key, inter = ffn_width(cfg, hidden)
        found = {
            "num_attention_heads": _int_attrs(mods, HEAD_ATTRS),
            "hidden_size": _widths(original, pruned, hidden),
            inter_key: _widths(original, pruned, inter, hidden) if hidden and inter else {},
        }
        for key, per_module in found.items():
            _set_key(cfg, key, per_module, changed, skipped, inter if key == inter_key else None,
                     pin=getattr(cfg, "hidden_size", None) != hidden)
        _sync_head_size(cfg, _int_attrs(mods, HEAD_SIZE_ATTRS), changed, skipped)
    return changed, skipped


def _set_key(cfg: object, key: str, per_module: dict[str, int], changed: list[str],
             skipped: list[dict[str, str]], implied: int | None = None,
             pin: bool = False) -> None:
    """Set ``cfg.key`` to the one value every layer in ``per_module`` agrees on.

    ``implied``: the size a key holding None stands for (GPT-2's ``n_inner``: 4 x
    ``hidden_size``). With ``pin`` (``hidden_size`` changed) it is written out even when
    unchanged, or the default would move with the hidden size.
    """
    stored = getattr(cfg, key, None)
    old = stored if stored is not None else implied
    values = sorted(set(per_module.values()))
    if not isinstance(old, int) or not values or \
            (values == [old] and not (stored is None and pin)):
        return
    if len(values) == 1:
        setattr(cfg, key, values[0])
        changed.append(f"config.{key}: {stored} -> {values[0]}")
        return
    skipped.append({"what": f"config.{key}",
                    "why": f"layers differ ({per_module}); a config holds one value, so it "
                           f"still says {old}: rebuild from this config gives wrong sizes"})


def _sync_head_size(cfg: object, per_module: dict[str, int], changed: list[str],
                    skipped: list[dict[str, str]]) -> None:
    values = sorted(set(per_module.values()))
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    derived = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else None
    if not values or values == [derived] == [getattr(cfg, "head_dim", derived)]:
        return
    if len(values) > 1:
        skipped.append({"what": "config.head_dim",
                        "why": f"head sizes differ per layer ({per_module}); a config holds one"})
        return
    old = getattr(cfg, "head_dim", None)
    cfg.head_dim = values[0]
    changed.append(f"config.head_dim: {old} -> {values[0]}")
    if values[0] != derived:
        skipped.append({"what": "config head size",
                        "why": f"config.head_dim = {values[0]} differs from hidden_size / "
                               f"num_attention_heads = {derived}: architectures that read "
                               "config.head_dim (ViT) rebuild this size, those that derive it "
                               "(BERT, GPT-2) rebuild the unpruned head size from the config "
                               "alone"})


@dataclass(frozen=True)
class Owner:
    """A transformers model inside a model, rebuilt from its config by ``from_pretrained``.

    Attributes:
        name: its module name in the model ("" for the model itself).
        module: the ``PreTrainedModel``.
        config: its config (shared with its submodules).
    """

    name: str
    module: nn.Module
    config: object

    @property
    def prefix(self) -> str:
        return f"{self.name}." if self.name else ""

    def covers(self, name: str) -> bool:
        """Whether the module or tensor ``name`` (in the whole model) lies inside this one."""
        return not self.name or name == self.name or name.startswith(self.prefix)


def hf_owners(model: nn.Module) -> list[Owner]:
    """The outermost transformers ``PreTrainedModel`` s inside ``model`` (``model`` itself when
    it is one): each config's outermost holder that its class rebuilds from it."""
    configs = _hf_configs(model)
    base = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    if not configs or base is None:
        return []
    owners: list[Owner] = []
    for cfg, mods in configs.values():
        found = next(((n, m) for n, m in mods if isinstance(m, base)), None)
        if found is not None:
            owners.append(Owner(found[0], found[1], cfg))
    return [o for o in owners if not any(p is not o and p.covers(o.name) for p in owners)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' config and init messages silenced (a probe is not the user's model)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)


def rebuild_shapes(owner: Owner, config: object | None = None) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer shape of ``type(owner.module)`` built from ``config`` (a copy
    of it; default: the owner's own), named as in the whole model.

    Built on the ``meta`` device, so a large model costs no memory; this is the architecture
    ``from_pretrained`` builds before it loads a saved state dict.

    Raises:
        Exception: whatever the model class raises on that config (e.g. a hidden size that is
            not a multiple of the head count).
    """
    cfg = copy.deepcopy(owner.config if config is None else config)
    with _quiet(), torch.device("meta"):
        built = type(owner.module)(cfg)
    return {owner.prefix + n: tuple(t.shape) for n, t in _tensors(built)}


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False)]


def rebuild_report(model: nn.Module) -> dict[str, dict[str, object]]:
    """Whether each transformers model inside ``model`` is rebuilt by its config as it is.

    Returns:
        ``{owner name ("" = the model): {"class", "rebuilds", "mismatched": [up to 5 lines
        "tensor: config builds [...], model has [...]"]}}``; empty without transformers models.
    """
    report: dict[str, dict[str, object]] = {}
    for owner in hf_owners(model):
        have = {owner.prefix + n: tuple(t.shape) for n, t in _tensors(owner.module)}
        try:
            built = rebuild_shapes(owner)
        except Exception as exc:  # the config describes no buildable model
            bad = [f"{type(owner.module).__name__}(config) fails: {type(exc).__name__}: "
                   f"{str(exc)[:200]}"]
        else:
            bad = [f"{n}: config builds {list(built[n]) if n in built else 'nothing'}, model "
                   f"has {list(have[n]) if n in have else 'nothing'}"
                   for n in sorted(set(built) | set(have)) if built.get(n) != have.get(n)]
        report[owner.name] = {"class": type(owner.module).__name__, "rebuilds": not bad,
                              "mismatched": bad[:5]}
    return report


__all__ = ["Owner", "ffn_width", "hf_owners", "rebuild_report", "rebuild_shapes", "sync_hf_config"]
