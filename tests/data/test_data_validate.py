"""Every bad input gives one DataError that names the culprit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimkit.core.errors import DataError
from slimkit.data import build_bundle, check_inputs, check_labels, load_data


def test_length_mismatch_names_both_counts(write_npz):
    path = write_npz(x=np.zeros((5, 2)), y=np.array([0, 1, 0]))
    with pytest.raises(DataError) as err:
        load_data(str(path))
    msg = str(err.value)
    assert "x has 5 samples but y has 3 labels in" in msg and "data.npz" in msg


def test_test_length_mismatch():
    with pytest.raises(DataError, match="x_test has 3 samples but y_test has 2"):
        build_bundle("t", np.zeros((4, 2)), [0, 1, 0, 1], np.zeros((3, 2)), [0, 1])


@pytest.mark.parametrize(("y", "needle"), [
    (np.zeros((4, 1), dtype=np.int64), "must be a 1-D array"),
    (np.eye(4, dtype=np.int64), "one-hot"),
    (np.array(["a", "b", "a", "b"]), "strings"),
    (np.array([0.0, 1.5, 1.0, 0.0]), "label 1.5 at index 1 is not a whole number"),
    (np.array([0, 1, -2, 1]), "negative label -2 at index 2"),
])
def test_bad_labels(write_npz, y, needle):
    path = write_npz(x=np.zeros((4, 2)), y=y)
    with pytest.raises(DataError) as err:
        load_data(str(path))
    assert needle in str(err.value) and "y in" in str(err.value)


def test_whole_float_labels_are_accepted():
    assert check_labels(np.array([0.0, 2.0, 1.0])).tolist() == [0, 2, 1]
    assert check_labels(np.array([0.0, 2.0])).dtype == torch.int64


def test_empty_dataset(write_npz):
    path = write_npz(x=np.zeros((0, 3)), y=np.zeros(0, dtype=np.int64))
    with pytest.raises(DataError, match=r"x in .*data.npz is empty \(0 samples\)"):
        load_data(str(path))


def test_nan_and_inf_are_counted(write_npz):
    x = np.zeros((6, 3))
    x[2, 1] = np.nan
    x[4, 0] = np.nan
    x[5, 2] = np.inf
    path = write_npz(x=x, y=np.array([0, 1] * 3))
    with pytest.raises(DataError) as err:
        load_data(str(path))
    assert "2 NaN and 1 Inf" in str(err.value) and "sample 2" in str(err.value)


def test_nan_in_test_split_names_x_test():
    x_test = np.zeros((2, 3))
    x_test[1, 1] = -np.inf
    with pytest.raises(DataError, match="x_test contains 0 NaN and 1 Inf"):
        build_bundle("t", np.zeros((4, 3)), [0, 1, 0, 1], x_test, [0, 1])


def test_test_feature_shape_must_match(write_npz):
    path = write_npz(x=np.zeros((4, 3)), y=[0, 1, 0, 1], x_test=np.zeros((2, 4)), y_test=[0, 1])
    with pytest.raises(DataError, match=r"x_test in .* shape \(4,\) but x samples have \(3,\)"):
        load_data(str(path))


def test_inputs_need_a_feature_dimension():
    with pytest.raises(DataError, match=r"shape \(5,\).*reshape it to \(5, -1\)"):
        check_inputs(np.zeros(5))


def test_num_classes_inferred_over_train_and_test():
    b = build_bundle("t", np.zeros((4, 2)), [0, 1, 0, 1], np.zeros((2, 2)), [4, 0])
    assert b.num_classes == 5


def test_declared_num_classes(write_npz):
    path = write_npz(x=np.zeros((4, 2)), y=[0, 1, 0, 1], x_test=np.zeros((2, 2)), y_test=[0, 7])
    with pytest.raises(DataError) as err:
        load_data(str(path), num_classes=5)
    msg = str(err.value)
    assert "y_test has label 7 at index 1" in msg and "num_classes=5" in msg
    assert load_data(str(path), num_classes=12).num_classes == 12
