"""Dependency analysis: which slices are coupled, what is locked and why, what is reported."""

from __future__ import annotations

import json

import pytest
import torch
from tests.prune._structured_models import (
    ConcatNet,
    ConvNet,
    GroupedNet,
    MHANet,
    Rolled,
    SideNet,
    SplitNet,
)
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.graph.dependency import analyze, build_dependency_graph
from slimkit.zoo import build_model

X = (torch.randn(2, 3, 8, 8),)


def _groups(model: nn.Module, x=X) -> dict:
    return {g.root: g for g in build_dependency_graph(model, x).groups}


def _member(group, param: str, dim: int):
    return next(m for m in group.members if m.param == param and m.dim == dim)


def test_flatten_into_linear_maps_a_channel_to_its_spatial_block():
    g = _groups(ConvNet())["conv2"]
    fc = _member(g, "fc.weight", 1)
    assert fc.indices[3] == list(range(48, 64)) and g.size == 12
    assert _member(g, "bn2.running_var", 0).indices[3] == [3]


def test_concat_offsets_and_residual_add():
    gs = _groups(ConcatNet())
    assert _member(gs["a"], "mix.weight", 1).indices == [[i] for i in range(6)]
    assert _member(gs["b"], "mix.weight", 1).indices == [[6 + i] for i in range(10)]
    stem = gs["stem"]  # stem's output is added to mix's output: one group
    assert {(m.param, m.dim) for m in stem.members} >= {
        ("stem.weight", 0), ("mix.weight", 0), ("mix.bias", 0), ("a.weight", 1),
        ("b.weight", 1), ("head.weight", 1)}


def test_chunk_couples_the_same_position_of_every_piece():
    g = _groups(SplitNet())["stem"]
    assert g.size == 8 and _member(g, "stem.weight", 0).indices[2] == [2, 10]
    assert _member(g, "gate.weight", 1).indices[2] == [10, 18]  # cat([y, a, b])


def test_grouped_and_depthwise_convs_prune_whole_groups():
    gs = _groups(GroupedNet())
    # groups=4 conv: a unit is one conv group (4 in + 4 out channels); GroupNorm's 4 groups and
    # the depthwise x2 conv (input c -> outputs 2c, 2c+1) line up with it: one group of 4.
    g = gs["stem"]
    assert g.size == 4 and g.prunable
    assert _member(g, "stem.weight", 0).indices[1] == [4, 5, 6, 7]
    assert _member(g, "grouped.weight", 0).indices[1] == [4, 5, 6, 7]
    assert _member(g, "gn.weight", 0).indices[1] == [4, 5, 6, 7]
    assert _member(g, "dw.weight", 0).indices[1] == list(range(8, 16))
    assert _member(g, "pw.weight", 1).indices[1] == list(range(8, 16))
    assert ("grouped.weight", 1) not in {(m.param, m.dim) for m in g.members}


def test_resnet_padded_shortcut_is_locked_with_its_reason():
    report = analyze(build_model("resnet20", (3, 8, 8), 10), X)
    locked = {g["root"]: g["why"] for g in report["unprunable"]}
    assert any("pad" in w for w in locked["conv1"])
    assert len(report["prunable"]) == 9 and report["unsupported"] == []


def test_attention_heads_and_module_attributes():
    gs = _groups(build_model("vit", (3, 8, 8), 10, dim=32, depth=1, heads=4))
    head = gs["blocks.0.attn.q"]
    assert head.size == 4 and head.heads == ["blocks.0.attn"]
    assert _member(head, "blocks.0.attn.out.weight", 1).indices[1] == list(range(8, 16))
    assert _member(head, "blocks.0.attn.k.weight", 0).indices[1] == list(range(8, 16))


def test_multihead_attention_module_is_locked_but_the_mlp_is_not():
    report = analyze(MHANet(), (torch.randn(2, 5, 6),))
    assert any("MultiheadAttention" in " ".join(g["why"]) for g in report["unprunable"])
    assert [g["root"] for g in report["prunable"]] == ["fc1"]


def test_unknown_ops_are_reported_by_module_and_op_and_lock_the_group():
    report = analyze(Rolled(), X)
    first = report["unsupported"][0]
    assert (first["module"], first["op"]) == ("", "roll")
    assert report["prunable"] == []
    assert any("roll" in " ".join(g["why"]) for g in report["unprunable"])


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: not capturable
            return y
        return -y


def test_uncapturable_model_is_a_model_error_naming_the_module():
    with pytest.raises(ModelError, match="Branchy"):
        build_dependency_graph(Branchy(), X)


def test_graph_is_json_serializable_and_leaves_the_model_alone():
    net = ConvNet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    graph = build_dependency_graph(net, X)
    assert json.loads(json.dumps(graph.to_dict()))["groups"][0]["root"] == "conv1"
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_squeeze_excitation_gate_and_transposed_conv():
    from tests.prune._structured_models import SEDecoderNet

    gs = _groups(SEDecoderNet())
    stem = gs["stem"]  # the gate multiplies the stem's channels: se_expand rows join them
    assert {("se_expand.weight", 0), ("se_reduce.weight", 1), ("up.weight", 0)} <= \
        {(m.param, m.dim) for m in stem.members}
    up = gs["up"]  # a transposed conv's outputs are weight dim 1
    assert {("up.weight", 1), ("up.bias", 0), ("bn.weight", 0), ("head.weight", 1)} <= \
        {(m.param, m.dim) for m in up.members}


class _SDPAttention(nn.Module):
    """q/k/v/out attention through SDPA; ``v_dim`` may differ from the q/k head size."""

    def __init__(self, scaling: float | None, v_dim: int = 16) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.v, self.out = nn.Linear(16, v_dim), nn.Linear(v_dim, 4)
        if scaling is not None:
            self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(*t.shape[:2], 2, -1).transpose(1, 2)

        ctx = nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)),
            scale=getattr(self, "scaling", None))
        return self.out(ctx.transpose(1, 2).flatten(2)).mean(1)


def test_head_dims_group_inner_positions_across_heads_and_couple_q_k_v():
    model = build_model("vit", (3, 8, 8), 10, dim=32, depth=1, heads=4)
    gs = {g.root: g for g in build_dependency_graph(model, X, "head_dims").groups}
    g = gs["blocks.0.attn.q"]
    assert (g.size, g.heads, g.head_dims, g.prunable) == (8, [], ["blocks.0.attn"], True)
    for param, dim in [("q.weight", 0), ("k.bias", 0), ("v.weight", 0), ("out.weight", 1)]:
        assert _member(g, f"blocks.0.attn.{param}", dim).indices[1] == [1, 9, 17, 25]
    # the zoo derives its scale from the run-time head size: q's rows carry the fix
    assert g.queries == ["blocks.0.attn.q.weight", "blocks.0.attn.q.bias"]


def test_head_dims_scale_fix_only_where_the_module_has_no_scaling():
    x = (torch.randn(2, 5, 16),)
    fixed = build_dependency_graph(_SDPAttention(0.25), x, "head_dims").groups
    derived = build_dependency_graph(_SDPAttention(None), x, "head_dims").groups
    (a,), (b,) = [g for g in fixed if g.head_dims], [g for g in derived if g.head_dims]
    assert a.size == b.size == 8 and a.prunable and b.prunable
    assert a.queries == [] and b.queries == ["q.weight", "q.bias"]


def test_head_dims_lock_splits_of_different_sizes_in_one_module():
    x = (torch.randn(2, 5, 16),)
    report = analyze(_SDPAttention(0.25, v_dim=8), x, attention="head_dims")
    assert any("head splits of different sizes" in " ".join(g["why"])
               for g in report["unprunable"])
    heads = analyze(_SDPAttention(0.25, v_dim=8), x)  # whole heads: still prunable
    assert any(g["heads"] == [""] for g in heads["prunable"])


def test_unknown_attention_mode_names_the_known_ones():
    with pytest.raises(ConfigError, match="head_dims"):
        build_dependency_graph(ConvNet(), X, "dims")


@pytest.mark.parametrize("style", ["tuple", "dict"])
def test_several_inputs_are_traced_and_every_output_keeps_its_size(style: str):
    image, side = torch.randn(2, 3, 8, 8), torch.randn(2, 5)
    x = {"image": image, "side": side} if style == "dict" else (image, side)
    gs = _groups(SideNet(), x)
    assert gs["conv1"].prunable and gs["conv1"].size == 8
    # conv2's channels are the "features" output (and feed the logits): fixed, with the reason
    assert not gs["conv2"].prunable and gs["conv2"].why == ["<root>: output: model output"]
    assert {m.param for m in gs["conv2"].members} >= {"conv2.weight", "side.weight",
                                                      "head.weight"}
    assert _groups(SideNet(), ({"image": image, "side": side},))["conv1"].prunable  # (x,)


class _FusedQKV(nn.Module):
    """GPT-2's attention in plain torch: one projection makes q, k and v, split by a size.

    ``width_attr`` names the attribute the split size is kept in: ``split_size`` follows the
    heads (the slicer sets it); any other name is a size nobody updates.
    """

    def __init__(self, width_attr: str = "split_size") -> None:
        super().__init__()
        self.num_heads, self.head_dim = 2, 4
        setattr(self, width_attr, 8)
        self.width_attr = width_attr
        self.qkv, self.out = nn.Linear(6, 24), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(getattr(self, self.width_attr), dim=2)
        q, k, v = (t.view(*t.shape[:2], -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        ctx = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(ctx.transpose(1, 2).reshape(*x.shape[:2], -1))


def test_a_fused_qkv_projection_split_by_split_size_prunes_whole_heads_alike():
    g = _groups(_FusedQKV(), (torch.randn(2, 5, 6),))["qkv"]
    assert (g.size, g.heads, g.prunable) == (2, [""], True)
    # head 1: its rows of q (4..7), of k (12..15) and of v (20..23); its columns of out
    assert _member(g, "qkv.weight", 0).indices[1] == [4, 5, 6, 7, 12, 13, 14, 15,
                                                      20, 21, 22, 23]
    assert _member(g, "out.weight", 1).indices[1] == [4, 5, 6, 7]


def test_a_fused_qkv_split_by_a_size_nobody_updates_is_locked_with_its_reason():
    report = analyze(_FusedQKV("width"), (torch.randn(2, 5, 6),))
    (locked,) = [g for g in report["unprunable"] if g["root"] == "qkv"]
    assert "split into fixed sizes [8, 8, 8]" in locked["why"][0]
    assert [g["root"] for g in report["prunable"]] == []
