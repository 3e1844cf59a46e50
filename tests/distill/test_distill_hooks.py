"""FeatureTaps, attention recomputation, layout inference and projectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.distill.hooks import FeatureTaps, attention_probs, find_attention
from slimkit.distill.projectors import ExitHead, Projector, resolve_layout
from slimkit.zoo import build_model


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class _TupleOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple:
        return ({"a": x * 2}, x)


def test_taps_capture_outputs_and_remove_their_hooks() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    with FeatureTaps(net, ["0", "1"]) as taps:
        assert _hook_count(net) == 2
        out = net(x)
    assert _hook_count(net) == 0
    torch.testing.assert_close(taps["0"], net[0](x))
    torch.testing.assert_close(taps["1"], net[0](x).relu())
    torch.testing.assert_close(out, net[2](taps["1"]))
    with pytest.raises(ModelError, match="did not run"):
        FeatureTaps(net, ["2"])["2"]


def test_taps_are_removed_when_the_forward_fails() -> None:
    net = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(RuntimeError), FeatureTaps(net, ["0"]):
        net(torch.zeros(2, 5))
    assert _hook_count(net) == 0


def test_tuple_and_mapping_outputs_give_their_first_tensor() -> None:
    net = nn.Sequential(nn.Identity())
    net.add_module("pair", _TupleOut())
    x = torch.arange(3.0)
    with FeatureTaps(net, ["pair"]) as taps:
        net[0](x)
        net.pair(x)
    torch.testing.assert_close(taps["pair"], x * 2)


def test_unknown_name_names_the_closest_module() -> None:
    net = build_model("vit", (1, 8, 8), 10, dim=16, depth=2, heads=2)
    with pytest.raises(ConfigError, match=r"block\.0.*Did you mean 'blocks\.0'"):
        FeatureTaps(net, ["block.0"], label="student")
    assert _hook_count(net) == 0


def test_recomputed_attention_matches_the_block_math() -> None:
    torch.manual_seed(0)
    net = build_model("vit", (1, 8, 8), 10, dim=16, depth=2, heads=2).eval()
    q_name, k_name, heads = find_attention(net, "blocks.1")
    assert (q_name, k_name, heads) == ("blocks.1.attn.q", "blocks.1.attn.k", 2)
    x = torch.randn(3, 1, 8, 8)
    with FeatureTaps(net, ["blocks.0", q_name, k_name]) as taps:
        net(x)
    probs = attention_probs(taps[q_name], taps[k_name], heads)
    # reference: float64, written out per head from the block's own weights
    block = net.blocks[1]
    h = block.norm1(taps["blocks.0"]).double()
    wq, bq = block.attn.q.weight.double(), block.attn.q.bias.double()
    wk, bk = block.attn.k.weight.double(), block.attn.k.bias.double()
    for i in range(heads):
        rows = slice(8 * i, 8 * (i + 1))
        qi, ki = h @ wq[rows].T + bq[rows], h @ wk[rows].T + bk[rows]
        want = torch.softmax(qi @ ki.transpose(1, 2) / 8**0.5, dim=-1)
        torch.testing.assert_close(probs[:, i].double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="attention_weight"):
        find_attention(net, "blocks.1.mlp")


def test_layout_is_inferred_from_module_types() -> None:
    vit = build_model("vit", (1, 8, 8), 10, dim=16, depth=1, heads=2)
    conv1d = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.ReLU())
    assert resolve_layout(vit, "blocks.0", 3, "auto") == "channels_last"
    assert resolve_layout(conv1d, "1", 3, "auto") == "channels_first"
    assert resolve_layout(vit, "patch_embed", 4, "auto") == "channels_first"
    assert resolve_layout(conv1d, "1", 3, "channels_last") == "channels_last"


def test_projectors_pick_the_map_for_each_layout() -> None:
    conv = Projector((2, 4, 6, 6), (2, 8, 3, 3), "channels_first", "channels_first", "p")
    assert isinstance(conv.channel_map, nn.Conv2d) and conv.channel_map.weight.shape == (8, 4, 1, 1)
    assert conv(torch.randn(2, 4, 6, 6)).shape == (2, 8, 3, 3)
    seq = Projector((2, 4, 10), (2, 6, 10), "channels_first", "channels_first", "p")
    assert isinstance(seq.channel_map, nn.Conv1d)
    tokens = Projector((2, 5, 16), (2, 5, 32), "channels_last", "channels_last", "p")
    assert isinstance(tokens.channel_map, nn.Linear)
    assert tokens(torch.randn(2, 5, 16)).shape == (2, 32, 5)  # canonical: channels first
    same = Projector((2, 4, 6, 6), (2, 4, 6, 6), "channels_first", "channels_first", "p")
    assert not list(same.parameters())
    with pytest.raises(ModelError, match="cannot be matched"):
        Projector((2, 4, 6, 6), (2, 4), "channels_first", "channels_first", "p")


def test_exit_head_pools_tokens_or_space() -> None:
    x = torch.randn(2, 5, 16)
    head = ExitHead(16, 3, "channels_last")
    torch.testing.assert_close(head(x), head.fc(x.mean(1)))
    conv_head = ExitHead(5, 3, "channels_first")
    torch.testing.assert_close(conv_head(x), conv_head.fc(x.mean(2)))
