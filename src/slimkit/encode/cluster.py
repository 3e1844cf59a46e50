"""Weight sharing: k-means per layer, then fine-tuning of the shared centroids.

Plan, then apply: the plan holds each layer's centroids (JSON floats, exact float32 values);
applying it replaces every non-zero weight by its nearest centroid, so replaying a saved plan
on a fresh copy of the same (pruned) model gives the same weights. Zeros, the pruned
positions, are never clustered and stay exactly zero.

Fine-tuning (Han et al. 2016, section 3.3) trains the centroids, not the weights: each
clustered layer gets a parametrization ``weight = where(mask, centroids[indices], 0)``, so
autograd sums the gradients of all weights of a cluster into that cluster's centroid -- the
paper's ``dL/dC_k = sum_{i,j} dL/dW_ij 1(I_ij = k)`` -- and pruned positions get no gradient.
The parametrization is removed afterwards, leaving plain modules whose weights hold the shared
values, so export, measurement and artifacts keep working.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.data.bundle import DataBundle
from slimkit.distill.run import finetune
from slimkit.encode.config import EncodeConfig
from slimkit.encode.kmeans import assign_nearest, kmeans_1d
from slimkit.graph.select import select_layers


def _round_codebook(values: np.ndarray, dtype: str) -> np.ndarray:
    """Centroids as the exact values the file will store (float32, or float16 when asked)."""
    stored = np.float16 if dtype == "float16" else np.float32
    return np.unique(np.asarray(values, dtype=stored).astype(np.float32))


def plan_layer(weight: torch.Tensor, bits: int, dtype: str = "float32",
               max_iter: int = 100) -> dict:
    """Cluster one weight tensor's non-zero values into at most ``2^bits`` shared values.

    A tensor that already holds at most ``2^bits`` distinct non-zero values (a model clustered
    before) keeps exactly those values, so clustering twice is the identity.

    Returns:
        ``{"bits", "centroids": [ascending floats, all used], "iterations"}``.
    """
    w = weight.detach().cpu().double().flatten().numpy()
    nz = w[w != 0]
    k = 2**bits
    distinct = np.unique(nz)
    if len(distinct) <= k:
        centroids, iterations = distinct, 0
    else:
        centroids, _, iterations = kmeans_1d(nz, k, max_iter=max_iter)
    stored = _round_codebook(centroids, dtype)
    stored = stored[stored != 0]
    used = np.unique(assign_nearest(nz, stored)) if len(nz) and len(stored) else []
    return {"bits": bits, "centroids": [float(c) for c in stored[used]],
            "iterations": iterations}


def plan_clusters(model: nn.Module, cfg: EncodeConfig) -> tuple[dict, list[dict]]:
    """The plan ``{"layers": {name: plan_layer(...)}}`` and the skipped layers.

    Raises:
        ConfigError: no layer of ``cfg.layer_types`` is left after include/exclude.
    """
    layers, skipped = select_layers(model, cfg.layer_types, cfg.include, cfg.exclude)
    if not layers:
        raise ConfigError(f"encode: no layer of types {cfg.layer_types} to cluster after "
                          "include/exclude")
    plan: dict[str, dict] = {}
    for name, module in layers.items():
        if not torch.count_nonzero(module.weight):
            skipped.append({"what": name, "why": "every weight is zero"})
            continue
        bits, _ = cfg.bits_for(type(module).__name__)
        plan[name] = plan_layer(module.weight, bits, cfg.codebook_dtype, cfg.max_iter)
    return {"layers": plan}, skipped


def apply_clusters_to(weight: torch.Tensor, layer: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the non-zero entries of ``weight`` by their nearest planned centroid, in place.

    Returns:
        ``(indices int64, mask bool)`` shaped like ``weight``; ``indices`` is 0 where ``mask``
        (the non-zero positions) is False.
    """
    with torch.no_grad():
        centroids = torch.tensor(layer["centroids"], dtype=torch.float32, device=weight.device)
        mask = weight != 0
        idx = torch.zeros(weight.shape, dtype=torch.int64, device=weight.device)
        if centroids.numel():
            nearest = assign_nearest(weight[mask].double().cpu().numpy(),
                                     centroids.double().cpu().numpy())
            idx[mask] = torch.from_numpy(nearest).to(weight.device)
            weight.copy_(torch.where(mask, centroids[idx], torch.zeros((), dtype=weight.dtype)))
    return idx, mask


def apply_clusters(model: nn.Module, plan: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Apply a plan from :func:`plan_clusters` to ``model``'s layers, in place.

    Returns:
        ``{name: (indices, mask)}`` as :func:`apply_clusters_to` gives them.
    """
    modules = dict(model.named_modules())
    return {name: apply_clusters_to(modules[name].weight, layer)
            for name, layer in plan["layers"].items()}


class SharedWeight(nn.Module):
    """Parametrization ``centroids -> where(mask, centroids[indices], 0)``.

    Registered on a layer's ``weight`` it makes the centroids the trained parameter: the
    gather's backward sums the weight gradients of each cluster into its centroid.

    Args:
        indices: cluster index per weight position (any value where ``mask`` is False).
        mask: True at the non-zero (kept) positions.
        k: number of centroids.
    """

    def __init__(self, indices: torch.Tensor, mask: torch.Tensor, k: int) -> None:
        super().__init__()
        self.register_buffer("indices", indices.clone())
        self.register_buffer("mask", mask.clone())
        self.k = k

    def forward(self, centroids: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, centroids[self.indices], centroids.new_zeros(()))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The centroids of a weight that already holds the shared values."""
        centroids = weight.new_zeros(self.k)
        centroids[self.indices[self.mask]] = weight[self.mask]
        return centroids


def share_weights(model: nn.Module, assignments: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  ) -> None:
    """Parametrize each assigned layer's weight by its centroids (see :class:`SharedWeight`)."""
    modules = dict(model.named_modules())
    for name, (idx, mask) in assignments.items():
        k = int(idx[mask].max()) + 1 if bool(mask.any()) else 1
        parametrize.register_parametrization(modules[name], "weight",
                                             SharedWeight(idx, mask, k), unsafe=True)


def unshare_weights(model: nn.Module, names: list[str], dtype: str = "float32") -> None:
    """Bake the shared values into plain weights (rounding centroids to ``dtype``)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            original = modules[name].parametrizations.weight.original
            if dtype == "float16":
                original.copy_(original.half().float())
            parametrize.remove_parametrizations(modules[name], "weight",
                                                leave_parametrized=True)
            # Removal re-registers ``weight`` last; put it back first (as Linear/Conv define
            # it) so state_dict order, and so every file written from it, stays the same.
            params = modules[name]._parameters
            for key in [k for k in params if k != "weight"]:
                params[key] = params.pop(key)


def cluster_weights(model: nn.Module, cfg: EncodeConfig, data: DataBundle | None = None,
                    teacher: nn.Module | None = None,
                    progress: bool = False) -> tuple[nn.Module, Record]:
    """Share weights in a copy of ``model``: k-means per layer, then optional fine-tuning.

    Args:
        model: any module with Linear/Conv layers (pruned or not); left untouched.
        cfg: the encode config (bits per layer type, selectors, fine-tuning).
        data: needed only when ``cfg.finetune`` is set.
        teacher: for ``finetune.distill``; defaults to ``model``.

    Returns:
        The clustered copy (plain modules whose weights take at most ``2^bits`` non-zero
        values per layer) and a Record with the plan and per-layer cluster counts.

    Raises:
        ConfigError: fine-tuning without data, or no layer to cluster.

    Example:
        >>> clustered, rec = cluster_weights(net, EncodeConfig(fc_bits=4))  # doctest: +SKIP
    """
    if cfg.finetune is not None and data is None:
        raise ConfigError("encode: finetune needs data (give --data)")
    teacher = model if teacher is None else teacher
    model = copy.deepcopy(model)
    plan, skipped = plan_clusters(model, cfg)
    assignments = apply_clusters(model, plan)
    record = Record(skipped=skipped, details={"plan": plan})
    if cfg.finetune is not None and cfg.finetune.epochs > 0 and assignments:
        share_weights(model, assignments)
        try:
            record.details["finetune"] = finetune(model, data, cfg.finetune, teacher=teacher,
                                                  progress=progress, label="centroids")
        finally:
            unshare_weights(model, list(assignments), cfg.codebook_dtype)
    modules = dict(model.named_modules())
    layers = {}
    for name, layer in plan["layers"].items():
        w = modules[name].weight.detach()
        nz = w[w != 0]
        shared = int(torch.unique(nz).numel())
        layers[name] = {"bits": layer["bits"], "numel": w.numel(), "nonzero": int(nz.numel()),
                        "clusters": shared, "kmeans_iterations": layer["iterations"]}
        record.changed.append(f"{name}: {nz.numel()} non-zero weights share {shared} values "
                              f"({layer['bits']} bits)")
    record.details["layers"] = layers
    return model, record
