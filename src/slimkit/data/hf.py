"""Hugging Face datasets saved with ``save_to_disk`` (``datasets`` is imported lazily).

Array and image columns load into memory as they are; a text column is tokenized with the
model's own tokenizer and streamed batch by batch (:mod:`slimkit.data.text`), read from the
memory-mapped Arrow files only when a batch needs its rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimkit.core.errors import DataError
from slimkit.data.assemble import build_bundle
from slimkit.data.bundle import DataBundle
from slimkit.data.deps import require
from slimkit.data.load import (  # noqa: F401  (re-exported: where they used to live)
    HF_MARKERS,
    INPUT_COLUMNS,
    LABEL_COLUMNS,
    DataOptions,
    ModelHints,
    is_hf_dataset_dir,
)

if TYPE_CHECKING:
    from slimkit.data.stream import StreamData
    from slimkit.data.text import TextRows


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


def _columns(ds: Any, path: Path, label: str | None = None,
             ) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Inputs and labels of one split, with the column names used."""
    columns = list(ds.column_names)
    x_col = _pick(columns, INPUT_COLUMNS, "input", path)
    y_col = _pick(columns, (label,) if label else LABEL_COLUMNS, "label", path)
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


def _text_column(ds: Any, path: Path, options: DataOptions) -> str | None:
    """The text column to tokenize (``options.text_column``, else ``text`` when the dataset
    has no array or image input column), or None."""
    columns = list(ds.column_names)
    name = options.text_column
    if name is None:
        if any(c in columns for c in INPUT_COLUMNS) or "text" not in columns:
            return None
        name = "text"
    if name not in columns:
        from slimkit.data.text import _missing_column

        raise _missing_column(f"the dataset at {path}", "text", name, columns)
    dtype = getattr(getattr(ds, "features", {}).get(name), "dtype", "string")
    if dtype not in ("string", "large_string"):
        raise DataError(f"column '{name}' of the dataset at {path} holds {dtype}, not text; "
                        "choose the text column with --text-column")
    return name


def _text_rows(ds: Any, column: str, label: str | None, name: str) -> TextRows:
    """One split's texts, read from the Arrow files by index when asked."""
    from slimkit.data.text import TextRows

    texts = ds.select_columns([column])

    def strings(values: list, first: int) -> list[str]:
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise DataError(f"row {first + i + 1} of {name}: column '{column}' holds "
                                f"{type(v).__name__} {v!r}, not text")
        return values

    def fetch(idx: np.ndarray) -> list[str]:
        return strings(list(texts[idx.tolist()][column]), 0)

    def chunks() -> Iterator[list[str]]:
        first = 0
        for batch in texts.iter(batch_size=512):
            yield strings(list(batch[column]), first)
            first += len(batch[column])

    labels = None
    if label is not None:
        from slimkit.data.text import _shared

        distinct: dict = {}
        labels = [_shared(distinct, v) for v in ds[label]]
    return TextRows(name, len(ds), labels, fetch, chunks)


def _load_text(path: Path, train: Any, test: Any, column: str, options: DataOptions,
               hints: ModelHints | None, seed: int, test_fraction: float) -> StreamData:
    from slimkit.data.text import _missing_column, _pick_label, _task, load_tokenizer, text_stream

    columns = list(train.column_names)
    label = _pick_label(columns, options)
    if label is not None and label not in columns:
        raise _missing_column(f"the dataset at {path}", "label", label, columns)
    where = f"the dataset at {path}"
    tokenizer = load_tokenizer(hints, str(path))
    _, label = _task(hints, label, options, where, columns)
    rows = _text_rows(train, column, label, f"{where} (train)" if test is not None else where)
    test_rows = None if test is None else _text_rows(test, column, label, f"{where} (test)")
    meta: dict = {"source": "huggingface load_from_disk", "path": str(path),
                  "text_column": column,
                  "tokenizer": str(hints.model_dir) if hints and hints.model_dir else None}
    names = _class_names(train, label) if label else None
    stream = text_stream(str(path), rows, test_rows, tokenizer=tokenizer, options=options,
                         hints=hints, label=label, columns=columns, seed=seed,
                         test_fraction=test_fraction, meta=meta, source=where)
    if names and "class_names" not in stream.meta:
        stream.meta["class_names"] = names
        stream.num_classes = max(stream.num_classes, len(names))
    return stream


def load_hf_dataset(path: Path, *, seed: int = 0, test_fraction: float = 0.2,
                    options: DataOptions | None = None, hints: ModelHints | None = None,
                    ) -> DataBundle | StreamData:
    """Load a dataset written by ``datasets`` ``save_to_disk``.

    Input column: the first of ``pixel_values``, ``image``, ``x``, ``input_ids``, loaded into
    memory; else a text column (``options.text_column``, or ``text``), tokenized with the
    model's tokenizer (``hints``) and streamed (:func:`slimkit.data.text.text_stream`). Label
    column: ``options.label_column``, else the first of ``label``, ``labels``, ``y``. A
    DatasetDict with ``train`` and ``test`` splits is used as given; otherwise the (single
    or ``train``) split is split by ``seed``, stratified by class.

    Raises:
        DataError: ``datasets`` missing, no usable split or column, ragged rows, a text
            column without a tokenizer, or any validation failure.
    """
    options = options or DataOptions()
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
    text = _text_column(train, path, options)
    if text is not None:
        return _load_text(path, train, test, text, options, hints, seed, test_fraction)
    x, y, x_col, y_col = _columns(train, path, options.label_column)
    x_test = y_test = None
    if test is not None:
        x_test, y_test, _, _ = _columns(test, path, options.label_column)
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
