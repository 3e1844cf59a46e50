"""Helpers for ONNX graph passes written on onnx-ir (``onnx_ir``).

The QDQ rewrite and the fused integer matmul (:mod:`slimkit.export`) edit an ``ir.Model``: a
value knows its producer and its uses, so no index by value name has to be kept up to date.
What they share is here: reading a constant, adding an initializer, the single consumer of a
value, and the node order ONNX requires.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimkit.core.errors import ExportError


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The array held by ``value`` when it is constant (an initializer or the output of a
    ``Constant`` node), else None.

    Example:
        >>> const_array(model.graph.initializers["scale"])  # doctest: +SKIP
        array(0.02, dtype=float32)
    """
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer of ``graph`` named ``name`` (made unique with a
    numeric suffix when an initializer already has that name) and return its value."""
    unique, k = name, 0
    while unique in graph.initializers:
        k += 1
        unique = f"{name}_{k}"
    value = ir.Value(name=unique, const_value=ir.tensor(array, name=unique))
    graph.register_initializer(value)
    return value


def only_consumer(value: ir.Value | None, op: str) -> ir.Node | None:
    """The single node reading ``value`` (once) when it is an ``op`` node, else None."""
    uses = [] if value is None else list(value.uses())
    return uses[0].node if len(uses) == 1 and uses[0].node.op_type == op else None


def sort_in_layers(graph: ir.Graph) -> None:
    """Reorder ``graph``'s nodes so each follows the producers of its inputs (ONNX requires it).

    Layer by layer: first every node whose inputs are graph inputs or constants, then every
    node reading only those, and so on, each layer in the current order of its nodes. The order
    is deterministic, and sorting an already sorted graph leaves it unchanged.

    Raises:
        ExportError: a node reads a value nothing produces, or the graph has a cycle.
    """
    ready: set[ir.Value | None] = {None, *graph.inputs, *graph.initializers.values()}
    pending, order = list(graph), []
    while pending:
        now = [n for n in pending if all(i in ready for i in n.inputs)]
        if not now:
            raise ExportError(f"ONNX graph '{graph.name}' has a cycle or an input nothing "
                              f"produces (at node '{pending[0].name}')")
        ready.update(o for n in now for o in n.outputs)
        order += now
        placed = set(now)
        pending = [n for n in pending if n not in placed]
    graph.remove(order)
    graph.extend(order)


__all__ = ["add_initializer", "const_array", "only_consumer", "sort_in_layers"]
