"""An index over an ONNX graph: the node producing each value and the nodes consuming it.

Graph passes (the QDQ rewrite, the fused integer matmul) and inspections (which kernels ONNX
Runtime chose) walk an ``onnx.GraphProto`` by value name; they share this one index.
"""

from __future__ import annotations

from typing import Any


class OnnxGraphIndex:
    """Producer and consumers (in graph order) of every value name of an ``onnx.GraphProto``.

    The maps describe the nodes as they were at the last :meth:`refresh`; call it again after
    adding, removing or rewiring nodes.

    Example:
        >>> g = OnnxGraphIndex(onnx.load("model.onnx").graph)  # doctest: +SKIP
        >>> g.producer["output"].op_type, [n.op_type for n in g.users("input")]  # doctest: +SKIP
    """

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the maps from the graph's current nodes."""
        self.producer: dict[str, Any] = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def users(self, name: str) -> list[Any]:
        """The nodes reading value ``name`` (empty when none does)."""
        return self.consumers.get(name, [])

    def producer_op(self, name: str) -> str | None:
        """The op type of the node producing ``name`` (None for graph inputs, initializers)."""
        node = self.producer.get(name)
        return None if node is None else node.op_type

    def only(self, name: str, op: str) -> Any | None:
        """The single consumer of ``name`` when it is an ``op`` node, else None."""
        users = self.users(name)
        return users[0] if len(users) == 1 and users[0].op_type == op else None


__all__ = ["OnnxGraphIndex"]
