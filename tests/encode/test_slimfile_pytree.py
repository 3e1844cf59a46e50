"""A .slim file of a model with several inputs and outputs keeps what it takes (every input,
how they are passed) and which output is judged; a single-tensor model's manifest is as it was."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from torch import nn

from slimkit.api import wrap
from slimkit.core.errors import ModelLoadError
from slimkit.encode import EncodeConfig, pack, pack_bytes, unpack
from slimkit.encode.slimfile import HEADER
from slimkit.io import batch as B
from slimkit.io.model import SlimModel


class MaskedText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.ff = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        h = torch.relu(self.ff(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return {"pooled": pooled, "logits": self.head(pooled)}


def _manifest(blob: bytes) -> dict:
    length = HEADER.unpack_from(blob)[3]
    return json.loads(zlib.decompress(blob[HEADER.size:HEADER.size + length]))


@pytest.fixture
def text() -> SlimModel:
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (2, 9))
    return wrap(MaskedText().eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                output="logits", dynamic_axes={"input_ids": {1: "sequence"},
                                               "attention_mask": {1: "sequence"}})


def test_inputs_style_and_judged_output_round_trip(text, tmp_path):
    path = tmp_path / "text.slim"
    pack(text, path, EncodeConfig(fc_bits=4))
    loaded = unpack(path, template=text.module)
    assert loaded.inputs == text.inputs and loaded.input_style == "dict"
    assert loaded.output == "logits"
    x = loaded.example_inputs(3)
    assert isinstance(x, dict) and set(x) == {"input_ids", "attention_mask"}
    out = B.flatten(B.call(loaded.module, x))
    assert list(out) == ["pooled", "logits"] and out["logits"].shape == (3, 5)


def test_a_single_tensor_models_input_spec_is_unchanged():
    torch.manual_seed(0)
    model = SlimModel(module=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
                      input_shape=(4,))
    blob, _ = pack_bytes(model)
    assert _manifest(blob)["input_spec"] == {"shape": [4], "dtype": "float32"}


@pytest.mark.parametrize(("edit", "pattern"), [
    ({"style": "kwargs"}, "input_spec.style"),
    ({"inputs": [{"name": "x"}]}, "input_spec.inputs[0]"),
    ({"inputs": [{"name": "x", "dtype": "int64", "shape": [-1]}]}, "input_spec.inputs[0].shape"),
    ({"output": 3}, "input_spec.output"),
])
def test_a_malformed_input_spec_is_refused(text, tmp_path, monkeypatch, edit, pattern):
    real = SlimModel.input_spec
    monkeypatch.setattr(SlimModel, "input_spec", lambda m: {**real(m), **edit})
    path = tmp_path / "bad.slim"
    pack(text, path)
    with pytest.raises(ModelLoadError, match=pattern.replace("[", r"\[").replace("]", r"\]")):
        unpack(path, template=text.module)


def test_a_hugging_face_model_unpacks_alone_with_its_structural_changes(tmp_path):
    """A transformers model records its class and config: the file rebuilds it without a
    template, replaying the factorized layers of a lowrank stage."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    from slimkit.core.stages import StageContext
    from slimkit.lowrank import LowRankConfig, lowrank

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, num_labels=3,
                        max_position_embeddings=16)
    ids = torch.randint(0, 30, (2, 8))
    model = wrap(BertForSequenceClassification(config).eval(),
                 {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, output="logits")
    if not (model.arch and "hf" in model.arch):
        pytest.skip("this slimkit does not record Hugging Face architectures")
    cfg = LowRankConfig(rank="ratio", ratio=0.5,
                        include=["bert.encoder.layer.0.intermediate.dense"])
    small, record = lowrank(model, cfg, StageContext(progress=False))
    assert record.details["layers"]  # the structure changed
    path = tmp_path / "bert.slim"
    pack(small, path, EncodeConfig(fc_bits=4))
    loaded = unpack(path)
    assert loaded.output == "logits" and loaded.input_style == "dict"
    x = loaded.example_inputs(2)
    with torch.no_grad():
        want = B.select(B.call(unpack(path, template=small.module).module, x))
        assert torch.equal(B.select(B.call(loaded.module, x)), want)
