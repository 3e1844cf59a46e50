"""Shared helpers for the benchmark scripts (outside the package; each prints JSON)."""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

import torch


def emit(result: dict[str, Any]) -> None:
    """Print the result with the environment it was measured in."""
    result["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(),
                             "cpu": platform.processor() or platform.machine()}
    json.dump(result, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")
