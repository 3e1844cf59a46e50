"""Structured pruning of Hugging Face GPT-2: ``Conv1D`` layers (a Linear with weight [in, out]),
the fused q/k/v projection ``c_attn`` split into heads, the LM head tied to the embeddings.

References: the pruned model against the ORIGINAL model with the removed channels zeroed, in
float64; the saved artifact reloaded (a fresh model built from the config, the plan replayed)
bit for bit; the synced config rebuilding the pruned model on its own.
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
from slimkit.prune.structured import (
    StructuredPruneConfig,
    apply_structured,
    plan_structured,
    structured_prune,
)

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, HEAD_DIM, INNER, LAYERS = 32, 4, 8, 128, 2
GEN = torch.Generator().manual_seed(0)
TOKENS = {"input_ids": torch.randint(0, 50, (2, 12), generator=GEN),
          "attention_mask": torch.tensor([[1] * 12, [1] * 9 + [0] * 3])}


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                  n_positions=32, bos_token_id=0, eos_token_id=0,
                                  use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init, so that errors show
            p.normal_(0, 0.3)
    return model


def _logits(model: nn.Module, x: dict = TOKENS) -> torch.Tensor:
    return eval_out(model, x).logits


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def _zero_rows(model: nn.Module, plan: dict, proj: str, width: int) -> nn.Module:
    """``model`` with the input rows of ``proj`` (a Conv1D, weight [in, out]) that the planned
    channels away fed set to zero: each removed channel then contributes nothing."""
    ref = copy.deepcopy(model)
    for pg in plan["groups"]:
        block = pg["root"].rsplit(".", 2)[0]  # transformer.h.<i>
        gone = [c for c in range(pg["size"]) if c not in pg["keep"]]
        rows = [c * width + j for c in gone for j in range(width)]
        with torch.no_grad():
            _module(ref, f"{block}.{proj}").weight[rows] = 0
    return ref


def test_mlp_channels_match_the_zeroed_original_in_float64():
    model = _gpt2().double()
    plan = plan_structured(model, StructuredPruneConfig(
        ratio=0.5, allocation="uniform", include=[r"re:.*mlp\.c_fc"]), example_inputs=TOKENS)
    assert [(g["root"], g["size"], len(g["keep"])) for g in plan["groups"]] == \
        [(f"transformer.h.{i}.mlp.c_fc", INNER, INNER // 2) for i in range(LAYERS)]
    small = apply_structured(model, plan)
    for i, pg in enumerate(plan["groups"]):
        mlp, old = small.transformer.h[i].mlp, model.transformer.h[i].mlp
        assert (mlp.c_fc.nx, mlp.c_fc.nf, mlp.c_proj.nx, mlp.c_proj.nf) == \
            (HIDDEN, INNER // 2, INNER // 2, HIDDEN)
        torch.testing.assert_close(mlp.c_fc.weight, old.c_fc.weight[:, pg["keep"]], rtol=0, atol=0)
        torch.testing.assert_close(mlp.c_fc.bias, old.c_fc.bias[pg["keep"]], rtol=0, atol=0)
        torch.testing.assert_close(mlp.c_proj.weight, old.c_proj.weight[pg["keep"]], rtol=0,
                                   atol=0)
    ref = _zero_rows(model, plan, "mlp.c_proj", 1)
    torch.testing.assert_close(_logits(small), _logits(ref), rtol=0, atol=1e-10)
    assert (_logits(small) - _logits(model)).abs().max() > 1e-3  # pruning did change it


def test_whole_heads_of_the_fused_qkv_match_the_zeroed_original_in_float64():
    model = _gpt2().double()
    plan = plan_structured(model, StructuredPruneConfig(
        ratio=0.5, allocation="uniform", include=[r"re:.*attn\.c_attn"], hf_loadable=False),
        example_inputs=TOKENS)
    assert [(g["root"], g["size"], len(g["keep"]), g["heads"]) for g in plan["groups"]] == \
        [(f"transformer.h.{i}.attn.c_attn", HEADS, 2, [f"transformer.h.{i}.attn"])
         for i in range(LAYERS)]
    small = apply_structured(model, plan)
    for i, pg in enumerate(plan["groups"]):
        attn, old = small.transformer.h[i].attn, model.transformer.h[i].attn
        assert (attn.num_heads, attn.head_dim, attn.split_size) == (2, HEAD_DIM, 2 * HEAD_DIM)
        assert attn.c_attn.weight.shape == (HIDDEN, 3 * 2 * HEAD_DIM)
        assert attn.c_proj.weight.shape == (2 * HEAD_DIM, HIDDEN)
        # the same heads go from q, k and v: columns piece * HIDDEN + head * HEAD_DIM + j
        cols = [p * HIDDEN + h * HEAD_DIM + j for p in range(3) for h in pg["keep"]
                for j in range(HEAD_DIM)]
        torch.testing.assert_close(attn.c_attn.weight, old.c_attn.weight[:, cols], rtol=0,
                                   atol=0)
    ref = _zero_rows(model, plan, "attn.c_proj", HEAD_DIM)
    torch.testing.assert_close(_logits(small), _logits(ref), rtol=0, atol=1e-10)
    assert (_logits(small) - _logits(model)).abs().max() > 1e-3


def test_mlp_pruned_config_rebuilds_the_pruned_model_on_its_own():
    model = _gpt2()
    out, rec = structured_prune(wrap(model), StructuredPruneConfig(
        ratio=0.5, allocation="uniform", include=[r"re:.*mlp\.c_fc"]), StageContext())
    small = out.module
    assert small.config.n_inner == INNER // 2 and model.config.n_inner is None
    assert f"config.n_inner: None -> {INNER // 2}" in rec.changed
    assert "transformer.h.0.mlp.c_fc: [128, 32] -> [64, 32] (out, in) channels" in rec.changed
    rebuilt = type(small)(small.config).eval()
    rebuilt.load_state_dict(small.state_dict(), strict=True)
    torch.testing.assert_close(_logits(rebuilt), _logits(small), rtol=0, atol=0)


def test_a_pruned_hidden_size_writes_out_the_default_ffn_width():
    hidden = "transformer.h.0.attn.c_proj"  # the hidden group's root (out = weight dim 1)
    out, rec = structured_prune(wrap(_gpt2()), StructuredPruneConfig(
        ratio=0.5, allocation="uniform", include=[hidden], hf_loadable=False), StageContext())
    cfg = out.module.config
    assert cfg.n_embd == HIDDEN // 2
    assert cfg.n_inner == INNER  # 4 x the ORIGINAL hidden size: the MLP kept its width
    assert f"config.n_inner: None -> {INNER}" in rec.changed


def test_stage_prunes_hidden_heads_and_mlp_keeps_the_tied_lm_head_and_reloads_bit_for_bit(
        tmp_path: Path):
    model = _gpt2()
    slim = wrap(model)
    out, rec = structured_prune(slim, StructuredPruneConfig(ratio=0.5, allocation="uniform",
                                                            hf_loadable=False), StageContext())
    small = out.module
    logits = _logits(small)
    assert logits.shape == (2, 12, 50) and torch.isfinite(logits).all()
    assert n_params(small) < 0.6 * n_params(model)
    # the LM head stays tied to the embeddings; the vocabulary is never pruned
    assert small.lm_head.weight is small.transformer.wte.weight
    assert small.transformer.wte.num_embeddings == small.lm_head.out_features == 50
    assert small.transformer.wte.embedding_dim == small.lm_head.in_features == HIDDEN // 2
    attn, mlp = small.transformer.h[0].attn, small.transformer.h[0].mlp
    assert (attn.num_heads, attn.split_size, attn.c_attn.nx) == (2, 2 * HEAD_DIM, HIDDEN // 2)
    cfg = small.config
    assert (cfg.n_embd, cfg.n_head, cfg.n_inner) == (HIDDEN // 2, 2, mlp.c_fc.nf)
    assert model.config.n_embd == HIDDEN and model.config.n_inner is None  # input untouched
    # half the hidden size and half the heads: n_embd / n_head is still the head size, so
    # this config alone builds the pruned model
    assert not [s for s in rec.skipped if s["what"].startswith("config")]
    rebuilt = type(small)(cfg).eval()
    rebuilt.load_state_dict(small.state_dict(), strict=True)
    torch.testing.assert_close(_logits(rebuilt), logits, rtol=0, atol=0)

    save_artifact(out, tmp_path / "gpt2")
    back = load_artifact(tmp_path / "gpt2").module
    assert type(back) is type(model)  # rebuilt from the original config + the plan
    assert torch.equal(back.lm_head.weight, back.transformer.wte.weight)
    torch.testing.assert_close(_logits(back), logits, rtol=0, atol=0)


def test_the_reloaded_lm_head_is_still_the_embedding_tensor(tmp_path: Path):
    out, _ = structured_prune(wrap(_gpt2()), StructuredPruneConfig(ratio=0.5, hf_loadable=False),
                              StageContext())
    save_artifact(out, tmp_path / "gpt2")
    back = load_artifact(tmp_path / "gpt2").module
    assert back.lm_head.weight is back.transformer.wte.weight


def test_head_dims_leave_the_fused_attention_alone_with_the_reason_and_prune_the_mlp():
    model = _gpt2()
    plan = plan_structured(model, StructuredPruneConfig(
        ratio=0.5, attention="head_dims", allocation="uniform"), example_inputs=TOKENS)
    why = [s["why"] for s in plan["skipped"] if "attn.c_attn" in s["what"]]
    assert len(why) == LAYERS and all("fused with the keys and values" in w for w in why)
    assert {f"transformer.h.{i}.mlp.c_fc" for i in range(LAYERS)} <= \
        {g["root"] for g in plan["groups"]}
    assert plan["head_dims"] == {} and plan["heads"] == {}
    small = apply_structured(model, plan)
    assert torch.isfinite(_logits(small)).all()
    assert small.transformer.h[0].attn.c_attn.nf == 3 * HIDDEN
