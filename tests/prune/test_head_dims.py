"""Head-dimension pruning (``attention: head_dims``) and Hugging Face config sync.

References: the pruned model against the ORIGINAL model with the removed q/k/v rows zeroed
(same softmax scale 1/sqrt(original head size)), ratio 0 as the identity, plan JSON replayed on
a fresh model and through the artifact rebuilder, ONNX Runtime against PyTorch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tests._stages import stage_on
from tests.prune._structured_models import ConvNet, eval_out, init_bn, n_params
from torch import nn

from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.model import SlimModel
from slimkit.io.transforms import replay_transforms
from slimkit.prune.structured import (
    StructuredPruneConfig,
    apply_structured,
    plan_structured,
    structured_prune,
)
from slimkit.zoo import build_model

ATTN_ONLY = [r"re:.*attn\..*"]
X = (torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("vit", (3, 8, 8), 10, dim=32, depth=2, heads=4).eval()
    for p in model.parameters():  # larger weights than the init, so that errors show
        p.data.normal_(0, 0.3)
    return model


def _zeroed(model: nn.Module, plan: dict, attn_of, head_size: int, heads: int,
            projections: tuple[str, str, str]) -> nn.Module:
    """The original model with the planned-away inner positions of q, k, v set to zero."""
    ref = copy.deepcopy(model)
    for pg in plan["groups"]:
        (module,) = pg["head_dims"]
        attn = attn_of(ref, module)
        gone = [j for j in range(head_size) if j not in pg["keep"]]
        rows = [h * head_size + j for h in range(heads) for j in gone]
        with torch.no_grad():
            for name in projections:
                getattr(attn, name).weight[rows] = 0
                getattr(attn, name).bias[rows] = 0
    return ref


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def test_ratio_zero_changes_nothing():
    model = _vit()
    plan = plan_structured(model, StructuredPruneConfig(ratio=0.0, attention="head_dims"),
                           example_inputs=X)
    assert plan["slices"] == {} and plan["head_dims"] == {} and plan["scale"] == {}
    torch.testing.assert_close(eval_out(apply_structured(model, plan), X), eval_out(model, X),
                               rtol=0, atol=0)


def test_zoo_vit_head_dims_equal_the_zeroed_original_with_the_original_scale():
    model = _vit().double()
    x = (X[0].double(),)
    plan = plan_structured(model, StructuredPruneConfig(
        ratio=0.5, attention="head_dims", allocation="uniform", include=ATTN_ONLY),
        example_inputs=x)
    assert [(g["size"], len(g["keep"]), g["heads"]) for g in plan["groups"]] == [(8, 4, [])] * 2
    assert plan["head_dims"] == {"blocks.0.attn": 4, "blocks.1.attn": 4}
    small = apply_structured(model, plan)
    for i in range(2):
        attn = small.blocks[i].attn
        assert attn.num_heads == 4  # every head stays, each one 8 -> 4 wide
        assert attn.q.weight.shape == attn.k.weight.shape == attn.v.weight.shape == (16, 32)
        assert attn.out.weight.shape == (32, 16)
        keep = plan["groups"][i]["keep"]
        rows = [h * 8 + j for h in range(4) for j in keep]
        torch.testing.assert_close(attn.v.weight, model.blocks[i].attn.v.weight[rows])
        torch.testing.assert_close(attn.out.weight, model.blocks[i].attn.out.weight[:, rows])
    ref = _zeroed(model, plan, _module, 8, 4, ("q", "k", "v"))
    torch.testing.assert_close(eval_out(small, x), eval_out(ref, x), rtol=0, atol=1e-5)
    assert (eval_out(small, x) - eval_out(model, x)).abs().max() > 1e-3  # pruning did change it


def test_zoo_vit_head_dims_prune_export_and_replay(tmp_path: Path):
    model = _vit()
    slim = SlimModel(module=model, input_shape=(3, 8, 8), input_dtype="float32", name="vit",
                     arch=None)
    small, rec = stage_on(structured_prune, model,
                          StructuredPruneConfig(ratio=0.4, attention="head_dims"),
                          example_inputs=X)
    out = eval_out(small, X)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert n_params(small) < 0.8 * n_params(model) and rec.details["params"]["after"] == \
        n_params(small)
    attn = small.blocks[0].attn
    assert attn.num_heads == 4 and attn.q.out_features % 4 == 0 and attn.q.out_features < 32
    assert attn.q.out_features == attn.k.out_features == attn.v.out_features == \
        attn.out.in_features
    plan = json.loads(json.dumps(rec.details["plans"][0]))
    torch.testing.assert_close(eval_out(apply_structured(_vit(), plan), X), out, rtol=0, atol=1e-6)
    # artifact loading: a fresh build, the plan replayed, then the saved weights
    fresh = replay_transforms(build_model("vit", (3, 8, 8), 10, dim=32, depth=2, heads=4), [
        {"kind": "structured_prune", "owner": "slimkit.prune.structured", "plan": plan}])
    fresh.load_state_dict(small.state_dict())
    torch.testing.assert_close(eval_out(fresh, X), out, rtol=0, atol=1e-6)
    path = export_onnx(slim.copy(small), tmp_path / "vit.onnx")
    parity = check_parity(slim.copy(small), path, X, atol=1e-4)
    assert parity["ok"], parity


def test_head_dims_round_to_keeps_multiples():
    plan = plan_structured(_vit(), StructuredPruneConfig(
        ratio=0.6, attention="head_dims", allocation="uniform", include=ATTN_ONLY, round_to=2),
        example_inputs=X)
    assert all(len(g["keep"]) % 2 == 0 and len(g["keep"]) < 8 for g in plan["groups"])


def test_head_dims_on_a_model_without_attention_is_reported_not_silent():
    torch.manual_seed(0)
    net = init_bn(ConvNet())
    small, rec = stage_on(structured_prune, net,
                          StructuredPruneConfig(ratio=0.5, attention="head_dims"),
                          example_inputs=X)
    (note,) = [s for s in rec.skipped if s["what"] == "attention head_dims"]
    assert "no attention head split" in note["why"]
    _, same = stage_on(structured_prune, net, StructuredPruneConfig(ratio=0.5), example_inputs=X)
    assert rec.details["plans"][0]["slices"] == same.details["plans"][0]["slices"]  # as 'heads'
    assert small.conv1.out_channels < 16


def test_unknown_attention_mode_is_rejected():
    with pytest.raises(ValidationError, match="attention"):
        StructuredPruneConfig(ratio=0.5, attention="dims")


# ---- Hugging Face BERT (tiny, random weights) ----

def _bert(layers: int = 2) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from slimkit.io.hf import HFLogits

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32, num_labels=5)
    return HFLogits(transformers.BertForSequenceClassification(cfg), "input_ids").eval()


TOKENS = (torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)),)


def _rebuilds_from_config(small: nn.Module, x: tuple[torch.Tensor, ...]) -> None:
    """The synced config alone builds the pruned architecture: strict load, same outputs."""
    rebuilt = type(small.model)(small.model.config).eval()
    rebuilt.load_state_dict(small.model.state_dict(), strict=True)
    torch.testing.assert_close(eval_out(rebuilt, x).logits, eval_out(small, x), rtol=0, atol=1e-6)


def _bert_self(model: nn.Module, name: str) -> nn.Module:
    return _module(model, name)


def test_bert_head_dims_match_the_zeroed_original_and_keep_the_scale():
    model = _bert()
    plan = plan_structured(model, StructuredPruneConfig(
        ratio=0.5, attention="head_dims", allocation="uniform", hf_loadable=False,
        include=[r"re:.*attention\.self\..*"]), example_inputs=TOKENS)
    # `scaling` = 1/sqrt(head size) follows the size (as a model rebuilt from the config would
    # compute it); the query rows carry the difference, so q.k keeps its 1/sqrt(8)
    query = "model.bert.encoder.layer.{}.attention.self.query.{}"
    assert plan["scale"] == {query.format(i, p): pytest.approx(0.5 ** 0.5)
                             for i in range(2) for p in ("weight", "bias")}
    small = apply_structured(model, plan)
    for layer in small.model.bert.encoder.layer:
        attn = layer.attention.self
        assert (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == \
            (4, 4, 16)
        assert attn.scaling == pytest.approx(4 ** -0.5)
        assert attn.query.weight.shape == (16, 32)
        assert layer.attention.output.dense.weight.shape == (32, 16)
    ref = _zeroed(model, plan, _bert_self, 8, 4, ("query", "key", "value"))
    torch.testing.assert_close(eval_out(small, TOKENS), eval_out(ref, TOKENS), rtol=0, atol=1e-5)


def test_bert_head_dims_config_sync_and_onnx(tmp_path: Path):
    model = _bert()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        ratio=0.5, attention="head_dims", allocation="uniform", hf_loadable=False),
        example_inputs=TOKENS)
    out = eval_out(small, TOKENS)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert n_params(small) < 0.5 * n_params(model)
    cfg = small.model.config
    attn = small.model.bert.encoder.layer[0].attention.self
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (16, 32, 4)
    assert attn.attention_head_size == 4 == cfg.hidden_size // cfg.num_attention_heads
    assert "config.hidden_size: 32 -> 16" in rec.changed
    assert model.model.config.hidden_size == 32  # the input model's config is untouched
    _rebuilds_from_config(small, TOKENS)
    slim = SlimModel(module=small, input_shape=(16,), input_dtype="int64", name="bert",
                     arch={"kwargs": {"vocab_size": 100}})
    path = export_onnx(slim, tmp_path / "bert.onnx")
    parity = check_parity(slim, path, slim.example_inputs(3, seed=2), atol=1e-4)
    assert parity["ok"], parity


def test_bert_config_says_what_it_cannot_express():
    model = _bert()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        ratio=0.5, attention="head_dims", allocation="uniform", hf_loadable=False,
        include=[r"re:.*attention\.self\..*"]), example_inputs=TOKENS)
    cfg = small.model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim) == (32, 4, 4)
    (note,) = [s for s in rec.skipped if s["what"] == "config head size"]
    assert "hidden_size / num_attention_heads = 8" in note["why"]


def test_bert_heads_config_sync_uniform_and_per_layer():
    model = _bert()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        ratio=0.5, allocation="uniform", hf_loadable=False), example_inputs=TOKENS)
    cfg = small.model.config
    assert (cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size) == (2, 16, 32)
    assert "config.num_attention_heads: 4 -> 2" in rec.changed
    # per-layer FFN widths: one layer's FFN only, the config cannot say it
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        ratio=0.5, allocation="uniform", hf_loadable=False,
        include=["model.bert.encoder.layer.0.intermediate.dense"]),
        example_inputs=TOKENS)
    assert small.model.config.intermediate_size == 64
    (note,) = [s for s in rec.skipped if s["what"] == "config.intermediate_size"]
    assert "layers differ" in note["why"] and "32" in note["why"] and "64" in note["why"]


def test_hf_vit_head_dims_config_head_dim_rebuilds_the_pruned_model():
    transformers = pytest.importorskip("transformers")
    from slimkit.io.hf import HFLogits

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, num_labels=5)
    model = HFLogits(transformers.ViTForImageClassification(cfg), "pixel_values").eval()
    x = (torch.randn(2, 3, 16, 16),)
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        ratio=0.5, attention="head_dims", allocation="uniform",
        include=[r"re:.*attention\.[qkvo]_proj"]), example_inputs=x)
    attn = small.model.vit.layers[0].attention
    assert (attn.head_dim, attn.num_attention_heads, attn.q_proj.out_features) == (4, 4, 16)
    assert attn.scaling == pytest.approx(4 ** -0.5)
    assert "config.head_dim: None -> 4" in rec.changed
    _rebuilds_from_config(small, x)


def test_artifact_round_trip_of_two_head_dims_steps(tmp_path: Path):
    from slimkit.io.artifact import load_artifact, save_artifact
    from slimkit.io.loader import load_zoo

    model = load_zoo("vit", input_shape=(3, 8, 8), num_classes=10, dim=32, depth=1)
    x = model.example_inputs(3)
    out, rec = structured_prune(model, StructuredPruneConfig(
        ratio=0.5, steps=2, attention="head_dims", allocation="uniform", include=ATTN_ONLY))
    small = out.module
    assert [p["head_dims"] for p in rec.details["plans"]] == [{"blocks.0.attn": 6},
                                                             {"blocks.0.attn": 4}]
    overall = {"groups": [{"head_dims": ["blocks.0.attn"], "keep": _kept_overall(rec)}]}
    ref = _zeroed(model.module, overall, _module, 8, 4, ("q", "k", "v"))
    torch.testing.assert_close(eval_out(small, x), eval_out(ref, x), rtol=0, atol=1e-5)
    save_artifact(out, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    torch.testing.assert_close(eval_out(back.module, x), eval_out(small, x), rtol=0, atol=0)


def _kept_overall(rec) -> list[int]:
    """Original inner positions left after every step (later steps index the survivors)."""
    kept = list(range(8))
    for plan in rec.details["plans"]:
        kept = [kept[i] for i in plan["groups"][0]["keep"]]
    return kept
