"""Turn validated arrays into a DataBundle: one path shared by every loader."""

from __future__ import annotations

from typing import Any

import torch

from slimkit.core.errors import DataError
from slimkit.data.bundle import DataBundle
from slimkit.data.split import split_indices
from slimkit.data.validate import (
    check_inputs,
    check_labels,
    check_pair,
    check_same_features,
    data_warnings,
    infer_num_classes,
)


def build_bundle(name: str, x: Any, y: Any, x_test: Any = None, y_test: Any = None, *,
                 seed: int = 0, test_fraction: float = 0.2, meta: dict | None = None,
                 where: str = "") -> DataBundle:
    """Validate ``(x, y)`` (and the test split if given) and pack them into a DataBundle.

    Without ``x_test``/``y_test`` the data is split here, stratified by class and
    determined by ``seed``; with them, they are used as given.

    Args:
        name: the bundle's name (the spec it was loaded from).
        x, y: training inputs and labels (numpy arrays or tensors).
        x_test, y_test: an optional given test split; both or neither.
        seed, test_fraction: how to split when no test split is given.
        meta: facts for the report; split details are added to a copy.
        where: suffix for error messages naming the source, e.g. ``" in data.npz"``.

    Returns:
        The bundle; ``meta["warnings"]`` lists why the data cannot support an accuracy claim
        (a single class, too few samples), when it cannot (see :func:`data_warnings`).

    Raises:
        DataError: any validation failure, naming the array and the value.
    """
    meta = dict(meta or {})
    xt = check_inputs(x, name="x", where=where)
    yt = check_labels(y, name="y", where=where)
    check_pair(xt, yt, names=("x", "y"), where=where)
    if x_test is None and y_test is None:
        train, test = split_indices(yt, test_fraction, seed)
        tr, te = torch.from_numpy(train), torch.from_numpy(test)
        x_tr, y_tr, x_te, y_te = xt[tr], yt[tr], xt[te], yt[te]
        meta.update(split="stratified", split_seed=seed, test_fraction=test_fraction)
    else:
        if x_test is None or y_test is None:
            missing, given = ("x_test", "y_test") if x_test is None else ("y_test", "x_test")
            raise DataError(f"{given}{where} is given without {missing}; provide both or neither.")
        x_tr, y_tr = xt, yt
        x_te = check_inputs(x_test, name="x_test", where=where)
        y_te = check_labels(y_test, name="y_test", where=where)
        check_pair(x_te, y_te, names=("x_test", "y_test"), where=where)
        check_same_features(x_tr, x_te, where=where)
        meta.setdefault("split", "given")
    bundle = DataBundle(name=name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                        num_classes=infer_num_classes(y_tr, y_te), meta=meta)
    warnings = data_warnings(bundle)
    if warnings:
        bundle.meta["warnings"] = warnings
    return bundle

