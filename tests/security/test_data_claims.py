"""Data that cannot support an accuracy claim says so; calibration on a handful is refused.

Issue 16, item 11: a single class, or one or two samples, used to run without a word.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.cli import main
from slimkit.core.errors import DataError
from slimkit.data import DataBundle, build_bundle, calibration_subset, data_warnings, load_data


def _bundle(y_train: list[int], y_test: list[int]) -> DataBundle:
    x = np.zeros((len(y_train), 3), np.float32)
    return build_bundle("t", x, y_train, np.zeros((len(y_test), 3), np.float32), y_test)


def test_enough_data_of_every_class_has_no_warning():
    data = _bundle([0, 1, 2] * 10, [0, 1, 2] * 10)
    assert data_warnings(data) == [] and "warnings" not in data.meta


def test_a_single_class_is_named():
    data = _bundle([3] * 30, [3] * 30)
    assert data.meta["warnings"] == [
        "data 't' holds a single class (label 3): accuracy on it cannot show whether the model "
        "still tells classes apart; add samples of the other classes"]


def test_a_test_split_of_one_class_is_named():
    data = _bundle([0, 1] * 15, [1] * 30)
    assert data.meta["warnings"] == [
        "the test split of 't' holds a single class (label 1) of 2: accuracy is judged on that "
        "class alone; give a test split with every class"]


def test_one_or_two_samples_are_too_few_to_judge():
    data = _bundle([0, 1], [0, 1])
    assert data.meta["warnings"] == [
        "data 't' has only 2 test sample(s): one changed prediction moves accuracy by 50 points, "
        "too coarse to judge an accuracy target; use at least 20 (better hundreds)",
        "data 't' has only 2 training sample(s): fine-tuning or calibrating on so few fits those "
        "samples, not the data; use at least 20"]


def test_loaded_data_carries_the_warnings(tmp_path: Path):
    path = tmp_path / "one.npz"
    np.savez(path, x=np.zeros((40, 4), np.float32), y=np.zeros(40, np.int64))
    data = load_data(str(path))
    assert data.meta["warnings"][0].startswith(f"data '{path}' holds a single class (label 0)")


def test_calibration_on_a_handful_is_refused():
    data = DataBundle("tiny", torch.zeros(3, 2), torch.tensor([0, 1, 0]), torch.zeros(1, 2),
                      torch.tensor([1]), 2)
    with pytest.raises(DataError) as err:
        calibration_subset(data, 64)
    assert str(err.value) == (
        "cannot calibrate on 'tiny': its training split has 3 sample(s), and statistics from "
        "fewer than 4 describe those samples, not the data; give more data.")
    data.x_train, data.y_train = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
    assert len(calibration_subset(data, 64)) == 4


def test_the_cli_prints_each_warning_on_its_own_line(tmp_path: Path, capsys):
    path = tmp_path / "one.npz"
    np.savez(path, x=np.random.default_rng(0).random((40, 64), np.float32),
             y=np.zeros(40, np.int64))
    code = main(["eval", "zoo:lenet300", "--data", str(path), "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and '"top1"' in out
    assert err.splitlines() == [
        f"warning: data '{path}' holds a single class (label 0): accuracy on it cannot show "
        "whether the model still tells classes apart; add samples of the other classes",
        f"warning: data '{path}' has only 8 test sample(s): one changed prediction moves "
        "accuracy by 12.5 points, too coarse to judge an accuracy target; use at least 20 "
        "(better hundreds)"]


def test_the_report_carries_the_data_warnings():
    from slimkit.pipeline.runner import _describe_data

    x = torch.rand(30, 1, 4, 4)
    one_class = DataBundle("one", x[:20], torch.zeros(20, dtype=torch.int64), x[20:],
                           torch.zeros(10, dtype=torch.int64), 2)
    warnings = _describe_data(one_class)["warnings"]
    assert warnings == data_warnings(one_class) and warnings
