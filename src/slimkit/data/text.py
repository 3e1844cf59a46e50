"""Text data tokenized with the model's own tokenizer, streamed batch by batch.

A ``.jsonl`` file (one JSON object per line) or a ``.csv`` file (a header line, one row per
sample) holds a text column (``text`` unless named) and optionally a label column (``label``,
``labels`` or ``y``). Loading reads the file once, keeping only each row's byte offset and
label (and the token count of each row, to say how many rows the model's maximum length
truncates); batches then read their rows by offset and tokenize them when iterated, padded to
the batch's longest row with an ``attention_mask``. Memory is bounded by the batch, whatever
the file's size. Hugging Face datasets with a text column go the same way (:mod:`.hf`).

The task follows the model: a causal language model learns from the text itself
(``causal_lm``), a bare encoder's embeddings are compared with the uncompressed model's
(``embedding``), and labelled text judges a classifier (``classification``).

Only the torch-free checks (:func:`check_text_file`, :func:`check_tokenizer_dir`) run at
import time cost; the loader imports torch and transformers when it runs.
"""

from __future__ import annotations

import csv
import json
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimkit.core.errors import DataError
from slimkit.data.load import LABEL_COLUMNS, DataOptions, ModelHints

if TYPE_CHECKING:
    from slimkit.data.stream import StreamData

# A directory holds a tokenizer when it has its vocabulary in one of these forms.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
_FORMAT = {".jsonl": "a .jsonl file holds one JSON object per line, e.g. "
                     '{"text": "a sample", "label": 0}',
           ".csv": "a .csv file holds a header line naming its columns (e.g. text,label) and "
                   "one row per sample"}
# Rows tokenized at once while counting lengths.
_CHUNK = 512


# -- reading rows (no torch) ----------------------------------------------------------------

def _decode(line: bytes, n: int, path: Path) -> str:
    try:
        return line.decode("utf-8").lstrip("\ufeff") if n <= 1 else line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"row {max(n, 1)} of '{path}' is not UTF-8 text ({exc.reason} at "
                        f"byte {exc.start}); save the file as UTF-8") from None


def _json_row(line: bytes, n: int, path: Path) -> dict:
    try:
        row = json.loads(_decode(line, n, path))
    except ValueError as exc:
        raise DataError(f"row {n} of '{path}' is not valid JSON: {exc}; {_FORMAT['.jsonl']}"
                        ) from None
    if not isinstance(row, dict):
        raise DataError(f"row {n} of '{path}' is a JSON {type(row).__name__}, not an object; "
                        f"{_FORMAT['.jsonl']}")
    return row


def _csv_reader(f: Any, path: Path, first: int) -> Iterator[list[str]]:
    """CSV records from the binary file ``f`` at its position; a record may span lines
    (quoted newlines), and ``f.tell()`` is where the next one starts."""
    state = {"n": first}

    def lines() -> Iterator[str]:
        while line := f.readline():
            yield _decode(line, state["n"], path)

    reader = csv.reader(lines())
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"row {state['n']} of '{path}' is not valid CSV: {exc}") from None
        state["n"] += 1
        yield record


def _csv_header(f: Any, path: Path) -> list[str]:
    header = next(_csv_reader(f, path, 0), None)
    if not header or not any(h.strip() for h in header):
        raise DataError(f"'{path}' holds no rows; {_FORMAT['.csv']}")
    return [h.strip() for h in header]


def iter_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """``(byte offset, row)`` of every row of a ``.jsonl`` or ``.csv`` file, in order; the
    row maps column names to values (CSV values are strings).

    Raises:
        DataError: a row that is not valid JSON (an object) or CSV, has the wrong number of
            fields, or is not UTF-8, naming the row.
    """
    with open(path, "rb") as f:
        if path.suffix.lower() == ".jsonl":
            n = 0
            while True:
                offset = f.tell()
                line = f.readline()
                if not line:
                    return
                if line.strip():
                    n += 1
                    yield offset, _json_row(line, n, path)
            return
        header = _csv_header(f, path)
        offset = f.tell()
        for n, record in enumerate(_csv_reader(f, path, 1), 1):
            if record:  # a blank line
                yield offset, _csv_row(record, header, n, path)
            offset = f.tell()


def _csv_row(record: list[str], header: list[str], n: int, path: Path) -> dict:
    if len(record) != len(header):
        raise DataError(f"row {n} of '{path}' has {len(record)} fields but the header has "
                        f"{len(header)} ({', '.join(header)}); quote fields that hold commas")
    return dict(zip(header, record, strict=True))


def read_rows(path: Path, offsets: Sequence[int]) -> list[dict]:
    """The rows starting at ``offsets`` (from :func:`iter_rows`), read in file order and
    returned in the order asked."""
    order = sorted(range(len(offsets)), key=lambda i: offsets[i])
    rows: list[dict] = [{}] * len(offsets)
    with open(path, "rb") as f:
        header = _csv_header(f, path) if path.suffix.lower() == ".csv" else None
        for i in order:
            f.seek(int(offsets[i]))
            if header is None:
                rows[i] = _json_row(f.readline(), 0, path)
            else:
                record = next(_csv_reader(f, path, 0), None) or []
                rows[i] = _csv_row(record, header, 0, path)
    return rows


def _columns(path: Path, first: dict | None) -> list[str]:
    if path.suffix.lower() == ".csv":
        with open(path, "rb") as f:
            return _csv_header(f, path)
    return list(first or ())


def _pick_label(columns: Sequence[str], options: DataOptions) -> str | None:
    if options.label_column is not None:
        return options.label_column
    return next((c for c in LABEL_COLUMNS if c in columns), None)


def _missing_column(where: str, role: str, name: str, columns: Sequence[str]) -> DataError:
    return DataError(f"{where} has no {role} column '{name}'; its columns are: "
                     f"{', '.join(map(str, columns)) or 'none'}. Choose the {role} column with "
                     f"--{role}-column")


def check_text_file(path: Path, options: DataOptions) -> None:
    """Check a text file's first row without torch: it has one, with the text column (and
    the label column, when named).

    Raises:
        DataError: no rows, or a column that is not there (listing the columns).
    """
    first = next(iter_rows(path), None)
    if first is None:
        raise DataError(f"'{path}' holds no rows; {_FORMAT[path.suffix.lower()]}")
    columns = _columns(path, first[1])
    text = options.text_column or "text"
    for role, name in (("text", text), ("label", options.label_column)):
        if name is not None and name not in columns:
            raise _missing_column(f"'{path}'", role, name, columns)


def check_tokenizer_dir(model_dir: Path | None, model: str | None, data: str) -> None:
    """Raise a DataError unless ``model_dir`` holds tokenizer files (no torch).

    Text is tokenized with the model's own tokenizer, read from the model's directory.
    """
    if model_dir is None and model is None:
        raise DataError(f"text data '{data}' is tokenized with the model's own tokenizer; give "
                        "the model's hints (load_data(..., hints=model_hints(model, "
                        "model_dir))) or a tokenizer (ModelHints(tokenizer=...))")
    if model_dir is None:
        raise DataError(f"text data '{data}' is tokenized with the model's own tokenizer, and "
                        f"'{model}' is not a model directory that could hold one; give a "
                        "Hugging Face model directory with its tokenizer files, or token ids "
                        "(an .npz, or a Hugging Face dataset with an input_ids column)")
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(f"the model directory '{model_dir}' holds no tokenizer (none of "
                        f"{', '.join(TOKENIZER_FILES)}), and text data '{data}' is tokenized "
                        "with the model's own tokenizer; save it there with "
                        f"tokenizer.save_pretrained('{model_dir}'), or give token ids (an .npz, "
                        "or a Hugging Face dataset with an input_ids column)")


# -- tokenizing -----------------------------------------------------------------------------

def load_tokenizer(hints: ModelHints | None, data: str) -> Any:
    """The model's tokenizer: ``hints.tokenizer``, or the one saved in ``hints.model_dir``
    (read offline, never running the directory's code).

    Raises:
        DataError: no model, no tokenizer files, or files transformers cannot read.
    """
    if hints is not None and hints.tokenizer is not None:
        return hints.tokenizer
    check_tokenizer_dir(hints.model_dir if hints is not None else None,
                        hints.name if hints is not None else None, data)
    from slimkit.data.deps import require

    transformers = require("transformers", extra="hf", needed_for=f"text data '{data}'")
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(hints.model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load the tokenizer in '{hints.model_dir}': {first}; save it "
                        f"again with tokenizer.save_pretrained('{hints.model_dir}')") from None


class Tokenize:
    """Texts to the model's named inputs: truncated to ``max_length``, padded to the
    longest text of the batch, int64, ``attention_mask`` included."""

    def __init__(self, tokenizer: Any, max_length: int, input_names: Sequence[str] | None,
                 model: str) -> None:
        if getattr(tokenizer, "pad_token", None) is None:
            if getattr(tokenizer, "eos_token", None) is None:
                raise DataError(f"the tokenizer of '{model}' has no padding token and no "
                                "end-of-text token to pad with; set tokenizer.pad_token and "
                                "save it again")
            tokenizer.pad_token = tokenizer.eos_token  # what causal LMs pad with (masked)
        produced = list(tokenizer(["a"], truncation=True, max_length=max_length).keys())
        names = list(input_names) if input_names else produced
        missing = [n for n in names if n not in produced and n != "token_type_ids"]
        if missing:
            raise DataError(f"'{model}' takes input(s) {', '.join(missing)}, which its "
                            f"tokenizer does not produce (it gives {', '.join(produced)})")
        self.tokenizer, self.max_length, self.names = tokenizer, max_length, names

    def lengths(self, texts: list[str]) -> list[int]:
        """Tokens per text without truncation (special tokens included)."""
        ids = self.tokenizer(texts, truncation=False, verbose=False,
                             return_attention_mask=False, return_token_type_ids=False)
        return [len(t) for t in ids["input_ids"]]

    def __call__(self, texts: list[str]) -> dict:
        import torch

        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                             padding="longest", return_tensors="np")
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        return {n: torch.from_numpy(np.asarray(enc[n], dtype=np.int64) if n in enc
                                    else np.zeros_like(ids)) for n in self.names}


def resolve_max_length(tokenizer: Any, options: DataOptions, hints: ModelHints | None,
                       ) -> tuple[int, str]:
    """``(maximum tokens, where it comes from)``: ``--max-length`` when given (at most the
    model's), else the model's position limit and its tokenizer's, else 512."""
    limits = [v for v in ((hints.max_length if hints else None),
                          getattr(tokenizer, "model_max_length", None))
              if isinstance(v, int) and 0 < v < 1_000_000]
    model_max = min(limits) if limits else None
    if options.max_length is not None:
        if model_max is not None and options.max_length > model_max:
            raise DataError(f"--max-length {options.max_length} is more than the model's "
                            f"maximum of {model_max} tokens; give at most {model_max}")
        return options.max_length, "--max-length"
    if model_max is None:
        return 512, "the default, as neither the model nor its tokenizer says"
    return model_max, "the model's maximum"


# -- rows to a stream -----------------------------------------------------------------------

@dataclass
class TextRows:
    """One split's rows: how many, their raw labels, and how to read their texts.

    Attributes:
        name: the source for messages (``'data.jsonl'``, ``the dataset at P``).
        n: number of rows.
        labels: the raw label of each row (None: unlabelled).
        fetch: texts of the rows at the given indices, in that order.
        chunks: the texts of every row in order, in chunks (for counting lengths).
    """

    name: str
    n: int
    labels: list | None
    fetch: Callable[[np.ndarray], list[str]]
    chunks: Callable[[], Iterable[list[str]]]


def file_rows(path: Path, options: DataOptions, label: str | None) -> TextRows:
    """Scan a text file once: the byte offset and label of each row, every row checked."""
    text = options.text_column or "text"
    offsets = array("q")  # 8 bytes a row; the labels share one object per distinct value
    labels: list | None = [] if label is not None else None
    distinct: dict = {}
    for n, (offset, row) in enumerate(iter_rows(path), 1):
        for role, name in (("text", text), ("label", label)):
            if name is not None and name not in row:
                if n == 1:
                    raise _missing_column(f"'{path}'", role, name, list(row))
                raise DataError(f"row {n} of '{path}' has no '{name}' field (the {role} "
                                "column); every row needs one")
        if not isinstance(row[text], str):
            raise DataError(f"row {n} of '{path}': column '{text}' holds "
                            f"{type(row[text]).__name__} {row[text]!r}, not text")
        offsets.append(offset)
        if labels is not None:
            labels.append(_shared(distinct, row[label]))
    if not offsets:
        raise DataError(f"'{path}' holds no rows; {_FORMAT[path.suffix.lower()]}")
    starts = np.frombuffer(offsets, dtype=np.int64)

    def fetch(idx: np.ndarray) -> list[str]:
        return [r[text] for r in read_rows(path, starts[idx].tolist())]

    def chunks() -> Iterator[list[str]]:
        texts: list[str] = []
        for _, row in iter_rows(path):
            texts.append(row[text])
            if len(texts) == _CHUNK:
                yield texts
                texts = []
        if texts:
            yield texts

    return TextRows(f"'{path}'", len(starts), labels, fetch, chunks)


def _shared(distinct: dict, value: Any) -> Any:
    """``value``, or the equal one seen before (so that a million rows of a few class names
    hold a few strings); unhashable values (JSON lists) as they are, refused later."""
    try:
        return distinct.setdefault((type(value), value), value)
    except TypeError:
        return value


def label_indices(raw: list, label2id: dict[str, int] | None, where: str,
                  ) -> tuple[np.ndarray, list[str] | None]:
    """Class indices of raw labels, and the class names when the labels are names.

    Integers (or integer strings, as CSV holds them) are indices as they are; names map
    through the model's ``label2id`` when it has every one, else to their sorted order.

    Raises:
        DataError: an empty, negative, fractional or mixed label, naming its row.
    """
    ints: list[int] = []
    for i, v in enumerate(raw):
        if isinstance(v, bool) or v is None or (isinstance(v, str) and not v.strip()):
            raise DataError(f"row {i + 1} of {where} has label {v!r}; every row needs a class "
                            "label (an integer index or a class name)")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        if not isinstance(v, int):
            break
        if v < 0:
            raise DataError(f"row {i + 1} of {where} has label {v}; labels must be class "
                            "indices 0, 1, 2, ... or class names")
        ints.append(v)
    else:
        return np.asarray(ints, dtype=np.int64), None
    if not all(isinstance(v, str) for v in raw):
        bad = next(i for i, v in enumerate(raw) if not isinstance(v, str))
        raise DataError(f"{where} mixes class names and numbers (row {bad + 1}: "
                        f"{raw[bad]!r}); give every label as a name or every one as an index")
    names = sorted({v.strip() for v in raw})
    if label2id and all(n in label2id for n in names):
        index = label2id
        names = [n for n, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
    else:
        index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[v.strip()] for v in raw], dtype=np.int64), names


def _task(hints: ModelHints | None, label: str | None, options: DataOptions, data: str,
          columns: Sequence[str]) -> tuple[str, str | None]:
    """``(task, label column used)``, by what the model is."""
    kind = hints.kind if hints else None
    model = hints.name if hints else "the model"
    if kind in ("causal_lm", "encoder"):
        if options.label_column is not None:
            what = ("a causal language model, which learns from the text itself"
                    if kind == "causal_lm" else "a bare encoder without a classification "
                    "head, whose embeddings are compared with the uncompressed model's")
            raise DataError(f"--label-column: '{model}' is {what}; drop --label-column")
        return ("causal_lm" if kind == "causal_lm" else "embedding"), None
    if label is not None:
        return "classification", label
    if kind == "classifier":
        raise DataError(f"'{model}' is a classifier, but {data} has no label column ("
                        f"{', '.join(LABEL_COLUMNS)}; its columns are: {', '.join(columns)}); "
                        "name it with --label-column")
    return "embedding", None


def _count_long(rows: Sequence[TextRows], tok: Tokenize, source: str, why: str,
                options: DataOptions) -> tuple[int, str | None]:
    """Count the rows longer than the maximum: ``(count, warning)``, the warning None when
    there are none; a DataError when truncation is refused."""
    over = total = 0
    longest: tuple[int, int, str] = (0, 0, "")
    for part in rows:
        row = 0
        for texts in part.chunks():
            for length in tok.lengths(texts):
                row += 1
                if length > tok.max_length:
                    over += 1
                    if length > longest[0]:
                        longest = (length, row, part.name)
        total += part.n
    if not over:
        return 0, None
    where = f"row {longest[1]}" + (f" of {longest[2]}" if len(rows) > 1 else "")
    head = (f"{over} of {total} rows of {source} are longer than {tok.max_length} tokens "
            f"({why}; the longest: {where}, {longest[0]} tokens)")
    if not options.truncate:
        raise DataError(f"{head}; shorten them, or let slimkit truncate them (drop "
                        "--no-truncate)")
    return over, (f"{head}, and are truncated to {tok.max_length}; pass --no-truncate to "
                  "refuse them")


def text_stream(name: str, train: TextRows, test: TextRows | None, *, tokenizer: Any,
                options: DataOptions, hints: ModelHints | None, label: str | None,
                columns: Sequence[str], seed: int, test_fraction: float,
                meta: dict, source: str | None = None) -> StreamData:
    """Rows of one or two splits as a StreamData of tokenized batches.

    Without ``test`` the rows are split by :func:`~slimkit.data.split.split_indices`
    (stratified by label, seeded), as in-memory data is. The training split is read in a
    seeded shuffled order (so that its first rows, which calibration takes, mix classes);
    the validation split is a fixed 20% of it (class-stratified, seed 0), as a DataBundle's.
    ``source`` names the data in messages (default: ``name``, quoted).
    """
    from slimkit.data.stream import StreamData
    from slimkit.data.user import label_warnings, stream_splits

    source = source or f"'{name}'"
    task, label = _task(hints, label, options, source, columns)
    max_length, why = resolve_max_length(tokenizer, options, hints)
    tok = Tokenize(tokenizer, max_length, hints.input_names if hints else None,
                   hints.name if hints else "the model")
    over, warning = _count_long([train] if test is None else [train, test], tok, source, why,
                                options)
    y = names = None
    if label is not None:
        raw = list(train.labels or []) + (list(test.labels or []) if test else [])
        y, names = label_indices(raw, hints.label2id if hints else None, source)
    y_train = y[:train.n] if y is not None else None
    if test is None:
        order, te, val = stream_splits(y_train, train.n, seed, test_fraction)
        test_rows, y_test = train, y_train
        meta.update(split="stratified" if y is not None else "random", split_seed=seed,
                    test_fraction=test_fraction)
    else:
        order, _, val = stream_splits(y_train, train.n, seed, None)
        te, test_rows, y_test = np.arange(test.n), test, (y[train.n:] if y is not None else None)
        meta.setdefault("split", "given")
    bs = options.batch_size

    def batches(rows: TextRows, index: np.ndarray, labels: np.ndarray | None) -> _TextBatches:
        return _TextBatches(rows, index, labels, tok, bs)

    meta.update(task=task, max_length=max_length, max_length_from=why, n_train=len(order),
                n_test=len(te), label_column=label, input_names=tok.names,
                train_order=f"shuffled by seed {seed}")
    if names:
        meta["class_names"] = names
    meta["truncated_rows"] = over
    if y is not None:
        meta.setdefault("warnings", []).extend(label_warnings(name, y_train[order], y_test[te]))
    if warning:
        meta.setdefault("warnings", []).append(warning)
    num = int(max(int(y.max()) + 1, len(names or ()))) if y is not None else 0
    return StreamData(name, train=batches(train, order, y_train),
                      test=batches(test_rows, te, y_test), val=batches(train, val, y_train),
                      task=task, num_classes=num, length=-(-len(order) // bs), meta=meta)


class _TextBatches:
    """Re-iterable batches of some rows: read and tokenized when iterated, one batch held."""

    def __init__(self, rows: TextRows, index: np.ndarray, labels: np.ndarray | None,
                 tokenize: Tokenize, batch_size: int) -> None:
        self.rows, self.index, self.labels = rows, np.asarray(index, np.int64), labels
        self.tokenize, self.batch_size = tokenize, batch_size

    def __iter__(self) -> Iterator[Any]:
        import torch

        for lo in range(0, len(self.index), self.batch_size):
            idx = self.index[lo:lo + self.batch_size]
            x = self.tokenize(self.rows.fetch(idx))
            yield x if self.labels is None else (x, torch.from_numpy(self.labels[idx]))


def load_text_file(path: Path, *, seed: int = 0, test_fraction: float = 0.2,
                   options: DataOptions | None = None, hints: ModelHints | None = None,
                   ) -> StreamData:
    """A ``.jsonl`` or ``.csv`` text file as a StreamData of tokenized batches.

    Args:
        path: the file.
        seed, test_fraction: the train/test split (stratified by label when labelled).
        options: text and label columns, maximum length, truncation, batch size.
        hints: the model (:func:`~slimkit.data.load.model_hints`): its tokenizer directory,
            maximum length, input names, kind (the task) and class names.

    Returns:
        A StreamData whose batches are ``({input_ids, attention_mask[, token_type_ids]},
        labels)`` (labels only for classification), int64, padded per batch.

    Raises:
        DataError: no rows, a missing column (listing the columns), a bad row or label, no
            tokenizer, or rows over the maximum length with ``truncate=False`` (counted).

    Example:
        >>> hints = model_hints(model, "bert/")  # doctest: +SKIP
        >>> data = load_text_file(Path("reviews.jsonl"), hints=hints)  # doctest: +SKIP
    """
    options = options or DataOptions()
    check_text_file(path, options)
    tokenizer = load_tokenizer(hints, str(path))
    columns = _columns(path, next(iter_rows(path))[1])
    label = _pick_label(columns, options)
    task, label = _task(hints, label, options, f"'{path}'", columns)
    rows = file_rows(path, options, label)
    meta = {"source": f"{path.suffix.lower().lstrip('.')} text file", "path": str(path),
            "text_column": options.text_column or "text",
            "tokenizer": str(hints.model_dir) if hints and hints.model_dir else None}
    return text_stream(str(path), rows, None, tokenizer=tokenizer, options=options,
                       hints=hints, label=label, columns=columns, seed=seed,
                       test_fraction=test_fraction, meta=meta)
