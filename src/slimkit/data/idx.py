"""IDX files, the format of MNIST and Fashion-MNIST: read, write, and load a folder of them.

An IDX file is a 4-byte header (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in C order, big-endian. The files usually
come gzip-compressed (``train-images-idx3-ubyte.gz``); both forms are read, told apart by the
gzip magic bytes rather than by the name. A folder holding ``train-images``/``train-labels``
(and optionally ``t10k-images``/``t10k-labels``) files in this format loads as a dataset.

Example:
    >>> write_idx(tmp / "x-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))  # doctest: +SKIP
    >>> read_idx(tmp / "x-idx3-ubyte.gz").shape  # doctest: +SKIP
    (2, 28, 28)
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slimkit.core.errors import DataError

if TYPE_CHECKING:
    from slimkit.data.bundle import DataBundle

# Type code -> big-endian numpy dtype (the IDX specification's table).
IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
# train-images-idx3-ubyte, t10k-labels.idx1-ubyte, ... optionally .gz
_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx[0-9]-ubyte(\.gz)?$")
_FORMAT_HINT = ("an IDX file starts with two zero bytes, a type code (0x08 for ubyte) and the "
                "number of dimensions; re-download or regenerate it")


def _raw_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}; re-download or replace it") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """The array an IDX file holds (gzip-compressed or raw), in native byte order.

    Args:
        path: the file.

    Returns:
        A read-only array of the file's dtype and shape (``uint8`` for MNIST's ubyte files).

    Raises:
        DataError: unreadable file, a header that is not IDX, or a payload whose length does
            not match the header's shape (a truncated download); the message names the file.
    """
    path = Path(path)
    raw = _raw_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (header {raw[:4].hex() or 'empty'}): "
                        f"{_FORMAT_HINT}")
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    head = 4 + 4 * ndim
    if ndim == 0 or len(raw) < head:
        raise DataError(f"{path}: IDX header declares {ndim} dimension(s) but the file ends "
                        f"after {len(raw)} bytes: {_FORMAT_HINT}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - head != want:
        raise DataError(f"{path}: IDX header says shape {shape} ({want} bytes of data) but the "
                        f"file holds {len(raw) - head}; the file is truncated or corrupt, "
                        "re-download it")
    arr = np.frombuffer(raw, dtype=dtype, offset=head).reshape(shape)
    arr = arr.astype(dtype.newbyteorder("="), copy=False)
    arr.setflags(write=False)
    return arr


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    Raises:
        DataError: a dtype IDX cannot hold (it has uint8, int8, int16, int32, float32,
            float64) or a 0-d array.
    """
    path, array = Path(path), np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim == 0:
        raise DataError(f"cannot write {array.dtype} array of shape {array.shape} to {path} as "
                        "IDX: use uint8, int8, int16, int32, float32 or float64, at least 1-D")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    body = header + array.astype(IDX_DTYPES[code], copy=False).tobytes(order="C")
    path.write_bytes(gzip.compress(body, mtime=0) if path.suffix == ".gz" else body)
    return path


def idx_files(folder: Path) -> dict[str, Path]:
    """The MNIST-format files in ``folder``, keyed ``train-images``, ``train-labels``,
    ``t10k-images``, ``t10k-labels`` (those present; a raw file wins over its ``.gz``)."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for p in sorted(folder.iterdir(), key=lambda p: (p.suffix == ".gz", p.name)):
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.setdefault(f"{m.group(1)}-{m.group(2)}", p)
    return found


def is_idx_dir(path: Path) -> bool:
    """True when ``path`` is a folder holding MNIST-format training images and labels."""
    return {"train-images", "train-labels"} <= set(idx_files(path))


def read_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    """The arrays of an MNIST-format folder: ``x``, ``y`` and, when present, ``x_test``,
    ``y_test``; labels must be 1-D and as many as the images.

    Raises:
        DataError: training images or labels missing, half a test split, or mismatched counts.
    """
    files = idx_files(folder)
    missing = [k for k in ("train-images", "train-labels") if k not in files]
    if missing:
        raise DataError(f"{folder} lacks {' and '.join(missing)} IDX files; an MNIST-format "
                        "folder holds train-images-idx3-ubyte[.gz] and "
                        "train-labels-idx1-ubyte[.gz] (t10k-* for a test split)")
    if ("t10k-images" in files) != ("t10k-labels" in files):
        have = "t10k-images" if "t10k-images" in files else "t10k-labels"
        raise DataError(f"{folder} has {files[have].name} without its "
                        f"{'labels' if have == 't10k-images' else 'images'} file; give both "
                        "t10k files or neither")
    out: dict[str, np.ndarray] = {}
    for split, key in (("train", ""), ("t10k", "_test")):
        if f"{split}-images" not in files:
            continue
        x, y = read_idx(files[f"{split}-images"]), read_idx(files[f"{split}-labels"])
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{files[f'{split}-labels'].name} in {folder} holds labels of shape "
                            f"{y.shape} for {len(x)} images in {files[f'{split}-images'].name}; "
                            "they must be one label per image")
        out["x" + key], out["y" + key] = x, y
    return out


def as_images(x: np.ndarray) -> np.ndarray:
    """IDX images ``(N, H, W)`` as ``(N, 1, H, W)`` float32; ubyte pixels scaled to [0, 1]."""
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = x.reshape(len(x), 1, *x.shape[1:]) if x.ndim == 3 else x
    return (x / scale).astype(np.float32)


def load_idx_folder(folder: Path, *, seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """An MNIST-format folder as a DataBundle: ``(N, 1, H, W)`` float32 pixels in [0, 1].

    The folder's ``t10k`` files are the test split when present; otherwise the training
    files are split, stratified, by ``seed`` and ``test_fraction``.

    Raises:
        DataError: see :func:`read_idx_folder` and :func:`read_idx`.
    """
    from slimkit.data.assemble import build_bundle

    a = read_idx_folder(folder)
    meta = {"source": "IDX (MNIST format)", "scale": 1 / 255}
    test = ((as_images(a["x_test"]), a["y_test"].astype(np.int64)) if "x_test" in a
            else (None, None))
    return build_bundle(str(folder), as_images(a["x"]), a["y"].astype(np.int64), *test,
                        seed=seed, test_fraction=test_fraction, meta=meta,
                        where=f" in {folder}")
