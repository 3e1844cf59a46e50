"""Structured pruning that keeps a transformers model loadable (``hf_loadable``, default auto).

References: ``save_pretrained`` then ``from_pretrained`` of the class itself (strict: no
missing, unexpected or mismatched tensors) gives the pruned model's outputs in float64 on
padded dict inputs; the pruned BERT equals the original with the removed FFN channels zeroed
(float64); ``hf_loadable: false`` is the free pruning of before (hidden size pruned, the
config does not rebuild it, the artifact does).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tests.prune._structured_models import eval_out, n_params
from torch import nn

from slimkit.api import wrap
from slimkit.core.stages import StageContext
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.model import SlimModel
from slimkit.prune.allocate import AllocRequest, tie_counts
from slimkit.prune.structured import StructuredPruneConfig, structured_prune

transformers = pytest.importorskip("transformers")

TOKENS = {"input_ids": torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0)),
          "attention_mask": torch.tensor([[1] * 10, [1] * 6 + [0] * 4])}
PIXELS = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64}


def _larger(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init, so that errors show
            p.normal_(0, 0.3)
    return model.eval()


def _bert() -> nn.Module:
    return _larger(transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, max_position_embeddings=32, num_labels=3, **TINY)))


def _gpt2() -> nn.Module:
    return _larger(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
        eos_token_id=0)))


def _vit() -> nn.Module:
    return _larger(transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=8, num_labels=3, **TINY)))


def _prune(model: nn.Module, **cfg: object) -> tuple[SlimModel, object]:
    return structured_prune(wrap(model), StructuredPruneConfig(**cfg), StageContext())


def _reloaded(module: nn.Module, path: Path) -> nn.Module:
    """``from_pretrained`` of the saved directory, asserting a strict load."""
    module.save_pretrained(path)
    back, info = type(module).from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                     "error_msgs")), info
    return back.eval()


def _same_outputs(pruned: nn.Module, back: nn.Module, x: dict, field: str = "logits") -> None:
    a = getattr(eval_out(copy.deepcopy(pruned).double(), x), field)
    b = getattr(eval_out(back.double(), x), field)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("make, x, cfg", [
    (_bert, TOKENS, {"ratio": 0.5}),
    (_gpt2, TOKENS, {"ratio": 0.5}),
    (_vit, PIXELS, {"ratio": 0.5}),
    (_bert, TOKENS, {"target": {"flops": 0.7}}),
], ids=["bert", "gpt2", "vit", "bert_flops"])
def test_save_pretrained_reloads_the_pruned_model(make, x, cfg, tmp_path: Path):
    model = make()
    out, rec = _prune(model, **cfg)
    back = _reloaded(out.module, tmp_path)
    assert n_params(back) == n_params(out.module) < n_params(model)
    _same_outputs(out.module, back, x)
    assert all(r["rebuilds"] for r in rec.details["hf_config"].values())
    assert not [s for s in rec.skipped if s["what"].startswith("hf_loadable")]
    if "target" in cfg:
        assert rec.details["target"]["reached"]


def test_bert_prunes_the_ffn_uniformly_and_says_what_it_keeps(tmp_path: Path):
    model = _bert()
    out, rec = _prune(model, ratio=0.5)
    cfg = out.module.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (32, 4, 32)
    assert "config.intermediate_size: 64 -> 32" in rec.changed
    for layer in out.module.bert.encoder.layer:
        assert layer.intermediate.dense.out_features == 32
        assert layer.attention.self.query.out_features == 32
    why = {s["what"]: s["why"] for s in rec.skipped}
    heads = [w for k, w in why.items() if "attention.self.query" in k]
    assert len(heads) == 2 and all("no config.pruned_heads" in w for w in heads)
    hidden = [w for w in why.values() if w.startswith("hidden size kept")]
    assert len(hidden) == 2  # the residual stream and the pooler
    assert all("one hidden size tied to heads x head size" in w for w in hidden)
    assert rec.details["plans"][0]["hf_loadable"] == [""]


def test_bert_equals_the_original_with_the_removed_ffn_channels_zeroed():
    model = _bert().double()
    out, rec = _prune(model, ratio=0.5)
    ref = copy.deepcopy(model)
    for pg in rec.details["plans"][0]["groups"]:
        gone = [c for c in range(pg["size"]) if c not in pg["keep"]]
        dense = dict(ref.named_modules())[pg["root"]]
        with torch.no_grad():  # gelu(0) = 0: a zeroed FFN channel adds nothing
            dense.weight[gone] = 0
            dense.bias[gone] = 0
    torch.testing.assert_close(eval_out(out.module, TOKENS).logits, eval_out(ref, TOKENS).logits,
                               rtol=1e-12, atol=1e-12)


def test_gpt2_keeps_its_fused_heads_and_prunes_the_mlp_with_n_inner(tmp_path: Path):
    out, rec = _prune(_gpt2(), ratio=0.5)
    cfg = out.module.config
    assert (cfg.n_embd, cfg.n_head, cfg.n_inner) == (32, 4, 64)
    for block in out.module.transformer.h:
        assert (block.attn.c_attn.nf, block.attn.split_size, block.mlp.c_fc.nf) == (96, 32, 64)
    why = [s["why"] for s in rec.skipped if "c_attn" in s["what"]]
    assert why and all("no config.pruned_heads" in w for w in why)


def test_vit_prunes_whole_heads_uniformly_with_config_head_dim(tmp_path: Path):
    out, rec = _prune(_vit(), ratio=0.5)
    cfg = out.module.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim) == (32, 2, 8)
    assert cfg.intermediate_size < 64
    assert not [s for s in rec.skipped if s["what"] == "config head size"]
    back = _reloaded(out.module, tmp_path)
    assert back.config.num_attention_heads == 2
    q = [m for n, m in back.named_modules() if n.endswith("q_proj")]
    assert len(q) == 2 and all(m.out_features == 16 for m in q)


def test_two_steps_stay_loadable(tmp_path: Path):
    """The second step probes the config the first step left unsynced; widths stay uniform."""
    out, rec = _prune(_bert(), ratio=0.6, steps=2)
    assert len(rec.details["plans"]) == 2
    _same_outputs(out.module, _reloaded(out.module, tmp_path), TOKENS)
    assert out.module.config.intermediate_size < 64


def test_artifact_still_replays_the_plan(tmp_path: Path):
    out, _ = _prune(_bert(), ratio=0.5)
    save_artifact(out, tmp_path / "bert")
    back = load_artifact(tmp_path / "bert").module
    _same_outputs(out.module, back, TOKENS)


def test_residual_branches_are_kept_with_the_reason():
    out, rec = _prune(_bert(), ratio=0.3, blocks=0.5)
    assert rec.details["blocks"]["removed"] == 0
    kept = [s for s in rec.skipped if s["what"].startswith("block ")]
    assert kept and all("num_hidden_layers" in s["why"] for s in kept)


def test_off_is_the_free_pruning_of_before(tmp_path: Path):
    model = _bert()
    out, rec = _prune(model, ratio=0.5, hf_loadable=False)
    assert out.module.bert.embeddings.word_embeddings.embedding_dim < 32  # hidden pruned
    assert "hf_loadable" not in rec.details["plans"][0]
    assert rec.details["hf_config"][""]["rebuilds"] is False
    out.module.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # built at hidden 20
        type(model).from_pretrained(tmp_path)
    _same_outputs(out.module, load_artifact(_saved(out, tmp_path / "a")).module, TOKENS)


def _saved(model: SlimModel, path: Path) -> Path:
    save_artifact(model, path)
    return path


def _resnet() -> nn.Module:
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
        layer_type="basic")).eval()


def test_auto_leaves_a_config_without_prunable_widths_to_free_pruning():
    """A transformers CNN: no key sets a width alone; auto prunes it as any model, with a note,
    and true keeps every channel inside it."""
    x = {"pixel_values": torch.randn(2, 3, 16, 16)}
    model = _resnet()
    out, rec = structured_prune(wrap(model, x), StructuredPruneConfig(ratio=0.5),
                                StageContext())
    assert n_params(out.module) < n_params(model)
    [note] = [s for s in rec.skipped if s["what"] == "hf_loadable (ResNetForImageClassification)"]
    assert note["why"].startswith("auto: no key of its config")
    kept, rec = structured_prune(wrap(model, x), StructuredPruneConfig(
        ratio=0.5, hf_loadable=True), StageContext())
    assert n_params(kept.module) == n_params(model)
    assert rec.details["hf_config"][""]["rebuilds"]


def test_tie_counts_keep_one_rounded_count():
    req = AllocRequest({0: 64, 1: 64, 2: 8}, {}, 0.5, round_to=8)
    assert tie_counts({0: 30, 1: 44, 2: 5}, [[0, 1]], req) == {0: 40, 1: 40, 2: 5}
    assert tie_counts({0: 30, 1: 34, 2: 5}, [], req) == {0: 30, 1: 34, 2: 5}


def test_config_rejects_other_values():
    with pytest.raises(ValueError, match="hf_loadable"):
        StructuredPruneConfig(ratio=0.5, hf_loadable="sometimes")


def test_one_layer_of_a_shared_width_is_not_pruned_alone():
    """include names one layer's FFN: intermediate_size sets every layer's, so none shrinks."""
    out, rec = _prune(_bert(), ratio=0.5, include=["bert.encoder.layer.0.intermediate.dense"])
    assert out.module.config.intermediate_size == 64
    assert rec.details["params"]["after"] == rec.details["params"]["before"]
    [why] = [s["why"] for s in rec.skipped if "layer.0.intermediate" in s["what"]]
    assert "sets this width in every layer at once" in why and "layer.1" in why
