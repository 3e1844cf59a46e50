"""User datasets on disk: ``.npz`` archives and folders of images, one sub-folder per class.

An image folder loads into memory (:func:`load_image_folder`, images as they are on disk) or
as a stream decoded batch by batch (:func:`image_folder_stream`): each image is resized to
cover the model's input size, center-cropped to it and normalized as the model expects; only
the file list and labels are held, never an image beyond its batch.
"""

from __future__ import annotations

import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimkit.core.errors import DataError
from slimkit.data.assemble import build_bundle
from slimkit.data.bundle import DataBundle
from slimkit.data.deps import require
from slimkit.data.load import DataOptions, ModelHints

if TYPE_CHECKING:
    from slimkit.data.stream import StreamData

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


@dataclass(frozen=True)
class ImagePrep:
    """How an image becomes a model input.

    Attributes:
        mode: ``L`` (one channel) or ``RGB`` (three).
        size: ``(height, width)`` after the center crop; None keeps the image's own size.
        resize: the shorter side to scale to before cropping (at least what covers
            ``size``); None scales only as far as covering ``size`` needs.
        mean, std: per-channel normalization of the [0, 1] pixels; None keeps them in [0, 1].
    """

    mode: str
    size: tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def describe(self) -> dict:
        return {"color": "grayscale" if self.mode == "L" else "rgb",
                "size": list(self.size) if self.size else None, "resize": self.resize,
                "mean": self.mean, "std": self.std,
                "scale": "to [0, 1]" if self.mean is None else "to [0, 1], then normalized"}


def _fit(im: Any, prep: ImagePrep, image_mod: ModuleType) -> Any:
    """Scale ``im`` (bilinear) to cover the crop, then center-crop it (as torchvision's
    Resize + CenterCrop: the shorter side to ``resize`` for a square crop)."""
    if prep.size is None:
        return im
    w, h = im.size
    height, width = prep.size
    scale = max(height / h, width / w, prep.resize / min(h, w) if prep.resize else 0.0)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), image_mod.Resampling.BILINEAR)
    if (nw, nh) != (width, height):
        left, top = int(round((nw - width) / 2.0)), int(round((nh - height) / 2.0))
        im = im.crop((left, top, left + width, top + height))
    return im


def _pixels(im: Any, mode: str, prep: ImagePrep | None = None,
            image_mod: ModuleType | None = None) -> np.ndarray:
    """One image as ``(C, H, W)`` float32 in [0, 1] (then fitted and normalized by ``prep``)."""
    if mode == "L" and im.mode in _WIDE_GRAY:
        # 16-bit grayscale is scaled by its own range; float images are taken as given.
        arr = np.asarray(im, dtype=np.float32)
        arr = arr if im.mode == "F" else arr / 65535.0
        if prep is not None:  # resampled as a float ("F") image, so no precision is lost
            arr = np.asarray(_fit(image_mod.fromarray(arr), prep, image_mod), np.float32)
        arr = arr[None]
    else:
        im = im.convert(mode)
        if prep is not None:
            im = _fit(im, prep, image_mod)
        arr = np.asarray(im, dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if prep is not None and prep.mean is not None:
        mean = np.asarray(prep.mean, np.float32)[:, None, None]
        arr = (arr - mean) / np.asarray(prep.std, np.float32)[:, None, None]
    return np.ascontiguousarray(arr, dtype=np.float32)


def _decode(path: Path | str, mode: str, prep: ImagePrep | None,
            image_mod: ModuleType) -> np.ndarray:
    try:
        with image_mod.open(path) as im:
            return _pixels(im, mode, prep, image_mod)
    except _image_errors(image_mod) as exc:  # a header that reads but pixels that do not
        raise DataError(f"cannot read image {path}: {exc}; re-save or remove it") from exc


def _channels(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if channels == 1:  # an RGB model's statistics for a grayscale input: their mean
        return (float(np.mean(values)),)
    if len(values) == 1:
        return values * channels
    raise DataError(f"the model's image {what} has {len(values)} values for {channels} "
                    "channels")


def image_prep(files: list[tuple[Path, int]], image_mod: ModuleType,
               options: DataOptions | None, hints: ModelHints | None) -> ImagePrep:
    """The prep an image folder gets: the model's channels, size and normalization when it
    says (``hints``), else the first image's mode and size (or ``image_size`` square);
    ``options.image_size`` sets the shorter side before the crop."""
    options = options or DataOptions()
    shape = hints.image_shape if hints is not None else None
    if shape is not None:
        if shape[0] not in (1, 3):
            raise DataError(f"'{hints.name}' takes images of {shape[0]} channels; an image "
                            "folder gives 1 (grayscale) or 3 (RGB)")
        mode, size = ("L" if shape[0] == 1 else "RGB"), (int(shape[1]), int(shape[2]))
    else:
        first = files[0][0]
        try:
            with image_mod.open(first) as im:
                gray, (w, h) = im.mode in _GRAY_MODES, im.size
        except _image_errors(image_mod) as exc:
            raise DataError(f"cannot read image {first}: {exc}; re-save or remove it") from exc
        mode = "L" if gray else "RGB"
        size = (options.image_size,) * 2 if options.image_size else (h, w)
    resize = options.image_size or (hints.resize if hints is not None else None)
    mean = std = None
    if hints is not None and hints.mean is not None and hints.std is not None:
        channels = 1 if mode == "L" else 3
        mean = _channels(hints.mean, channels, "mean")
        std = _channels(hints.std, channels, "std")
    return ImagePrep(mode, size, resize, mean, std)


def class_indices(classes: list[str], label2id: dict[str, int] | None) -> list[int]:
    """Each class folder's index: the model's ``label2id`` when it names every folder (so a
    fine-tuned classifier's own class order holds), else the sorted order."""
    if label2id and all(c in label2id for c in classes):
        return [int(label2id[c]) for c in classes]
    return list(range(len(classes)))


def stream_splits(y: np.ndarray | None, n: int, seed: int, test_fraction: float | None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, test, val)`` row indices of a stream over ``n`` samples: the train/test split
    an in-memory dataset gets (stratified by ``y``, by ``seed``; no test with
    ``test_fraction`` None, when it is given apart), the training rows in a seeded shuffled
    order (so that a stream's first rows, which calibration takes, mix classes), and a fixed
    20% of them (class-stratified, seed 0) to validate on, as a DataBundle's ``val``."""
    from slimkit.data.split import _rng, split_indices

    strata = torch.from_numpy(y if y is not None else np.zeros(n, np.int64))
    train, test = ((np.arange(n), np.arange(0)) if test_fraction is None
                   else split_indices(strata, test_fraction, seed))
    val = (train[split_indices(strata[torch.from_numpy(train)], 0.2, seed=0)[1]]
           if len(train) >= 2 else train)
    return _rng(seed).permutation(train), test, val


def label_warnings(name: str, y_train: np.ndarray, y_test: np.ndarray) -> list[str]:
    """Why labelled data cannot support an accuracy claim (see ``validate.data_warnings``),
    from its labels alone."""
    from slimkit.data.validate import data_warnings

    return data_warnings(types.SimpleNamespace(  # type: ignore[arg-type]
        name=name, y_train=torch.from_numpy(y_train), y_test=torch.from_numpy(y_test)))


def load_image_folder(root: Path, *, seed: int = 0, test_fraction: float = 0.2,
                      options: DataOptions | None = None,
                      hints: ModelHints | None = None) -> DataBundle:
    """Load a folder with one sub-folder of images per class, as ``(N, C, H, W)`` float32.

    Class indices follow the sorted sub-folder names (recorded in ``meta["class_names"]``), or
    the model's ``label2id`` when it names every folder. Without a model image shape and an
    ``image_size`` the images are taken as they are: grayscale (C=1) when all are grayscale,
    else RGB (C=3), scaled to [0, 1], all of one size; with them, each is fitted as
    :func:`image_prep` says. Files without an image suffix are ignored; the split is
    stratified by ``seed``. Everything is held in memory: for large folders, see
    :func:`image_folder_stream`.

    Raises:
        DataError: no class folders, an empty class, an unreadable or truncated image, or
            (as they are) an image whose size differs from the first one (naming it).
    """
    image_mod = require("PIL.Image", extra="data", needed_for=f"image folder {root}")
    classes, files = _image_files(root)
    prep = None
    if (options and options.image_size) or (hints and hints.image_shape):
        prep = image_prep(files, image_mod, options, hints)
        mode = prep.mode
    else:
        mode = _probe(files, image_mod)
    x = np.stack([_decode(path, mode, prep, image_mod) for path, _ in files])
    index = class_indices(classes, hints.label2id if hints else None)
    y = np.array([index[i] for _, i in files], dtype=np.int64)
    meta = {"source": "image folder", "path": str(root), "class_names": classes,
            "color": "grayscale" if mode == "L" else "rgb", "scale": "to [0, 1]"}
    if prep is not None:
        meta.update(prep.describe())
    return build_bundle(str(root), x, y, seed=seed, test_fraction=test_fraction, meta=meta,
                        where=f" in {root}")


class _ImageBatches:
    """Re-iterable ``(images, labels)`` batches of some files, decoded when iterated; one
    batch of pixels is held at a time."""

    def __init__(self, paths: list[str], labels: np.ndarray, index: np.ndarray,
                 prep: ImagePrep, image_mod: ModuleType, batch_size: int,
                 name: str | None = None) -> None:
        self.paths, self.labels, self.index = paths, labels, np.asarray(index, np.int64)
        self.prep, self.image_mod, self.batch_size = prep, image_mod, batch_size
        self.name = name

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for lo in range(0, len(self.index), self.batch_size):
            idx = self.index[lo:lo + self.batch_size]
            x = torch.from_numpy(np.stack([
                _decode(self.paths[i], self.prep.mode, self.prep, self.image_mod) for i in idx]))
            yield ({self.name: x} if self.name else x), torch.from_numpy(self.labels[idx])


def image_folder_stream(root: Path, *, seed: int = 0, test_fraction: float = 0.2,
                        options: DataOptions | None = None,
                        hints: ModelHints | None = None) -> StreamData:
    """An image folder (one sub-folder per class) as a StreamData decoded batch by batch.

    Each image is converted to the model's channels, scaled (bilinear) so that it covers the
    model's input size (its shorter side to ``options.image_size`` when given), center-cropped
    to it and normalized with the model's mean and std (an HF vision model's preprocessor's,
    else ImageNet's; other models get pixels in [0, 1], as in-memory folders do). Without a
    model the first image decides channels and size. The files are split as
    :func:`load_image_folder` splits them (stratified, by ``seed``, the same files); the
    training split is read in a seeded shuffled order, the validation split is a fixed 20% of
    it (class-stratified, seed 0). Nothing but the file list is read until batches are.

    Raises:
        DataError: no class folders, an empty class, a channel count no image has; an
            unreadable image is named when its batch is read.

    Example:
        >>> hints = model_hints(vit, "vit/")  # doctest: +SKIP
        >>> data = image_folder_stream(Path("photos"), hints=hints)  # doctest: +SKIP
    """
    from slimkit.data.stream import StreamData

    options = options or DataOptions()
    image_mod = require("PIL.Image", extra="data", needed_for=f"image folder {root}")
    classes, files = _image_files(root)
    prep = image_prep(files, image_mod, options, hints)
    index = class_indices(classes, hints.label2id if hints else None)
    y = np.array([index[i] for _, i in files], dtype=np.int64)
    train, test, val = stream_splits(y, len(y), seed, test_fraction)
    paths, bs = [str(p) for p, _ in files], options.batch_size
    names = hints.input_names if hints is not None else None
    key = names[0] if names and len(names) == 1 else None  # an HF model's pixel_values

    def batches(rows: np.ndarray) -> _ImageBatches:
        return _ImageBatches(paths, y, rows, prep, image_mod, bs, key)

    meta = {"source": "image folder", "path": str(root), "class_names": classes,
            **prep.describe(), "split": "stratified", "split_seed": seed,
            "test_fraction": test_fraction, "n_train": len(train), "n_test": len(test),
            "train_order": f"shuffled by seed {seed}"}
    warnings = label_warnings(str(root), y[train], y[test])
    if warnings:
        meta["warnings"] = warnings
    return StreamData(str(root), train=batches(train),
                      test=batches(test), val=batches(val), task="classification",
                      num_classes=int(y.max()) + 1, length=-(-len(train) // bs), meta=meta)
