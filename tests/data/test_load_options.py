"""Data specs and options checked without loading anything, and what a model tells its data."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from slimkit.core.errors import DataError
from slimkit.data import load_data
from slimkit.data.load import (
    DataOptions,
    accepted_forms,
    check_data_options,
    check_data_spec,
    data_form,
    model_hints,
)


def test_text_files_are_accepted_and_other_suffixes_are_not(tmp_path):
    assert ".jsonl or .csv text file" in accepted_forms()
    for name in ("a.jsonl", "b.CSV"):
        (tmp_path / name).write_text("")
        assert check_data_spec(str(tmp_path / name)) == str(tmp_path / name)
        assert data_form(str(tmp_path / name)) == "text"
    f = tmp_path / "data.txt"
    f.write_text("1,2\n")
    with pytest.raises(DataError, match=r"data.txt.*\.txt.*Accepted"):
        load_data(str(f))


def test_options_must_apply_to_the_data(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]))
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    cases = [("builtin:digits", DataOptions(text_column="t"), "--text-column",
              "a built-in dataset"),
             (str(tmp_path / "d.npz"), DataOptions(image_size=8), "--image-size",
              "an .npz archive"),
             (str(tmp_path / "imgs"), DataOptions(label_column="y"), "--label-column",
              "an image folder")]
    for spec, options, flag, form in cases:
        with pytest.raises(DataError) as err:
            check_data_options(spec, options)
        assert str(err.value).startswith(f"{flag} applies to ")
        assert str(err.value).endswith(f", but '{spec}' is {form}; drop the option")
    check_data_options(str(tmp_path / "imgs"), DataOptions(image_size=8))  # it applies
    with pytest.raises(DataError, match="data option batch_size must be a positive integer"):
        DataOptions(batch_size=0)


def test_text_needs_a_model_directory(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a cat"}\n')
    with pytest.raises(DataError) as err:
        check_data_options(str(path), None, "zoo:lenet5", None)
    assert str(err.value).startswith(f"text data '{path}' is tokenized with the model's own "
                                     "tokenizer, and 'zoo:lenet5' is not a model directory")
    check_data_options(str(path), None)  # the model is not known yet: columns and rows only


def test_hints_from_a_model_that_is_not_hugging_face():
    zoo = types.SimpleNamespace(module=object(), input_shape=(3, 32, 32),
                                input_dtype="float32", inputs=(), input_style="tensor",
                                num_classes=10, name="zoo:resnet20")
    hints = model_hints(zoo, "zoo:resnet20")
    assert hints.image_shape == (3, 32, 32) and hints.kind == "classifier"
    assert hints.mean is None and hints.model_dir is None and hints.input_names is None
    onnx = types.SimpleNamespace(path=Path("m.onnx"), input_shape=(64,), input_dtype="int64")
    hints = model_hints(onnx, "m.onnx")
    assert hints.image_shape is None and hints.kind is None and hints.max_length is None
