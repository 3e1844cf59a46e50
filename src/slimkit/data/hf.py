"""Hugging Face datasets saved with ``save_to_disk`` (``datasets`` is imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimkit.core.errors import DataError
from slimkit.data.assemble import build_bundle
from slimkit.data.bundle import DataBundle
from slimkit.data.deps import require

# Files that ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write at the top level.
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
INPUT_COLUMNS = ("pixel_values", "image", "x", "input_ids")
LABEL_COLUMNS = ("label", "labels", "y")


def is_hf_dataset_dir(path: Path) -> bool:
    """True when ``path`` looks like a directory written by ``save_to_disk``."""
    return path.is_dir() and any((path / m).is_file() for m in HF_MARKERS)


def _pick(columns: list[str], wanted: tuple[str, ...], role: str, path: Path) -> str:
    for name in wanted:
        if name in columns:
            return name
    raise DataError(f"the dataset at {path} has no {role} column; expected one of "
                    f"{list(wanted)}, found {columns}. Rename the column to one of those.")


def _stack(rows: list[Any], column: str, path: Path) -> np.ndarray:
    """Stack per-row values into one array, naming the first row whose shape differs."""
    arrays = [np.asarray(r) for r in rows]
    if not arrays:
        raise DataError(f"column '{column}' of the dataset at {path} is empty.")
    first = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != first:
            hint = " (pad or truncate token ids to one length)" if column == "input_ids" else ""
            raise DataError(f"column '{column}' of the dataset at {path}: row {i} has shape "
                            f"{a.shape} but row 0 has {first}; all rows must match{hint}.")
    return np.stack(arrays)


def _columns(ds: Any, path: Path) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Inputs and labels of one split, with the column names used."""
    columns = list(ds.column_names)
    x_col = _pick(columns, INPUT_COLUMNS, "input", path)
    y_col = _pick(columns, LABEL_COLUMNS, "label", path)
    x = _stack(list(ds[x_col]), x_col, path)
    if x_col == "image":
        # Decoded PIL images arrive as (H, W) or (H, W, C) uint8; models want (C, H, W) in [0, 1].
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        x = x.astype(np.float32) / 255.0
    y = np.asarray(ds[y_col])
    return x, y, x_col, y_col


def _class_names(ds: Any, y_col: str) -> list[str] | None:
    feature = getattr(ds, "features", {}).get(y_col)
    names = getattr(feature, "names", None)
    return list(names) if names else None


def load_hf_dataset(path: Path, *, seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """Load a dataset written by ``datasets`` ``save_to_disk``.

    Input column: the first of ``pixel_values``, ``image``, ``x``, ``input_ids``; label
    column: the first of ``label``, ``labels``, ``y``. A DatasetDict with ``train`` and
    ``test`` splits is used as given; otherwise the (single or ``train``) split is split
    by ``seed``, stratified by class.

    Raises:
        DataError: ``datasets`` missing, no usable split or column, ragged rows, or any
            validation failure.
    """
    hf = require("datasets", extra="hf", needed_for=f"the Hugging Face dataset at {path}")
    try:
        # load_from_disk reads Arrow files and JSON only: unlike load_dataset it has no
        # loading-script path and no trust_remote_code parameter, so no dataset code can run.
        loaded = hf.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise DataError(f"cannot load the Hugging Face dataset at {path}: {exc}") from exc
    meta: dict = {"source": "huggingface load_from_disk", "path": str(path)}
    if isinstance(loaded, hf.DatasetDict):
        splits = list(loaded.keys())
        if "train" in splits and "test" in splits:
            train, test = loaded["train"], loaded["test"]
        elif "train" in splits or len(splits) == 1:
            train, test = loaded["train" if "train" in splits else splits[0]], None
        else:
            raise DataError(f"the DatasetDict at {path} has splits {splits}; slimkit needs "
                            "'train' (and optionally 'test') or a single split.")
    else:
        train, test = loaded, None
    x, y, x_col, y_col = _columns(train, path)
    x_test = y_test = None
    if test is not None:
        x_test, y_test, _, _ = _columns(test, path)
    meta.update(input_column=x_col, label_column=y_col)
    names = _class_names(train, y_col)
    if names:
        meta["class_names"] = names
    bundle = build_bundle(str(path), x, y, x_test, y_test, seed=seed,
                          test_fraction=test_fraction, meta=meta, where=f" in {path}")
    if names and len(names) > bundle.num_classes:
        # A ClassLabel feature declares classes that may be absent from the data.
        bundle.num_classes = len(names)
    return bundle
