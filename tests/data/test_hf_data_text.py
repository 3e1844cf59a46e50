"""Hugging Face datasets saved to disk with a text column: tokenized with the model's own
tokenizer and streamed, exactly as the same rows in a text file."""

from __future__ import annotations

import pytest
import torch
from tests.data.test_text_data import MAX_POS, reference, texts, tiny_model, write_jsonl

from slimkit.core.errors import DataError
from slimkit.data import load_data
from slimkit.data.load import DataOptions, check_data_options, model_hints

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def hints(tmp_path_factory):
    from slimkit.io.hf import load_hf_dir

    path = tiny_model(tmp_path_factory.mktemp("m") / "bert", num_labels=3)
    return model_hints(load_hf_dir(path), str(path))


def test_a_text_column_streams_as_the_same_rows_in_a_file(tmp_path, hints):
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(texts(25))]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    a = load_data(str(tmp_path / "ds"), seed=2, hints=hints, options=DataOptions(batch_size=4))
    b = load_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), seed=2, hints=hints,
                  options=DataOptions(batch_size=4))
    assert a.streaming and a.task == "classification" and a.meta["text_column"] == "text"
    for split in ("train", "test", "val"):
        pairs = list(zip(a.batches(split), b.batches(split), strict=True))
        assert pairs
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(ya, yb) and all(torch.equal(xa[k], xb[k]) for k in xb)


def test_given_splits_and_class_names(tmp_path, hints):
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos", "meh"])})
    train = [{"sentence": t, "label": i % 2} for i, t in enumerate(texts(12))]
    test = [{"sentence": t, "label": 1 - i % 2} for i, t in enumerate(texts(5))]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(train, features=features),
        "test": datasets.Dataset.from_list(test, features=features)}).save_to_disk(
        str(tmp_path / "dd"))
    spec = str(tmp_path / "dd")
    data = load_data(spec, hints=hints, options=DataOptions(text_column="sentence"))
    assert data.meta["split"] == "given" and data.meta["class_names"] == ["neg", "pos", "meh"]
    assert data.num_classes == 3
    x, y = data.head("test", 5)
    want = reference([r["sentence"] for r in test], MAX_POS)
    assert all(torch.equal(x[k], want[k]) for k in want)
    assert y.tolist() == [r["label"] for r in test]
    with pytest.raises(DataError) as err:
        check_data_options(spec, DataOptions(text_column="body"))  # from dataset_info.json
    assert str(err.value) == (f"the dataset at {spec} has no text column 'body'; its columns "
                              "are: sentence, label. Choose one with --text-column")
    with pytest.raises(DataError) as err:
        load_data(spec, hints=hints, options=DataOptions(text_column="label"))
    assert str(err.value) == (f"column 'label' of the dataset at {spec} holds int64, not text; "
                              "choose the text column with --text-column")


def test_array_columns_load_as_before_and_options_must_apply(tmp_path, hints):
    rows = {"input_ids": [[2, 5, 6, 3]] * 6, "stars": [0, 1, 2] * 2, "label": [9] * 6}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ids"))
    data = load_data(str(tmp_path / "ids"), options=DataOptions(label_column="stars"))
    assert not data.streaming and data.num_classes == 3 and data.x_train.shape[1] == 4
    with pytest.raises(DataError) as err:
        load_data(str(tmp_path / "ids"), options=DataOptions(max_length=8))
    assert str(err.value) == ("--max-length applies to text data (a .jsonl or .csv file, or a "
                              f"Hugging Face dataset's text column), but '{tmp_path / 'ids'}' "
                              "is a Hugging Face dataset without a text column; drop the option")
    unlabelled = [{"text": t} for t in texts(6)]
    datasets.Dataset.from_list(unlabelled).save_to_disk(str(tmp_path / "u"))
    with pytest.raises(DataError, match=r"is a classifier, but the dataset at .* has no label "
                                        r"column"):
        load_data(str(tmp_path / "u"), hints=hints)
