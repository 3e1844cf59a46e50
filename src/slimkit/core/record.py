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
    """

    changed: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
