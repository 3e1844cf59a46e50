"""Channel labels: which tensor positions must be removed together (a union-find over labels).

Every dimension of every tensor in a captured graph carries a label array with one entry per
position. A *real* label (>= 0) names a prunable position; :data:`STATIC` (-1) marks positions of
dimensions that never change size (batch, spatial, kernel). Each parameter dimension starts with
fresh labels; ops *unite* the labels of positions that have to disappear together (a conv's
input channel and the previous layer's output channel, both operands of a residual add) and
*lock* labels that meet a dimension whose size is fixed (the model's input/output, a padded or
sliced channel range, an op nobody taught the analysis). After the whole graph has been walked,
the sets of united labels are the prunable channels, and locked sets are not prunable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STATIC = -1

Labels = list[np.ndarray]  # one int64 array per tensor dimension


@dataclass
class Lock:
    """Labels that must keep their size, and why (shown by ``analyze``)."""

    labels: np.ndarray
    module: str
    op: str
    why: str


@dataclass
class LabelSet:
    """Union-find over integer labels, plus the locks recorded while walking a graph."""

    parent: list[int] = field(default_factory=list)
    locks: list[Lock] = field(default_factory=list)

    def fresh(self, n: int) -> np.ndarray:
        """``n`` new labels, each in its own set."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def roots(self, labels: np.ndarray) -> np.ndarray:
        """The set representative of each label (STATIC stays STATIC)."""
        return np.array([self.find(int(v)) if v >= 0 else STATIC for v in labels.tolist()],
                        dtype=np.int64)

    def lock(self, labels: np.ndarray, module: str, op: str, why: str) -> None:
        """Mark the real labels of ``labels`` as not prunable."""
        real = labels[labels >= 0]
        if real.size:
            self.locks.append(Lock(real.copy(), module, op, why))

    def unite(self, a: np.ndarray, b: np.ndarray, module: str, op: str) -> np.ndarray:
        """Positions ``a[i]`` and ``b[i]`` are removed together; returns the united labels.

        A real label meeting a STATIC position is locked: the op ties it to a fixed size.
        """
        if a.shape != b.shape:
            self.lock(a, module, op, f"sizes {a.size} and {b.size} do not line up")
            self.lock(b, module, op, f"sizes {a.size} and {b.size} do not line up")
            return np.full(max(a.size, b.size), STATIC, dtype=np.int64)
        out = a.copy()
        for i, (x, y) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
            if x >= 0 and y >= 0:
                rx, ry = self.find(x), self.find(y)
                if rx != ry:
                    self.parent[ry] = rx
            elif x >= 0 or y >= 0:
                out[i] = max(x, y)
                self.lock(np.array([max(x, y)]), module, op,
                          "tied to a dimension whose size cannot change")
        return out

    def unite_all(self, labels: np.ndarray) -> int:
        """Put every real label of ``labels`` in one set; returns its label (or STATIC)."""
        real = [int(v) for v in labels.tolist() if v >= 0]
        if not real:
            return STATIC
        first = self.find(real[0])
        for v in real[1:]:
            r = self.find(v)
            if r != first:
                self.parent[r] = first
        return first


def static(shape: tuple[int, ...] | list[int]) -> Labels:
    """Labels of a tensor with no prunable dimension."""
    return [np.full(int(s), STATIC, dtype=np.int64) for s in shape]


def reshape(ls: LabelSet, labels: Labels, out_shape: list[int], module: str, op: str,
            coarsened: list[np.ndarray] | None = None, unit: str = "heads") -> Labels:
    """Labels after a view/reshape/flatten/unflatten.

    Dimensions are matched in runs whose sizes multiply to the same number. Within a run, each
    flat position takes the one real label among its input coordinates (a flattened
    ``[C, H, W]`` gives every ``(c, h, w)`` column the label of channel ``c``). Splitting a
    labelled dimension into several (``E -> (heads, head_dim)``) coarsens onto the outermost
    dimension the labels vary along: every position of one head becomes one prunable unit, so
    heads are removed whole and the inner size stays fixed. With ``unit="inner"`` it coarsens
    onto the innermost varying dimension instead: index ``j`` of every head is one unit, so the
    same position goes from every head and all heads keep one (smaller) head size. The labels
    of each coarsened dimension are appended to ``coarsened``.
    """
    in_shape = [len(a) for a in labels]
    out: Labels = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        i0, j0 = i, j
        pi = in_shape[i] if i < len(in_shape) else 1
        pj = out_shape[j] if j < len(out_shape) else 1
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                pi, i = pi * in_shape[i], i + 1
            elif j < len(out_shape):
                pj, j = pj * out_shape[j], j + 1
            else:
                break
        out += _reshape_run(ls, labels[i0:i], out_shape[j0:j], module, op, coarsened, unit)
    return out[:len(out_shape)]


def _reshape_run(ls: LabelSet, parts: Labels, out_sizes: list[int], module: str,
                 op: str, coarsened: list[np.ndarray] | None, unit: str = "heads") -> Labels:
    if not out_sizes:
        for p in parts:
            ls.lock(p, module, op, "dimension dropped by a reshape")
        return []
    flat = _combine(ls, parts)
    grid = flat.reshape(out_sizes)
    varying = []
    for d in range(len(out_sizes)):
        moved = np.moveaxis(grid, d, 0).reshape(out_sizes[d], -1)
        if not (moved == moved[:1, :]).all():
            varying.append(d)
    result = [np.full(s, STATIC, dtype=np.int64) for s in out_sizes]
    if not varying:
        ls.lock(flat[:1], module, op, "one label spread over a whole reshaped dimension")
        return result
    d = varying[-1] if unit == "inner" else varying[0]
    moved = np.moveaxis(grid, d, 0).reshape(out_sizes[d], -1)
    if len(varying) == 1:
        result[d] = moved[:, 0].copy()
    else:  # labels vary along several dims: one unit per index of d (whole heads, or one
        # inner position across all heads); the other dims keep their sizes
        result[d] = np.array([ls.unite_all(row) for row in moved], dtype=np.int64)
        if coarsened is not None:
            coarsened.append(result[d])
    return result


def _combine(ls: LabelSet, parts: Labels) -> np.ndarray:
    """Flat labels of the merged dims ``parts`` (row-major); several real labels are united."""
    if not parts:
        return np.full(1, STATIC, dtype=np.int64)
    if len(parts) == 1:
        return parts[0].copy()
    grids = np.meshgrid(*parts, indexing="ij")
    stacked = np.stack([g.reshape(-1) for g in grids], axis=1)
    flat = stacked.max(axis=1)
    multi = (stacked >= 0).sum(axis=1) > 1
    for row in np.nonzero(multi)[0].tolist():
        flat[row] = ls.unite_all(stacked[row])
    return flat
