"""User datasets on disk: ``.npz`` archives and folders of images, one sub-folder per class."""

from __future__ import annotations

import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from slimkit.core.errors import DataError
from slimkit.data.assemble import build_bundle
from slimkit.data.bundle import DataBundle
from slimkit.data.deps import require

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".pgm", ".ppm", ".pbm"})
# Pillow modes that carry a single intensity channel (alpha, if any, is dropped).
_WIDE_GRAY = frozenset({"I", "I;16", "I;16B", "I;16L", "F"})
_GRAY_MODES = frozenset({"1", "L", "LA"}) | _WIDE_GRAY


def _npz_array(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        arr = archive[key]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise DataError(f"cannot read '{key}' from {path}: {exc}") from exc
        raise DataError(
            f"'{key}' in {path} is an object array, and loading it would unpickle code from the "
            "file. Save numeric arrays instead, or pass --trust-pickle (trust_pickle=True) "
            "only if you trust this file."
        ) from None
    if arr.dtype == object:
        # Only reachable with trust_pickle: accept a list of equal-shaped numeric rows.
        try:
            arr = np.stack([np.asarray(row) for row in arr])
        except ValueError as exc:
            raise DataError(f"'{key}' in {path} holds rows of different shapes: {exc}") from None
    return arr


def load_npz(path: Path, *, seed: int = 0, test_fraction: float = 0.2,
             trust_pickle: bool = False) -> DataBundle:
    """Load ``x``/``y`` (and optional ``x_test``/``y_test``) from a numpy ``.npz`` archive.

    ``uint8`` inputs are taken as image pixels and scaled to [0, 1]; other integer inputs
    are kept as int64 token ids; floats become float32 unchanged. Without a test split
    the data is split, stratified, by ``seed``.

    Raises:
        DataError: unreadable file, missing keys, object arrays without ``trust_pickle``,
            or any validation failure.
    """
    where = f" in {path}"
    try:
        archive = np.load(path, allow_pickle=trust_pickle)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path} as a .npz archive: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not a .npz archive with 'x' and 'y'.")
    with archive:
        keys = set(archive.files)
        missing = {"x", "y"} - keys
        if missing:
            raise DataError(f"{path} lacks {sorted(missing)}; it must hold arrays 'x' and 'y' "
                            f"(and optionally 'x_test', 'y_test'). Found: {sorted(keys)}.")
        arrays = {k: _npz_array(archive, k, path) for k in ("x", "y", "x_test", "y_test")
                  if k in keys}
    meta: dict = {"source": "npz", "path": str(path)}
    for k in ("x", "x_test"):
        if k in arrays and arrays[k].dtype == np.uint8:
            arrays[k] = arrays[k].astype(np.float32) / 255.0
            meta["scale"] = 1 / 255
    return build_bundle(str(path), arrays["x"], arrays["y"], arrays.get("x_test"),
                        arrays.get("y_test"), seed=seed, test_fraction=test_fraction,
                        meta=meta, where=where)


def _image_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folders) and ``(file, class index)`` pairs, in sorted order."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders; an image dataset needs one sub-folder "
                        f"per class (e.g. {root}/cat/1.png, {root}/dog/2.png).")
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder {root / name} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}).")
        files.extend((p, index) for p in found)
    return classes, files


def _probe(files: list[tuple[Path, int]], image_mod: ModuleType) -> str:
    """Check every image opens and has one size; return the common Pillow mode."""
    reference: tuple[Path, tuple[int, int]] | None = None
    gray = True
    for path, _ in files:
        try:
            with image_mod.open(path) as im:  # lazy: reads the header, not the pixels
                size, mode = im.size, im.mode
        except _image_errors(image_mod) as exc:
            raise DataError(f"cannot read image {path}: {exc}; re-save or remove it") from exc
        if reference is None:
            reference = (path, size)
        elif size != reference[1]:
            raise DataError(
                f"image {path} is {size[0]}x{size[1]} but {reference[0]} is "
                f"{reference[1][0]}x{reference[1][1]}; all images must share one size "
                "(resize them first)."
            )
        gray = gray and mode in _GRAY_MODES
    return "L" if gray else "RGB"


def _image_errors(image_mod: ModuleType) -> tuple[type[Exception], ...]:
    """What Pillow raises for a damaged, truncated or oversized image."""
    return (OSError, SyntaxError, ValueError, image_mod.DecompressionBombError)


def _pixels(im: Any, mode: str) -> np.ndarray:
    """One image as ``(C, H, W)`` float32 in [0, 1]."""
    if mode == "L" and im.mode in _WIDE_GRAY:
        # 16-bit grayscale is scaled by its own range; float images are taken as given.
        arr = np.asarray(im, dtype=np.float32)
        return (arr if im.mode == "F" else arr / 65535.0)[None]
    arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(root: Path, *, seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """Load a folder with one sub-folder of images per class, as ``(N, C, H, W)`` float32.

    Class indices follow the sorted sub-folder names (recorded in ``meta["class_names"]``).
    Images become grayscale (C=1) when all are grayscale, else RGB (C=3), scaled to [0, 1].
    Files without an image suffix are ignored; the split is stratified by ``seed``.

    Raises:
        DataError: no class folders, an empty class, an unreadable or truncated image, or
            an image whose size differs from the first one (naming it).
    """
    image_mod = require("PIL.Image", extra="data", needed_for=f"image folder {root}")
    classes, files = _image_files(root)
    mode = _probe(files, image_mod)
    pixels = []
    for path, _ in files:
        try:
            with image_mod.open(path) as im:
                pixels.append(_pixels(im, mode))
        except _image_errors(image_mod) as exc:  # a header that reads but pixels that do not
            raise DataError(f"cannot read image {path}: {exc}; re-save or remove it") from exc
    x = np.stack(pixels)
    y = np.array([index for _, index in files], dtype=np.int64)
    meta = {"source": "image folder", "path": str(root), "class_names": classes,
            "color": "grayscale" if mode == "L" else "rgb", "scale": "to [0, 1]"}
    return build_bundle(str(root), x, y, seed=seed, test_fraction=test_fraction, meta=meta,
                        where=f" in {root}")
