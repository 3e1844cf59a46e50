"""Pruning techniques.

Names are imported on first use (see :mod:`slimkit.core.lazy`); the configs need no torch.
"""

from slimkit.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "slimkit.prune.config": ("GradualPruneConfig", "MagnitudePruneConfig", "NMPruneConfig",
                             "SparseTrainConfig"),
    "slimkit.prune.structured_config": ("StructuredPruneConfig",),
    "slimkit.prune.magnitude": ("apply_plan", "magnitude_prune", "plan_magnitude"),
    "slimkit.prune.nm": ("nm_prune",),
    "slimkit.prune.schedule": ("gradual_prune",),
    "slimkit.prune.sparse_train": ("sparse_train",),
    "slimkit.prune.structured": ("structured_prune",),
})
