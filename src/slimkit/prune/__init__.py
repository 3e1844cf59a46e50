"""Pruning techniques."""

from slimkit.prune.magnitude import (
    MagnitudePruneConfig,
    apply_plan,
    magnitude_prune,
    plan_magnitude,
)
from slimkit.prune.structured import StructuredPruneConfig, structured_prune  # noqa: E402

__all__ = ["MagnitudePruneConfig", "StructuredPruneConfig", "apply_plan", "magnitude_prune",
           "plan_magnitude", "structured_prune"]

from slimkit.prune.nm import NMPruneConfig, nm_prune  # noqa: E402
from slimkit.prune.schedule import GradualPruneConfig, gradual_prune  # noqa: E402
from slimkit.prune.sparse_train import SparseTrainConfig, sparse_train  # noqa: E402

__all__ += ["GradualPruneConfig", "NMPruneConfig", "SparseTrainConfig", "gradual_prune",
            "nm_prune", "sparse_train"]
