"""Checks that turn raw arrays into trustworthy tensors, or fail with one clear DataError.

Every loader funnels its arrays through these helpers so that a bad dataset is caught
where it enters slimkit, with a message that names the array and the offending value,
instead of surfacing later as a cryptic shape error deep inside a training step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimkit.core.errors import DataError

if TYPE_CHECKING:
    from slimkit.data.bundle import DataBundle

ArrayLike = np.ndarray | torch.Tensor
# Below this many test samples one changed prediction moves accuracy by more than 5 points.
FEW_SAMPLES = 20
# Calibration statistics (ranges, importance scores, BatchNorm moments) from fewer samples
# describe those samples, not the data; below this slimkit refuses to calibrate.
MIN_CALIBRATION_SAMPLES = 4


def _as_tensor(a: Any, name: str, where: str = "") -> torch.Tensor:
    """Turn a numpy array (or tensor, or nested list) into a tensor, refusing non-numeric data."""
    if isinstance(a, torch.Tensor):
        return a
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise DataError(
            f"{name}{where} has dtype {arr.dtype} ({_kind_word(arr.dtype.kind)}); "
            "slimkit needs numeric arrays (float inputs, integer labels)."
        )
    return torch.from_numpy(np.ascontiguousarray(arr))


def _kind_word(kind: str) -> str:
    return {"O": "Python objects", "U": "strings", "S": "bytes", "c": "complex numbers",
            "M": "datetimes", "m": "timedeltas", "V": "raw records"}.get(kind, "not numeric")


def check_inputs(x: Any, *, name: str = "x", where: str = "") -> torch.Tensor:
    """Validate one input array and return it as float32 (features) or int64 (token ids).

    Floating and boolean inputs become float32; integer inputs are kept as int64 token ids.

    Args:
        x: array of shape ``(N, ...)`` with at least one feature dimension.
        name: what to call the array in error messages (``x``, ``x_test``).
        where: optional suffix naming the source, e.g. ``" in data.npz"``.

    Returns:
        The validated tensor.

    Raises:
        DataError: non-numeric dtype, no feature dimension, empty, or NaN/Inf values.

    Example:
        >>> check_inputs(np.zeros((4, 3))).dtype
        torch.float32
    """
    t = _as_tensor(x, name, where)
    if t.ndim < 2:
        raise DataError(
            f"{name}{where} has shape {tuple(t.shape)}; it needs a sample dimension and at least "
            f"one feature dimension, e.g. reshape it to ({len(t) if t.ndim else 1}, -1)."
        )
    if t.shape[0] == 0:
        raise DataError(f"{name}{where} is empty (0 samples); the dataset needs at least one.")
    if t[0].numel() == 0:
        raise DataError(f"{name}{where} has shape {tuple(t.shape)}: each sample has no features.")
    if t.is_floating_point() or t.dtype == torch.bool:
        t = t.to(torch.float32)
        _check_finite(t, name, where)
    else:
        t = t.to(torch.int64)
    return t


def _check_finite(t: torch.Tensor, name: str, where: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(bad.sum()) - n_nan
        first = int(bad.reshape(len(t), -1).any(dim=1).nonzero()[0])
        raise DataError(
            f"{name}{where} contains {n_nan} NaN and {n_inf} Inf values (first in sample {first}); "
            "remove or impute them before compressing."
        )


def check_labels(y: Any, *, name: str = "y", where: str = "",
                 num_classes: int | None = None) -> torch.Tensor:
    """Validate class labels and return them as a 1-D int64 tensor.

    Float labels are accepted when every value is a whole number (``3.0``), because
    many tools save labels as floats; anything else names the first bad value.

    Args:
        y: 1-D array of class indices.
        name: what to call the array in error messages (``y``, ``y_test``).
        where: optional suffix naming the source.
        num_classes: when given, every label must lie in ``[0, num_classes)``.

    Returns:
        The labels as int64.

    Raises:
        DataError: not 1-D, not numeric, non-integer, negative, or out of range.

    Example:
        >>> check_labels(np.array([0.0, 2.0, 1.0])).tolist()
        [0, 2, 1]
    """
    t = _as_tensor(y, name, where)
    if t.ndim != 1:
        hint = " If it is one-hot, use y.argmax(axis=1)." if t.ndim == 2 and t.shape[1] > 1 else ""
        raise DataError(
            f"{name}{where} must be a 1-D array of integer class labels, got shape "
            f"{tuple(t.shape)}.{hint}"
        )
    if t.dtype == torch.bool:
        t = t.to(torch.int64)
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != torch.round(t))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise DataError(
                f"{name}{where} must hold integer class labels; label {t[i].item()} at index {i} "
                "is not a whole number."
            )
    t = t.to(torch.int64)
    if len(t) and int(t.min()) < 0:
        i = int((t < 0).nonzero()[0])
        raise DataError(
            f"{name}{where} has negative label {int(t[i])} at index {i}; labels must be "
            "class indices 0, 1, 2, ..."
        )
    if num_classes is not None:
        check_label_range(t, num_classes, name=name, where=where)
    return t


def check_label_range(y: torch.Tensor, num_classes: int, *, name: str = "y",
                      where: str = "") -> None:
    """Raise DataError naming the first label outside ``[0, num_classes)``."""
    if num_classes < 1:
        raise DataError(f"num_classes must be at least 1, got {num_classes}.")
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise DataError(
            f"{name}{where} has label {int(y[i])} at index {i}, outside [0, {num_classes}) "
            f"declared by num_classes={num_classes}."
        )


def check_pair(x: torch.Tensor, y: torch.Tensor, *, names: tuple[str, str] = ("x", "y"),
               where: str = "") -> None:
    """Raise DataError when inputs and labels hold a different number of samples."""
    if len(x) != len(y):
        raise DataError(
            f"{names[0]} has {len(x)} samples but {names[1]} has {len(y)} labels{where}; "
            "they must match one to one."
        )


def check_same_features(x: torch.Tensor, x_test: torch.Tensor, *, where: str = "") -> None:
    """Raise DataError when train and test samples differ in shape or kind."""
    if x.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"x_test{where} samples have shape {tuple(x_test.shape[1:])} but x samples have "
            f"{tuple(x.shape[1:])}; train and test must share one sample shape."
        )
    if x.is_floating_point() != x_test.is_floating_point():
        raise DataError(
            f"x{where} is {x.dtype} but x_test is {x_test.dtype}; both must be float features "
            "or both integer token ids."
        )


def infer_num_classes(*labels: torch.Tensor, declared: int | None = None) -> int:
    """Number of classes: ``max label + 1`` over all splits, or the declared count.

    Raises:
        DataError: a label does not fit the declared count.
    """
    found = max(int(y.max()) for y in labels if len(y)) + 1
    if declared is None:
        return found
    for y, name in zip(labels, ("y", "y_test"), strict=False):
        check_label_range(y, declared, name=name)
    return declared


def data_warnings(bundle: DataBundle) -> list[str]:
    """Reasons a dataset cannot support an accuracy claim; empty when it can.

    A single class makes accuracy blind to confusions between classes; a handful of test
    samples makes it move in steps too coarse to judge a target. Such data still loads (a
    smoke test may want it); the caller shows these lines and records them.

    Example:
        >>> data_warnings(build_bundle("t", np.zeros((40, 2)), [0] * 40))  # doctest: +SKIP
        ["data 't' holds a single class (label 0): ..."]
    """
    out = []
    labels = torch.cat([bundle.y_train, bundle.y_test])
    classes = torch.unique(labels).tolist()
    test_classes = torch.unique(bundle.y_test).tolist()
    if len(classes) == 1:
        out.append(f"data '{bundle.name}' holds a single class (label {classes[0]}): accuracy "
                   "on it cannot show whether the model still tells classes apart; add "
                   "samples of the other classes")
    elif len(test_classes) == 1:
        out.append(f"the test split of '{bundle.name}' holds a single class (label "
                   f"{test_classes[0]}) of {len(classes)}: accuracy is judged on that class "
                   "alone; give a test split with every class")
    n_test, n_train = len(bundle.y_test), len(bundle.y_train)
    if n_test < FEW_SAMPLES:
        out.append(f"data '{bundle.name}' has only {n_test} test sample(s): one changed "
                   f"prediction moves accuracy by {100 / max(n_test, 1):.3g} points, too coarse "
                   f"to judge an accuracy target; use at least {FEW_SAMPLES} (better hundreds)")
    if n_train < FEW_SAMPLES:
        out.append(f"data '{bundle.name}' has only {n_train} training sample(s): fine-tuning or "
                   f"calibrating on so few fits those samples, not the data; use at least "
                   f"{FEW_SAMPLES}")
    return out
