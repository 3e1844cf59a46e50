"""Pruning techniques."""

from slimkit.prune.magnitude import (
    MagnitudePruneConfig,
    apply_plan,
    magnitude_prune,
    plan_magnitude,
)

__all__ = ["MagnitudePruneConfig", "apply_plan", "magnitude_prune", "plan_magnitude"]
