"""Unfused nn.MultiheadAttention and pruning its heads.

References: nn.MultiheadAttention itself in float64 (every mask kind, layout and weights mode),
nn.Transformer* layers through their eval fast paths, the ORIGINAL model with the pruned heads'
value rows (or the pruned head dims' q/k/v rows) zeroed, plan JSON replayed on a fresh model
and through the artifact rebuilder, ONNX Runtime against PyTorch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tests._stages import stage_on
from tests.prune._structured_models import eval_out, n_params
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.model import SlimModel
from slimkit.io.transforms import replay_transforms
from slimkit.measure.counts import count_flops
from slimkit.prune.structured import (
    StructuredPruneConfig,
    apply_structured,
    plan_structured,
    structured_prune,
)
from slimkit.prune.unfuse import UnfusedMultiheadAttention, unfuse_mha

B, L, S, E, H = 2, 5, 7, 16, 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mha(**kw: object) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dropout=0.3, **kw).double().eval()
    for p in mha.parameters():  # non-zero biases, so that a misplaced bias shows
        p.data.normal_(0, 0.5, generator=_gen(1))
    return mha


def _inputs(batch_first: bool, kdim: int = E, vdim: int = E) -> list[torch.Tensor]:
    g = _gen(2)
    q, k, v = (torch.randn(B, n, d, generator=g, dtype=torch.float64)
               for n, d in ((L, E), (S, kdim), (S, vdim)))
    return [q, k, v] if batch_first else [t.transpose(0, 1) for t in (q, k, v)]


def _masks() -> dict[str, dict[str, object]]:
    g = _gen(3)
    bool_2d = torch.rand(L, S, generator=g) > 0.6
    bool_2d[:, 0] = False  # no fully masked row (NaN in both)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -3:] = True
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    return {
        "none": {},
        "bool_2d": {"attn_mask": bool_2d},
        "float_2d": {"attn_mask": torch.randn(L, S, generator=g, dtype=torch.float64)},
        "float_3d": {"attn_mask": torch.randn(B * H, L, S, generator=g, dtype=torch.float64)},
        "bool_3d": {"attn_mask": bool_2d.repeat(B * H, 1, 1)},
        "key_padding": {"key_padding_mask": kpm},
        "float_key_padding": {"key_padding_mask": kpm.double() * -5.0},
        "both": {"attn_mask": bool_2d, "key_padding_mask": kpm},
        "causal": {"attn_mask": causal, "is_causal": True},
        "per_head_weights": {"average_attn_weights": False, "attn_mask": bool_2d},
        "no_weights": {"need_weights": False, "key_padding_mask": kpm},
        "causal_no_weights": {"attn_mask": causal, "is_causal": True, "need_weights": False},
    }


def _same(ref: tuple, got: tuple) -> None:
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-10)
    if ref[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", list(_masks()))
def test_unfused_equals_multihead_attention_float64(batch_first: bool, mask: str):
    mha = _mha(batch_first=batch_first)
    unfused = UnfusedMultiheadAttention.from_mha(mha)
    assert (unfused.num_heads, unfused.head_dim, unfused.embed_dim) == (H, E // H, E)
    assert unfused.batch_first == batch_first and not unfused.training
    x, kw = _inputs(batch_first), _masks()[mask]
    _same(mha(*x, **kw), unfused(*x, **kw))


@pytest.mark.parametrize("kw", [{"kdim": 6, "vdim": 10}, {"bias": False},
                                {"kdim": 6, "vdim": 10, "bias": False}])
def test_unfused_kdim_vdim_and_no_bias(kw: dict):
    mha = _mha(batch_first=True, **kw)
    unfused = UnfusedMultiheadAttention.from_mha(mha)
    assert (unfused.kdim, unfused.vdim) == (kw.get("kdim", E), kw.get("vdim", E))
    assert (unfused.q_proj.bias is None) == (not kw.get("bias", True))
    x = _inputs(True, kw.get("kdim", E), kw.get("vdim", E))
    for masks in ({}, _masks()["both"], _masks()["no_weights"]):
        _same(mha(*x, **masks), unfused(*x, **masks))


def test_unbatched_inputs():
    mha = _mha(batch_first=True)
    unfused = UnfusedMultiheadAttention.from_mha(mha)
    q, k, v = (t[0] for t in _inputs(True))
    kw = {"attn_mask": _masks()["bool_2d"]["attn_mask"], "key_padding_mask": torch.zeros(S).bool()}
    _same(mha(q, k, v, **kw), unfused(q, k, v, **kw))
    assert unfused(q, k, v)[0].shape == (L, E)


def test_dropout_only_in_training():
    unfused = UnfusedMultiheadAttention.from_mha(_mha(batch_first=True))
    x = _inputs(True)
    ref = unfused(*x, average_attn_weights=False)[1]
    torch.manual_seed(0)
    dropped = unfused.train()(*x, average_attn_weights=False)[1]
    zero = dropped == 0
    assert 0.1 < zero.double().mean() < 0.5  # p = 0.3
    torch.testing.assert_close(dropped[~zero], ref[~zero] / 0.7, rtol=1e-12, atol=0)


def test_is_causal_without_a_mask_builds_the_causal_mask():
    unfused = UnfusedMultiheadAttention.from_mha(_mha(batch_first=True))
    x = _inputs(True)
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    _same(unfused(*x, attn_mask=causal), unfused(*x, is_causal=True))


# ---- nn.Transformer* layers: their eval fast paths must call our forward ----

def _encoder(layers: int = 2) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, layers).eval()  # nested tensors on by default


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_transformer_encoder_fast_paths_fall_back_to_the_unfused_forward(mode: str):
    enc = _encoder()
    swapped = copy.deepcopy(enc)
    names, skipped = unfuse_mha(swapped)
    assert names == ["layers.0.self_attn", "layers.1.self_attn"] and skipped == []
    assert not any(isinstance(m, nn.MultiheadAttention) for m in swapped.modules())
    x = torch.randn(B, L, 32, generator=_gen(4))
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, -2:] = True
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        for kw in ({}, {"src_key_padding_mask": kpm}):  # with the mask: nested tensors
            ref, got = enc(x, **kw), swapped(x, **kw)
            keep = ~kpm if kw else torch.ones_like(kpm)  # nested paths zero padded tokens
            torch.testing.assert_close(got[keep], ref[keep], rtol=0, atol=1e-5)
        layer, ref_layer = swapped.layers[0], enc.layers[0]  # the layer's own fast path
        torch.testing.assert_close(layer(x, src_key_padding_mask=kpm)[~kpm],
                                   ref_layer(x, src_key_padding_mask=kpm)[~kpm],
                                   rtol=0, atol=1e-5)


def test_transformer_decoder_layer_self_and_cross_attention():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=False).eval()
    swapped = copy.deepcopy(dec)
    assert unfuse_mha(swapped)[0] == ["self_attn", "multihead_attn"]
    tgt, memory = torch.randn(L, B, 32, generator=_gen(5)), torch.randn(S, B, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    with torch.inference_mode():
        torch.testing.assert_close(swapped(tgt, memory, tgt_mask=mask, tgt_is_causal=True),
                                   dec(tgt, memory, tgt_mask=mask, tgt_is_causal=True),
                                   rtol=0, atol=1e-5)


def test_unsupported_attention_is_left_fused_with_the_reason():
    model = nn.Sequential(nn.MultiheadAttention(E, H, add_zero_attn=True))
    names, skipped = unfuse_mha(model)
    assert names == [] and isinstance(model[0], nn.MultiheadAttention)
    assert skipped[0]["what"] == "attention 0" and "add_zero_attn" in skipped[0]["why"]
    _, skipped = unfuse_mha(nn.MultiheadAttention(E, H))
    assert "the model itself" in skipped[0]["why"]
    with pytest.raises(ModelError, match="add_bias_kv"):
        UnfusedMultiheadAttention.from_mha(nn.MultiheadAttention(E, H, add_bias_kv=True))
    with pytest.raises(ConfigError, match="'nope'"):
        unfuse_mha(nn.Sequential(nn.MultiheadAttention(E, H)), only=["nope"])


# ---- structured pruning of a model built on nn.TransformerEncoder ----

class EncoderNet(nn.Module):
    """Linear embedding -> 2-layer nn.TransformerEncoder (d_model 32, 4 heads) -> mean -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.encoder = _encoder()
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def _net() -> EncoderNet:
    torch.manual_seed(0)
    net = EncoderNet().eval()
    for p in net.parameters():  # larger weights than the init, so that errors show
        p.data.normal_(0, 0.3)
    return net


X = (torch.randn(3, L, 6, generator=_gen(6)),)
ATTN_ONLY = [r"re:.*self_attn\..*"]


def _zeroed(model: nn.Module, plan: dict, rows_of) -> nn.Module:
    """The original (fused) model with the pruned rows of each in_proj zeroed."""
    ref = copy.deepcopy(model)
    for i, layer in enumerate(ref.encoder.layers):
        rows = rows_of(plan["groups"][i]["keep"])
        with torch.no_grad():
            layer.self_attn.in_proj_weight[rows] = 0
            layer.self_attn.in_proj_bias[rows] = 0
    return ref


def test_heads_pruned_equal_the_original_with_those_heads_zeroed():
    model = _net().double()
    x = (X[0].double(),)
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        ratio=0.5, allocation="uniform", include=ATTN_ONLY), example_inputs=x)
    plan = rec.details["plans"][0]
    assert plan["heads"] == {f"encoder.layers.{i}.self_attn": 2 for i in range(2)}
    for layer in small.encoder.layers:
        attn = layer.self_attn
        assert (attn.num_heads, attn.head_dim, attn.q_proj.weight.shape) == (2, 8, (16, 32))
    # a removed head contributes nothing once its value rows are zero (v: rows 64..95)
    ref = _zeroed(model, plan, lambda keep: [64 + h * 8 + j for h in range(4) if h not in keep
                                             for j in range(8)])
    torch.testing.assert_close(eval_out(small, x), eval_out(ref, x), rtol=0, atol=1e-10)
    assert isinstance(model.encoder.layers[0].self_attn, nn.MultiheadAttention)  # untouched


def test_head_dims_pruned_equal_the_zeroed_original_with_the_original_scale():
    model = _net().double()
    x = (X[0].double(),)
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        ratio=0.5, attention="head_dims", allocation="uniform", include=ATTN_ONLY),
        example_inputs=x)
    plan = rec.details["plans"][0]
    assert plan["head_dims"] == {f"encoder.layers.{i}.self_attn": 4 for i in range(2)}
    assert all(v == pytest.approx(0.5 ** 0.5) for v in plan["scale"].values())
    assert len(plan["scale"]) == 4  # q_proj weight and bias of both layers
    attn = small.encoder.layers[0].self_attn
    assert (attn.num_heads, attn.head_dim, attn.v_proj.weight.shape) == (4, 4, (16, 32))
    # q, k and v rows (0..31, 32..63, 64..95) of the removed inner positions set to zero
    ref = _zeroed(model, plan, lambda keep: [p * 32 + h * 8 + j for p in range(3)
                                             for h in range(4) for j in range(8)
                                             if j not in keep])
    torch.testing.assert_close(eval_out(small, x), eval_out(ref, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("attention", ["heads", "head_dims"])
def test_prune_encoder_export_and_replay(attention: str, tmp_path: Path):
    model = _net()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        ratio=0.5, allocation="uniform", attention=attention), example_inputs=X)
    out = eval_out(small, X)
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    assert rec.details["params"]["after"] == n_params(small) < 0.6 * n_params(model)
    assert rec.details["unfused_mha"] == ["encoder.layers.0.self_attn",
                                          "encoder.layers.1.self_attn"]
    assert rec.changed[0].startswith("encoder.layers.0.self_attn: nn.MultiheadAttention -> "
                                     "UnfusedMultiheadAttention")
    attn = small.encoder.layers[1].self_attn
    assert (attn.num_heads, attn.head_dim) == ((2, 8) if attention == "heads" else (4, 4))
    plan = json.loads(json.dumps(rec.details["plans"][0]))
    torch.testing.assert_close(eval_out(apply_structured(_net(), plan), X), out, rtol=0, atol=1e-6)
    fresh = replay_transforms(_net(), [  # artifact loading: fresh build, plan, saved weights
        {"kind": "structured_prune", "owner": "slimkit.prune.structured", "plan": plan}])
    fresh.load_state_dict(small.state_dict())
    torch.testing.assert_close(eval_out(fresh, X), out, rtol=0, atol=1e-6)
    slim = SlimModel(module=small, input_shape=(L, 6), input_dtype="float32", name="enc",
                     arch=None)
    path = export_onnx(slim, tmp_path / "enc.onnx")
    parity = check_parity(slim, path, slim.example_inputs(2, seed=2), atol=1e-4)
    assert parity["ok"], parity


def test_plan_structured_swaps_and_apply_replays_it_on_the_fused_model():
    model = _net()
    cfg = StructuredPruneConfig(ratio=0.5, allocation="uniform", steps=1)
    plan = plan_structured(model, cfg, example_inputs=X)
    assert plan["unfused_mha"] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert isinstance(model.encoder.layers[0].self_attn, nn.MultiheadAttention)  # untouched
    small, _ = stage_on(structured_prune, model, cfg, example_inputs=X)
    torch.testing.assert_close(eval_out(apply_structured(model, plan), X), eval_out(small, X),
                               rtol=0, atol=0)


def test_flops_target_counts_the_unfused_attention():
    model = _net()
    unfused = copy.deepcopy(model)
    unfuse_mha(unfused)
    full = count_flops(unfused, X)["flops"]
    assert count_flops(model, X)["flops"] < full  # the fused kernels hide their FLOPs
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(target={"flops": 0.5},
                                                       attention="head_dims"),
                          example_inputs=X)
    assert rec.details["flops"]["before"] == full and rec.details["target"]["reached"]
    assert count_flops(small, X)["flops"] <= 0.5 * full
    assert small.encoder.layers[0].self_attn.head_dim < 8


class ZeroAttnNet(nn.Module):
    """An nn.MultiheadAttention with add_zero_attn (cannot be unfused), then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, add_zero_attn=True)
        self.fc1 = nn.Linear(E, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc2(torch.relu(self.fc1(h))).mean(1)


def test_add_zero_attn_stays_fixed_and_is_reported():
    torch.manual_seed(0)
    model = ZeroAttnNet().eval()
    small, rec = stage_on(structured_prune, model,
                          StructuredPruneConfig(ratio=0.5), example_inputs=X)
    assert isinstance(small.attn, nn.MultiheadAttention)
    assert small.attn.in_proj_weight.shape == (3 * E, E)
    assert small.fc1.out_features == 16  # the rest is still pruned
    (note,) = [s for s in rec.skipped if s["what"] == "attention attn"]
    assert "add_zero_attn" in note["why"]
    assert any("MultiheadAttention" in s["why"] for s in rec.skipped if s["what"] != note["what"])
    assert rec.details["unfused_mha"] == [] == rec.details["plans"][0]["unfused_mha"]


def test_excluded_attention_stays_fused():
    model = _net()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        ratio=0.5, exclude=["encoder.layers.1"]), example_inputs=X)
    assert rec.details["unfused_mha"] == ["encoder.layers.0.self_attn"]
    assert isinstance(small.encoder.layers[1].self_attn, nn.MultiheadAttention)
    assert small.encoder.layers[1].self_attn.in_proj_weight.shape == (96, 32)


def test_two_steps_replay_in_order_on_a_fresh_model():
    model = _net()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        ratio=0.5, steps=2, allocation="uniform", attention="head_dims"), example_inputs=X)
    assert [p["head_dims"]["encoder.layers.0.self_attn"] for p in rec.details["plans"]] == [6, 4]
    fresh = replay_transforms(_net(), [
        {"kind": "structured_prune", "owner": "slimkit.prune.structured", "plan": plan}
        for plan in json.loads(json.dumps(rec.details["plans"]))])
    fresh.load_state_dict(small.state_dict())
    torch.testing.assert_close(eval_out(fresh, X), eval_out(small, X), rtol=0, atol=1e-6)
