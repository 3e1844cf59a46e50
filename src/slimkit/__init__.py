"""slimkit: make trained PyTorch models smaller and faster, and prove it with measurements.

Example:
    >>> import slimkit
    >>> data = slimkit.load_data("builtin:mnist")
    >>> model, _ = slimkit.train_zoo("lenet5", data, slimkit.TrainConfig(epochs=2))
    >>> report = slimkit.compress(model, data, "recipe.yaml", "out/")

Names are imported on first use, so ``import slimkit`` stays cheap and touches no optional
dependency.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "slimkit.api", "train_zoo": "slimkit.api", "wrap": "slimkit.api",
    "search": "slimkit.api",
    "SlimkitError": "slimkit.core.errors",
    "load_data": "slimkit.data", "DataBundle": "slimkit.data.bundle",
    "StreamData": "slimkit.data.stream", "custom_task": "slimkit.measure.tasks",
    "SlimModel": "slimkit.io", "load_artifact": "slimkit.io", "load_model": "slimkit.io",
    "save_artifact": "slimkit.io",
    "measure_static": "slimkit.measure",
    "STAGES": "slimkit.core.stages", "StageContext": "slimkit.core.stages",
    "register_stage": "slimkit.core.stages",
    "load_recipe": "slimkit.pipeline", "recipe_schema": "slimkit.pipeline",
    "MagnitudePruneConfig": "slimkit.prune", "magnitude_prune": "slimkit.prune",
    "TrainConfig": "slimkit.train", "fit": "slimkit.train",
    "export_onnx": "slimkit.export", "check_parity": "slimkit.export",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slimkit' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
