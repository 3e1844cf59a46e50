"""What ``slimkit search`` does after parsing: checks that need no torch, then the search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimkit.core.errors import ConfigError, MissingDataError

SCHEMES = ("sqlite", "postgresql", "mysql")


def check_search_args(recipe: str, out: Path, data: str | None, storage: str | None,
                      worker: bool) -> Any:
    """Refuse bad arguments before torch loads; the recipe, validated.

    Raises:
        ConfigError: a bad recipe, a storage URL of an unknown kind, ``--worker`` without a
            shared ``--storage``. MissingDataError: no ``--data``.
    """
    from slimkit.pipeline.recipe import load_recipe

    rec = load_recipe(recipe)
    if data is None:
        raise MissingDataError("search needs --data: its candidates are judged on the "
                               "validation split of the training data")
    if storage is not None:
        scheme = storage.split("://", 1)[0].split("+", 1)[0] if "://" in storage else ""
        if scheme not in SCHEMES:
            raise ConfigError(f"--storage '{storage}' is not a database URL; give "
                              "postgresql://USER@HOST:PORT/DB (or sqlite:///FILE)")
    if worker and storage is None:
        raise ConfigError("--worker joins a study shared with other processes: give the "
                          "--storage URL they use (postgresql://...)")
    return rec


def summary(result: dict) -> list[str]:
    """Lines for the terminal."""
    if result.get("worker"):
        return [f"worker ran {result['trials_run']} trials; the study holds {result['trials']}"]
    c, h = result["chosen"], result["hand"]
    states: dict[str, int] = {}
    for t in result["trials"]:
        states[t["state"]] = states.get(t["state"], 0) + 1
    lines = [f"{len(result['trials'])} trials ("
             + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
             + f") in {result['seconds']:.0f} s"]
    for label, point in (("chosen", c), ("hand-written", h)):
        m = point["measured"]
        if m is None:
            lines.append(f"{label}: {point.get('error')}")
            continue
        speed = f", {1 / m['time_ratio']:.2f}x faster" if m.get("time_ratio") else ""
        lines.append(f"{label}: {result['metric']} {m['metric']:.4g} (validation), "
                     f"{1 / m['size_share']:.2f}x smaller, {m['flops_share']:.0%} of the FLOPs"
                     f"{speed}; target {'met' if point['met'] else 'missed'}")
    sens = result.get("sensitivity")
    if sens:
        lines.append(f"sensitivity ({'reused' if sens['cached'] else 'measured'}): "
                     f"{len(sens['dims'])} dimensions, {sens['excluded']} settings excluded "
                     f"(budget {sens['budget']}), {len(sens['seeds'])} guided trials first")
    lines.append(f"chosen recipe: {result['outputs']['recipe']} ({c['why']})")
    return lines


__all__ = ["check_search_args", "summary"]
