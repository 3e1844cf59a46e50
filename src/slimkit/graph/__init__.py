"""Read-only model analysis: layer selection (graph capture and dependencies build on it)."""

from slimkit.graph.dependency import analyze, build_dependency_graph
from slimkit.graph.select import select_layers

__all__ = ["analyze", "build_dependency_graph", "select_layers"]
