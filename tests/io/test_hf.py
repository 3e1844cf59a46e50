"""Hugging Face model directories, built from configs with random weights (no network)."""

import ast
from pathlib import Path

import pytest
import torch

import slimkit.io.hf
from slimkit.core.errors import UntrustedPickleError
from slimkit.export.onnx import check_parity, export_onnx
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
    assert model.input_dtype == "int64" and model.num_classes == 3
    x = torch.randint(0, 100, (2, 16))
    model.input_shape = (16,)
    with torch.no_grad():
        out = model.module(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    onnx_path = export_onnx(model, tmp_path / "bert.onnx")
    assert check_parity(model, onnx_path, (x,), atol=1e-4)["ok"]


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
