"""Baseline and final per-layer rows, lined up under the baseline's layer names.

A technique that replaces a layer puts the replacement at the layer's own path: a factorized
``fc1`` becomes ``fc1.0`` and ``fc1.1``, and reports written before quantized layers were
measured as one unit name a wrapped layer ``conv1.layer``. A final row whose name the baseline
lacks but which lies under a baseline layer's path is that layer's replacement (or part of it),
so it is folded into one row under the baseline name, summing its parts. Only final rows move;
a baseline row with nothing left under its name reads as removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimkit.report.fmt import as_list, as_mapping, finite

#: Per-layer values that add up over a layer's parts.
SUMMED = ("params", "nonzero_params", "macs", "bytes", "latency_ms")

Row = Mapping[str, Any]


def _rows(layers: Any) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for layer in as_list(layers):
        layer = as_mapping(layer)
        out.setdefault(str(layer.get("name")), layer)
    return out


def _owner(name: str, base: Mapping[str, Row]) -> str | None:
    """The longest baseline layer name that ``name`` is a path under, if any."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in base:
            return prefix
    return None


def _sum(rows: list[Row], key: str) -> float | None:
    values = [finite(r.get(key)) for r in rows]
    present = [v for v in values if v is not None]
    if not present:
        return None
    return sum(present)


def _mean_bits(rows: list[Row]) -> float | None:
    """Bits per weight over the parts, weighted by their parameters (None if unknown)."""
    pairs = [(finite(r.get("weight_bits")), finite(r.get("params"))) for r in rows]
    if any(b is None or p is None for b, p in pairs):
        return None
    weight = sum(p for _, p in pairs)
    if not weight:
        return None
    return sum(b * p for b, p in pairs) / weight


def merge(name: str, rows: list[Row]) -> Row:
    """One row under ``name`` for the layers that replaced it (a single row under ``name``
    stays as it is). The merged row lists its ``parts`` and their ``part_shapes``."""
    if len(rows) == 1 and str(rows[0].get("name")) == name:
        return rows[0]
    merged: dict[str, Any] = {
        "name": name,
        "type": " + ".join(str(r.get("type")) for r in rows),
        "parts": [str(r.get("name")) for r in rows],
        "part_shapes": [r.get("weight_shape") for r in rows],
        "weight_bits": _mean_bits(rows),
    }
    merged.update({key: _sum(rows, key) for key in SUMMED})
    return merged


def layer_pairs(baseline: Any, final: Any) -> list[tuple[str, Row | None, Row | None]]:
    """``(name, baseline row, final row)`` per layer: baseline layers in model order, then
    final layers that fit under none of them.

    Args:
        baseline: a measure's ``layers`` list (rows with a ``name``), or anything else
            (no rows).
        final: the same for the final model; rows under a baseline layer's path that the
            baseline lacks are folded into that layer (see the module docstring).

    Example:
        >>> base = [{"name": "fc", "params": 100}]
        >>> final = [{"name": "fc.0", "params": 30}, {"name": "fc.1", "params": 20}]
        >>> [(n, f["params"]) for n, _, f in layer_pairs(base, final)]
        [('fc', 50.0)]
    """
    base, new = _rows(baseline), _rows(final)
    groups: dict[str, list[Row]] = {}
    for name, row in new.items():
        owner = name if name in base else _owner(name, base)
        groups.setdefault(name if owner is None else owner, []).append(row)
    names = list(base) + [n for n in groups if n not in base]
    return [(n, base.get(n), merge(n, groups[n]) if n in groups else None) for n in names]
