"""Hugging Face model directories, built from configs with random weights (no network)."""

import ast
from pathlib import Path

import pytest
import torch

import slimkit.io.hf
from slimkit.core.errors import UntrustedPickleError
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io import batch as B
from slimkit.io.loader import load_model

transformers = pytest.importorskip("transformers")


def _bert_dir(tmp_path: Path, safe: bool = True) -> Path:
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    path = tmp_path / ("bert" if safe else "bert-bin")
    model.save_pretrained(path)
    if not safe:  # the legacy layout: weights as a pickled state dict
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def test_bert_directory_loads_offline_and_exports(tmp_path: Path):
    path = _bert_dir(tmp_path)
    model = load_model(str(path))
    # As it comes: named inputs of a dynamic sequence length, the ModelOutput's logits judged.
    assert isinstance(model.module, transformers.BertForSequenceClassification)
    assert [s.name for s in model.input_specs] == ["input_ids", "attention_mask",
                                                   "token_type_ids"]
    assert model.input_style == "dict" and model.output == "logits" and model.num_classes == 3
    ids = torch.randint(0, 100, (3, 16))
    mask = (torch.arange(16) < torch.tensor([[16], [9], [4]])).long()  # padded rows
    x = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        out = B.select(B.call(model.module, x), model.output)
        alone = model.module(input_ids=ids[2:, :4]).logits  # row 2 without its padding
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    torch.testing.assert_close(out[2:], alone, atol=1e-5, rtol=0)
    onnx_path = export_onnx(model, tmp_path / "bert.onnx")
    # Exported at the example's length 64, run at 16: the sequence axis stays dynamic.
    parity = check_parity(model, onnx_path, x, atol=1e-4)
    assert parity["ok"] and list(parity["outputs"]) == ["logits"], parity


def test_pickled_bin_weights_need_trust(tmp_path: Path):
    path = _bert_dir(tmp_path, safe=False)
    assert not list(path.glob("*.safetensors"))
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        load_model(str(path))
    assert load_model(str(path), trust_pickle=True).num_classes == 3


def test_io_hf_imports_nothing_above_io():
    # Syncing a pruned model's config needs the graph and the slicer: it lives in
    # slimkit.prune.hf_config, so loading stays below them.
    tree = ast.parse(Path(slimkit.io.hf.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    slimkit_mods = {m for m in imported if m and m.startswith("slimkit")}
    assert slimkit_mods and all(m.startswith(("slimkit.core", "slimkit.io")) for m in slimkit_mods)
    assert not hasattr(slimkit.io.hf, "sync_hf_config")


def test_a_vision_model_whose_config_has_no_image_size_wraps_as_it_comes():
    import slimkit

    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=3)
    torch.manual_seed(0)
    model = slimkit.wrap(transformers.ResNetForImageClassification(config).eval())
    assert [s.name for s in model.input_specs] == ["pixel_values"]
    assert model.input_specs[0].shape == (3, 224, 224) and model.output == "logits"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert B.select(B.call(model.module, {"pixel_values": x}), "logits").shape == (2, 3)
