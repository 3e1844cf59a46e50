"""Read-only model analysis: layer selection (graph capture and dependencies build on it)."""

from slimkit.graph.select import select_layers

__all__ = ["select_layers"]
