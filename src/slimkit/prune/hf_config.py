"""Hugging Face configs that follow a pruned model's sizes (where one value per key can say it).

A transformers model rebuilds itself from its ``config``; after structured pruning the config
must describe the smaller layers, or reloading builds the unpruned sizes. This lives with
pruning (not in :mod:`slimkit.io`) because it reads the attention attributes that the
dependency graph and the slicer know about.
"""

from __future__ import annotations

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


def _ffn_width(cfg: object, hidden: int | None) -> tuple[str, int | None]:
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
        inter_key, inter = _ffn_width(cfg, hidden)
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


__all__ = ["sync_hf_config"]
