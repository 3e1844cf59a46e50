"""A Hugging Face model's tokenizer travels with its artifact, and is not counted as model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimkit.core.errors import ModelLoadError
from slimkit.core.files import dir_size
from slimkit.io.artifact import HF_ASSETS, load_artifact, model_bytes, save_artifact
from slimkit.io.loader import load_model

transformers = pytest.importorskip("transformers")

from tests.data.test_text_data import tiny_model  # noqa: E402


def test_tokenizer_files_are_copied_checksummed_and_usable(tmp_path: Path):
    source = tiny_model(tmp_path / "hf")
    model = load_model(str(source))
    art = save_artifact(model, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    carried = [n for n in HF_ASSETS if (source / n).is_file()]
    assert carried and manifest["assets"] == carried
    for name in carried:
        assert (art / name).read_bytes() == (source / name).read_bytes()
        assert name in manifest["files"]  # checksummed like the weights
    text = "the cat sat on the mat"
    ids = transformers.AutoTokenizer.from_pretrained(str(art))(text)["input_ids"]
    assert ids == transformers.AutoTokenizer.from_pretrained(str(source))(text)["input_ids"]
    # the model bytes leave the tokenizer out: sizes compare models, not vocabularies
    assets = sum((art / n).stat().st_size for n in carried)
    assert model_bytes(art) == dir_size(art) - assets
    # a reloaded artifact carries them on to the next one
    again = save_artifact(load_artifact(art), tmp_path / "again")
    assert json.loads((again / "manifest.json").read_text())["assets"] == carried
    x = {"input_ids": torch.tensor([ids])}
    torch.testing.assert_close(load_artifact(again).module(**x).logits,
                               model.module(**x).logits, rtol=0, atol=0)


def test_a_modified_tokenizer_fails_the_checksum(tmp_path: Path):
    art = save_artifact(load_model(str(tiny_model(tmp_path / "hf"))), tmp_path / "art")
    (art / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="checksum mismatch for '.*tokenizer.json'"):
        load_artifact(art)


def test_models_without_a_source_folder_carry_nothing(tmp_path: Path, mlp):
    art = save_artifact(mlp, tmp_path / "art")
    assert "assets" not in json.loads((art / "manifest.json").read_text())
    assert model_bytes(art) == dir_size(art)
