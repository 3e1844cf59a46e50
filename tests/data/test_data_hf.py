"""Hugging Face datasets saved to disk: the real library when installed, else a stand-in."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from slimkit.core.errors import DataError
from slimkit.data import load_data


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    train = datasets.Dataset.from_dict(
        {"x": rng.normal(size=(20, 5)).tolist(), "label": [0, 1, 2, 3] * 5})
    test = datasets.Dataset.from_dict(
        {"x": rng.normal(size=(8, 5)).tolist(), "label": [3, 2, 1, 0] * 2})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    data = load_data(str(tmp_path / "dd"))
    assert data.x_train.shape == (20, 5) and data.x_test.shape == (8, 5)
    assert data.num_classes == 4 and data.y_test.tolist() == [3, 2, 1, 0] * 2
    train.save_to_disk(str(tmp_path / "single"))
    single = load_data(str(tmp_path / "single"), seed=0)
    assert len(single.x_train) == 16 and len(single.x_test) == 4
    datasets.Dataset.from_dict({"feat": [[1.0]] * 4, "label": [0, 1] * 2}).save_to_disk(
        str(tmp_path / "bad"))
    with pytest.raises(DataError, match="no input column.*pixel_values"):
        load_data(str(tmp_path / "bad"))


class _FakeDataset:
    """The slice of ``datasets.Dataset`` the loader uses: column_names, ds[col], features."""

    def __init__(self, columns: dict, features: dict | None = None) -> None:
        self._columns = columns
        self.column_names = list(columns)
        self.features = features or {}

    def __getitem__(self, column: str) -> list:
        return list(self._columns[column])


class _FakeDatasetDict(dict):
    pass


@pytest.fixture
def fake_datasets(monkeypatch, tmp_path):
    """Install a stand-in ``datasets`` module whose load_from_disk returns a chosen object."""
    module = types.ModuleType("datasets")
    module.DatasetDict = _FakeDatasetDict
    store: dict = {}
    module.load_from_disk = lambda path: store[path]
    monkeypatch.setitem(sys.modules, "datasets", module)

    def save(name: str, obj: object, marker: str = "state.json"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / marker).write_text(json.dumps({}))
        store[str(folder)] = obj
        return str(folder)

    return save


def test_image_column_with_class_labels(fake_datasets):
    image = pytest.importorskip("PIL.Image")
    pics = [image.new("L", (6, 5), 255 * (i % 2)) for i in range(10)]
    names = types.SimpleNamespace(names=["off", "on", "unused"])
    ds = _FakeDataset({"image": pics, "label": [i % 2 for i in range(10)]}, {"label": names})
    data = load_data(fake_datasets("imgs", ds), seed=0)
    assert data.input_shape == (1, 5, 6) and data.meta["input_column"] == "image"
    assert data.meta["class_names"] == ["off", "on", "unused"] and data.num_classes == 3
    assert set(data.x_train.unique().tolist()) == {0.0, 1.0}
    assert len(data.x_test) == 2


def test_dataset_dict_train_test_and_token_ids(fake_datasets):
    train = _FakeDataset({"input_ids": [[1, 2, 3]] * 6, "labels": [0, 1, 2] * 2})
    test = _FakeDataset({"input_ids": [[3, 2, 1]] * 3, "labels": [2, 1, 0]})
    path = fake_datasets("dd", _FakeDatasetDict(train=train, test=test), "dataset_dict.json")
    data = load_data(path)
    assert data.x_train.dtype.is_floating_point is False and data.x_train.shape == (6, 3)
    assert data.y_test.tolist() == [2, 1, 0] and data.meta["split"] == "given"


def test_ragged_rows_and_bad_splits_are_named(fake_datasets):
    ragged = _FakeDataset({"input_ids": [[1, 2], [1, 2, 3]], "label": [0, 1]})
    with pytest.raises(DataError, match=r"row 1 has shape \(3,\) but row 0 has \(2,\).*pad"):
        load_data(fake_datasets("ragged", ragged))
    two = _FakeDatasetDict(a=ragged, b=ragged)
    with pytest.raises(DataError, match=r"splits \['a', 'b'\]"):
        load_data(fake_datasets("two", two, "dataset_dict.json"))
    no_label = _FakeDataset({"x": [[1.0]] * 2, "target": [0, 1]})
    with pytest.raises(DataError, match=r"no label column.*'label'.*found \['x', 'target'\]"):
        load_data(fake_datasets("nolabel", no_label))


def test_missing_datasets_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(DataError, match=r"pip install 'slimkit\[hf\]'"):
        load_data(str(tmp_path))
