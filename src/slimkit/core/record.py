"""What a technique did: the record every stage returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Record:
    """What changed, what was skipped and why, and the technique's details (its plan, stats).

    Attributes:
        changed: one human-readable line per change (``"fc1: 0.0% -> 90.0% zeros"``).
        skipped: ``{"what": layer, "why": reason}`` for everything left alone.
        details: JSON-serializable data: the plan that can be replayed, per-layer numbers.
        transforms: ``(rebuilder kind, plan)`` for every structural change, in order: what an
            artifact replays to rebuild the new architecture (see
            :func:`slimkit.core.stages.register_rebuilder`). The stage contract stores them
            in the model's architecture; they are not part of :meth:`to_dict`.
    """

    changed: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    transforms: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["transforms"]
        return out
