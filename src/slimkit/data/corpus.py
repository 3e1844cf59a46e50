"""A real text corpus every machine has offline: the Python standard library's own source.

:func:`stdlib_corpus` streams the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``
(test packages, ``site-packages`` and caches left out) as byte-level token sequences for a
causal language model, as a :class:`~slimkit.data.stream.StreamData` of task ``causal_lm``
whose batches are ``{"input_ids", "attention_mask"}`` (int64 ``[batch, seq_len]``).

Why this shape:

- **Bytes are the tokens** (:class:`ByteTokenizer`, vocabulary 256): nothing to download or
  train, and every file round-trips exactly, whatever its encoding.
- **Split by file**, by a hash of the file's path relative to the library root (POSIX form),
  so that a file is in the same split on every machine and no file leaks between splits
  (consecutive windows of one file are near-duplicates). Choices are made on ``val``; ``test``
  is meant to be read once, for the reported numbers.
- **Read lazily**: a split is the concatenation of its files (each followed by one ``0``
  byte, which Python source never holds, as a document separator) cut into windows of
  ``seq_len`` bytes. One file is in memory at a time, plus less than one window carried over,
  whatever the corpus size. Within a split, files come in the order of the same hash: a
  fixed shuffle, so a byte budget (``max_bytes``) samples files from the whole library.

The corpus depends on the Python version (the library changes between releases);
``meta`` records the version, the root, and the files and bytes of each split.

Example:
    >>> data = stdlib_corpus(seq_len=256, batch_size=16, max_bytes={"train": 2_000_000})
    >>> batch = next(iter(data.batches("train")))[0]  # {"input_ids", "attention_mask"}
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from slimkit.core.errors import ConfigError, DataError
from slimkit.data.stream import StreamData

SPLITS = ("train", "val", "test")
#: Path components that mark code which is not the library itself.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                           "__pycache__"})
#: Ends every file in the token stream (never in Python source: the compiler rejects NULs).
SEPARATOR = 0
_SALT = b"slimkit-stdlib-corpus-v1:"


class ByteTokenizer:
    """Bytes as tokens: UTF-8 text <-> ids 0..255, exactly invertible."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> torch.Tensor:
        """int64 ids of ``text`` (a str is UTF-8 encoded first)."""
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()

    def decode(self, ids: torch.Tensor, errors: str = "strict") -> str:
        """The text of ``ids`` (values 0..255); ``errors`` as in ``bytes.decode``."""
        return self.to_bytes(ids).decode("utf-8", errors)

    @staticmethod
    def to_bytes(ids: torch.Tensor) -> bytes:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > 255):
            raise DataError("byte tokens must lie in 0..255")
        return bytes(ids.to(torch.uint8).flatten().tolist())


def stdlib_root() -> Path:
    """The standard library's source folder of the running interpreter.

    Raises:
        DataError: it does not exist (an embedded or stripped Python holding only bytecode).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the Python standard library source was not found at '{root}' "
                        "(sysconfig stdlib path); install the full Python, or give root= a "
                        "folder of .py files")
    return root


def list_sources(root: str | Path) -> list[str]:
    """The ``.py`` files under ``root`` as sorted POSIX paths relative to it, without test
    packages, ``test_*.py`` files, installed packages and caches (:data:`EXCLUDED_DIRS`).

    Raises:
        DataError: ``root`` is missing or holds no such file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"corpus root '{root}' is not a folder")
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if p.is_file() and not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])
                   and not p.name.startswith("test_"))
    if not found:
        raise DataError(f"no Python source (.py) found under '{root}': is this the standard "
                        "library's folder? A Python shipping only bytecode (.pyc, a zip) has "
                        "no source to read; give root= a folder of .py files")
    return found


def _digest(rel: str) -> bytes:
    return hashlib.sha256(_SALT + rel.encode("utf-8")).digest()


def split_of(rel: str, val_fraction: float, test_fraction: float) -> str:
    """The split of the file at relative path ``rel``: ``test`` for the first
    ``test_fraction`` of the hash range, ``val`` for the next ``val_fraction``, else
    ``train``. Depends on the path only, so it is the same on every machine."""
    u = int.from_bytes(_digest(rel)[:8], "big") / 2 ** 64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction \
        else "train"


@dataclass(frozen=True)
class CorpusSplit:
    """One split's files, read lazily into ``(input_ids, attention_mask)`` batches.

    Iterating reads the files in order, one at a time (re-iterable: each pass starts over);
    ``len`` is the number of batches, from the files' sizes (nothing is read).
    """

    root: Path
    files: tuple[str, ...]
    seq_len: int
    batch_size: int
    max_bytes: int | None = None

    def token_count(self) -> int:
        """Bytes of the split's stream: each file (cut at ``max_bytes`` in all) and its
        separator."""
        total = 0
        for rel in self.files:
            size = (self.root / rel).stat().st_size + 1
            if self.max_bytes is not None and total + size >= self.max_bytes:
                return self.max_bytes
            total += size
        return total

    def __len__(self) -> int:
        windows = -(-self.token_count() // self.seq_len)
        return -(-windows // self.batch_size)

    def file_bytes(self) -> Iterator[bytes]:
        """Each file's bytes and its separator, until ``max_bytes`` have been given."""
        left = self.max_bytes
        for rel in self.files:
            if left is not None and left <= 0:
                return
            chunk = read_source(self.root / rel) + bytes([SEPARATOR])
            if left is not None:
                chunk, left = chunk[:left], left - len(chunk)
            yield chunk
            del chunk  # the next file is read with this one released

    def windows(self) -> Iterator[tuple[torch.Tensor, int]]:
        """``(ids, valid)`` windows of ``seq_len`` bytes (the last zero-padded, ``valid``
        its real length); holds one file and less than one window at a time."""
        carry = b""
        for chunk in self.file_bytes():
            buf, carry = carry + chunk, b""
            del chunk
            full = len(buf) - len(buf) % self.seq_len
            for i in range(0, full, self.seq_len):
                yield torch.frombuffer(bytearray(buf[i:i + self.seq_len]),
                                       dtype=torch.uint8).long(), self.seq_len
            carry = buf[full:]
            del buf
        if carry:
            ids = torch.zeros(self.seq_len, dtype=torch.long)
            ids[:len(carry)] = torch.frombuffer(bytearray(carry), dtype=torch.uint8)
            yield ids, len(carry)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rows: list[tuple[torch.Tensor, int]] = []
        for window in self.windows():
            rows.append(window)
            if len(rows) == self.batch_size:
                yield _batch(rows, self.seq_len)
                rows = []
        if rows:
            yield _batch(rows, self.seq_len)


def read_source(path: Path) -> bytes:
    """One source file's bytes (the one place files are read; tests count the calls)."""
    return path.read_bytes()


def _batch(rows: list[tuple[torch.Tensor, int]], seq_len: int) -> dict[str, torch.Tensor]:
    ids = torch.stack([r[0] for r in rows])
    mask = (torch.arange(seq_len) < torch.tensor([r[1] for r in rows]).unsqueeze(1)).long()
    return {"input_ids": ids, "attention_mask": mask}


def _budgets(max_bytes: int | Mapping[str, int | None] | None) -> dict[str, int | None]:
    if max_bytes is None or isinstance(max_bytes, int):
        budgets = dict.fromkeys(SPLITS, max_bytes)
    else:
        unknown = sorted(set(max_bytes) - set(SPLITS))
        if unknown:
            raise ConfigError(f"max_bytes: unknown split '{unknown[0]}'; the splits are "
                              f"{', '.join(SPLITS)}")
        budgets = {s: max_bytes.get(s) for s in SPLITS}
    for split, b in budgets.items():
        if b is not None and b < 1:
            raise ConfigError(f"max_bytes[{split}] must be at least 1, got {b}")
    return budgets


def stdlib_corpus(seq_len: int = 256, batch_size: int = 16,
                  max_bytes: int | Mapping[str, int | None] | None = None,
                  val_fraction: float = 0.05, test_fraction: float = 0.05,
                  root: str | Path | None = None) -> StreamData:
    """The standard library's source as a byte-level causal-LM stream (see the module
    docstring).

    Args:
        seq_len: bytes per sequence (the model's context).
        batch_size: sequences per batch.
        max_bytes: at most this many bytes per split (an int for all, or per split name);
            None reads every file. For quick runs.
        val_fraction, test_fraction: the files' shares (by path hash) of val and test.
        root: the folder of ``.py`` files (default: the running Python's standard library).

    Returns:
        A :class:`StreamData` named ``stdlib-py<major>.<minor>``, task ``causal_lm``, with
        ``train``/``val``/``test`` sources that have a length in batches; ``meta`` holds the
        root, the Python version, and per split the file count, the files and the bytes.

    Raises:
        DataError: the source is not found, or a split gets no file (too few files for the
            fractions). ConfigError: a bad size, fraction or budget.
    """
    if seq_len < 2 or batch_size < 1:
        raise ConfigError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and "
                          f"{batch_size}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError("val_fraction and test_fraction must lie in (0, 1) and sum below 1")
    budgets = _budgets(max_bytes)
    base = stdlib_root() if root is None else Path(root)
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rel in list_sources(base):
        files[split_of(rel, val_fraction, test_fraction)].append(rel)
    splits = {}
    for s in SPLITS:
        if not files[s]:
            raise DataError(f"the corpus under '{base}' has no file in its {s} split "
                            f"({sum(map(len, files.values()))} files in all); lower the "
                            "fractions or give a larger root")
        order = tuple(sorted(files[s], key=_digest))  # a fixed, machine-independent shuffle
        splits[s] = CorpusSplit(base, order, seq_len, batch_size, budgets[s])
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    meta = {"root": str(base), "python": version, "tokenizer": "bytes (vocab 256)",
            "separator": SEPARATOR, "seq_len": seq_len, "batch_size": batch_size,
            "splits": {s: {"files": len(sp.files), "bytes": sp.token_count(),
                           "batches": len(sp), "max_bytes": sp.max_bytes}
                       for s, sp in splits.items()}}
    return StreamData(f"stdlib-py{version}", train=splits["train"], test=splits["test"],
                      val=splits["val"], task="causal_lm", meta=meta)


__all__ = ["EXCLUDED_DIRS", "SEPARATOR", "ByteTokenizer", "CorpusSplit", "list_sources",
           "split_of", "stdlib_corpus", "stdlib_root"]
