"""The shared training loop, its config, objectives and checkpoints.

Names are imported on first use (see :mod:`slimkit.core.lazy`): the configs need no torch.
"""

from slimkit.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "slimkit.train.bn": ("recalibrate_batchnorm",),
    "slimkit.train.config": ("EarlyStopping", "TrainConfig"),
    "slimkit.train.loop": ("evaluate", "fit"),
    "slimkit.train.objective": ("CrossEntropy", "Objective"),
})
