"""Shared fixtures for the data tests: built-in datasets are loaded once per session."""

from __future__ import annotations

import numpy as np
import pytest

from slimkit.data import DataBundle, load_data


@pytest.fixture(scope="session")
def mnist() -> DataBundle:
    return load_data("builtin:mnist", seed=0)


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    return load_data("builtin:digits", seed=0)


@pytest.fixture
def write_npz(tmp_path):
    """Write arrays to a fresh .npz file and return its path."""

    def write(name: str = "data.npz", **arrays: np.ndarray):
        path = tmp_path / name
        np.savez(path, **arrays)
        return path

    return write


@pytest.fixture
def small_xy() -> tuple[np.ndarray, np.ndarray]:
    """40 samples of 3 features, 4 balanced classes, with class-dependent means."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    x = rng.normal(size=(40, 3)) + y[:, None]
    return x, y
