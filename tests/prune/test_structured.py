"""Structured pruning against references: hand-restricted originals, identity, invariants."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from tests._stages import stage_on
from tests.prune._structured_models import (
    ConcatNet,
    ConvNet,
    DenseNet,
    GroupedNet,
    Rolled,
    SEDecoderNet,
    SideNet,
    SplitNet,
    init_bn,
)
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.core.stages import StageContext
from slimkit.data.bundle import DataBundle
from slimkit.graph.dependency import build_dependency_graph
from slimkit.io import batch as B
from slimkit.prune.structured import (
    StructuredPruneConfig,
    apply_structured,
    plan_structured,
    structured_prune,
)
from slimkit.zoo import build_model

X = (torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return init_bn(ConvNet())


def _out(m: nn.Module, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return m.eval()(*x)


def _group_keep(plan: dict, root: str) -> list[int]:
    return next(g["keep"] for g in plan["groups"] if g["root"] == root)


def test_pruned_equals_original_with_removed_channels_zeroed():
    net = _convnet().double()
    x = (X[0].double(),)
    plan = plan_structured(net, StructuredPruneConfig(ratio=0.5, allocation="uniform"),
                           example_inputs=x)
    small = apply_structured(net, plan)
    keep1, keep2 = _group_keep(plan, "conv1"), _group_keep(plan, "conv2")
    assert len(keep1) == 8 and len(keep2) == 6
    ref = init_bn(ConvNet()).double()
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():  # the removed channels' contributions, zeroed by hand
        gone1 = [c for c in range(16) if c not in keep1]
        ref.conv2.weight[:, gone1] = 0
        gone2 = [c for c in range(12) if c not in keep2]
        cols = [c * 16 + i for c in gone2 for i in range(16)]  # flatten: 4x4 block per channel
        ref.fc.weight[:, cols] = 0
    torch.testing.assert_close(_out(small, x), _out(ref, x), rtol=1e-10, atol=1e-10)
    assert small.conv1.weight.shape == (8, 3, 3, 3) and small.bn1.running_var.shape == (8,)
    assert small.conv2.in_channels == 8 and small.fc.in_features == 6 * 16
    torch.testing.assert_close(small.conv1.weight, net.conv1.weight[keep1])
    torch.testing.assert_close(small.bn2.running_mean, net.bn2.running_mean[keep2])


def test_concat_and_residual_keep_the_right_columns():
    torch.manual_seed(0)
    net = ConcatNet().double().eval()
    x = (X[0].double(),)
    plan = plan_structured(net, StructuredPruneConfig(ratio=0.5, allocation="uniform"),
                           example_inputs=x)
    small = apply_structured(net, plan)
    ka, kb, ks = (_group_keep(plan, r) for r in ("a", "b", "stem"))
    cols = ka + [6 + c for c in kb]
    torch.testing.assert_close(small.mix.weight, net.mix.weight[ks][:, cols])
    torch.testing.assert_close(small.head.weight, net.head.weight[:, ks])
    ref = ConcatNet().double().eval()
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        ref.mix.weight[:, [c for c in range(16) if c not in cols]] = 0
        gone = [c for c in range(8) if c not in ks]
        for t in (ref.stem.weight, ref.stem.bias, ref.mix.weight, ref.mix.bias):
            t[gone] = 0
        ref.head.weight[:, gone] = 0
    torch.testing.assert_close(_out(small, x), _out(ref, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_ratio_zero_is_the_identity(allocation: str):
    net = _convnet()
    small, rec = stage_on(structured_prune, net,
                          StructuredPruneConfig(ratio=0.0, allocation=allocation),
                          example_inputs=X)
    torch.testing.assert_close(_out(small, X), _out(net, X), rtol=0, atol=0)
    assert rec.details["params"]["before"] == rec.details["params"]["after"]
    assert not rec.changed and small is not net


def test_input_model_is_untouched():
    net = _convnet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stage_on(structured_prune, net, StructuredPruneConfig(ratio=0.5), example_inputs=X)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training


def test_round_to_and_no_layer_goes_to_zero():
    model = build_model("resnet20", (3, 8, 8), 10)
    x = (torch.randn(2, 3, 8, 8),)
    plan = plan_structured(model, StructuredPruneConfig(ratio=0.6, round_to=8,
                                                        allocation="global"), example_inputs=x)
    for g in plan["groups"]:
        assert len(g["keep"]) % 8 == 0 or len(g["keep"]) == g["size"]
    plan = plan_structured(model, StructuredPruneConfig(ratio=0.99, max_layer_ratio=0.99),
                           example_inputs=x)
    assert all(len(g["keep"]) >= 1 for g in plan["groups"])
    small = apply_structured(model, plan)
    assert all(m.weight.shape[0] >= 1 for m in small.modules() if isinstance(m, nn.Conv2d))
    assert torch.isfinite(_out(small, x)).all()


def test_max_layer_ratio_caps_every_group():
    model = build_model("resnet20", (3, 8, 8), 10)
    plan = plan_structured(model, StructuredPruneConfig(ratio=0.7, max_layer_ratio=0.5),
                           example_inputs=(torch.randn(2, 3, 8, 8),))
    assert all(len(g["keep"]) >= g["size"] * 0.5 for g in plan["groups"])


def test_excluded_layers_are_untouched():
    net = _convnet()
    small, rec = stage_on(structured_prune, net,
                          StructuredPruneConfig(ratio=0.5, exclude=["conv1"]),
                          example_inputs=X)
    # conv1's output channels also size conv2's input: that group stays whole.
    assert torch.equal(small.conv1.weight, net.conv1.weight)
    assert torch.equal(small.conv1.bias, net.conv1.bias)
    assert small.conv2.in_channels == 16 and small.conv2.out_channels < 12
    assert any("excluded layer conv1" in s["why"] for s in rec.skipped)


def test_unknown_excluded_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'conv2'"):
        stage_on(structured_prune, _convnet(), StructuredPruneConfig(ratio=0.5, exclude=["cnov2"]),
                 example_inputs=X)


def test_include_limits_the_roots():
    small, _ = stage_on(structured_prune, _convnet(), StructuredPruneConfig(ratio=0.5,
                                                          include=["re:conv1"]),
                        example_inputs=X)
    assert small.conv1.out_channels == 8 and small.conv2.out_channels == 12


@pytest.mark.parametrize("bad", [{"ratio": 1.0}, {"ratio": -0.1}, {},
                                 {"ratio": 0.3, "target": {"flops": 0.5}},
                                 {"target": {"flop": 0.5}}, {"target": {"flops": 1.5}},
                                 {"ratio": 0.3, "criterion": "l3"}])
def test_config_rejects_bad_values(bad: dict):
    with pytest.raises((ValidationError, ConfigError)):
        StructuredPruneConfig(**bad)


def test_plan_is_json_and_replays_on_a_fresh_model():
    net = _convnet()
    plan = plan_structured(net, StructuredPruneConfig(ratio=0.4, criterion="fpgm"),
                           example_inputs=X)
    again = json.loads(json.dumps(plan))
    a, b = apply_structured(net, plan), apply_structured(_convnet(), again)
    torch.testing.assert_close(_out(a, X), _out(b, X), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="not a structured-prune plan"):
        apply_structured(net, {"format": "other"})


@pytest.mark.parametrize("metric", ["flops", "params"])
def test_target_is_reached_by_measurement(metric: str):
    small, rec = stage_on(structured_prune, _convnet(), StructuredPruneConfig(target={metric: 0.5}),
                          example_inputs=X)
    t = rec.details["target"]
    assert t["reached"] and t["achieved"] <= 0.5 and t["asked"] == 0.5
    measured = rec.details[metric]["after"] / rec.details[metric]["before"]
    assert measured == pytest.approx(t["achieved"], rel=1e-9)
    assert t["achieved"] > 0.3  # the search stops near the target, not far below it


def test_unreachable_target_says_so_and_keeps_the_best():
    small, rec = stage_on(structured_prune, _convnet(),
                          StructuredPruneConfig(target={"params": 0.01},
                                                            max_layer_ratio=0.5),
                          example_inputs=X)
    assert not rec.details["target"]["reached"]
    assert any("not reachable" in s["why"] for s in rec.skipped)
    assert rec.details["params"]["after"] < rec.details["params"]["before"]


def test_attention_heads_are_pruned_whole_and_counts_updated():
    model = build_model("vit", (3, 8, 8), 10, dim=32, depth=1, heads=4)
    x = (torch.randn(2, 3, 8, 8),)
    graph = build_dependency_graph(model, x)
    head_groups = [g for g in graph.groups if g.heads]
    assert head_groups and head_groups[0].size == 4
    plan = plan_structured(model, StructuredPruneConfig(ratio=0.5, allocation="uniform",
                                                        include=["re:.*attn.*"]),
                           example_inputs=x)
    small = apply_structured(model, plan)
    attn = small.blocks[0].attn
    assert attn.num_heads == 2 and attn.q.out_features == 16 and attn.out.in_features == 16
    kept = _group_keep(plan, "blocks.0.attn.q")
    rows = [h * 8 + i for h in kept for i in range(8)]
    torch.testing.assert_close(attn.v.weight, model.blocks[0].attn.v.weight[rows])
    assert _out(small, x).shape == (2, 10)


def test_taylor_needs_data_and_uses_it(mlp, digits):
    with pytest.raises(ConfigError, match="taylor"):
        stage_on(structured_prune, mlp.module, StructuredPruneConfig(ratio=0.5, criterion="taylor"),
                 example_inputs=mlp.example_inputs(2))
    small, rec = stage_on(structured_prune, mlp.module, StructuredPruneConfig(
        ratio=0.5, criterion="taylor", calib_batches=2), data=digits)
    assert rec.details["params"]["after"] < rec.details["params"]["before"]


def test_iterative_steps_with_finetune_keep_accuracy(mlp, digits):
    from slimkit.measure.quality import accuracy

    cfg = StructuredPruneConfig(ratio=0.5, steps=2,
                                finetune={"epochs": 1, "lr": 1e-3, "batch_size": 64})
    small, rec = stage_on(structured_prune, mlp.module, cfg, data=digits)
    assert len(rec.details["plans"]) == 2
    assert abs(small[1].out_features + small[3].out_features - 96) <= 2
    assert accuracy(_out(small, (digits.x_test,)), digits.y_test)["top1"] > 0.85


def test_grouped_conv_attributes_follow_the_kept_groups():
    torch.manual_seed(0)
    net = init_bn(GroupedNet())
    plan = plan_structured(net, StructuredPruneConfig(ratio=0.5, allocation="uniform"),
                           example_inputs=X)
    small = apply_structured(net, plan)
    assert (small.grouped.groups, small.grouped.in_channels, small.grouped.out_channels) == \
        (2, 8, 8)
    assert (small.gn.num_groups, small.gn.num_channels) == (2, 8)
    assert (small.dw.groups, small.dw.in_channels, small.dw.out_channels) == (8, 8, 16)
    keep = _group_keep(plan, "stem")
    rows = [u * 4 + i for u in keep for i in range(4)]
    torch.testing.assert_close(small.grouped.weight, net.grouped.weight[rows])
    assert _out(small, X).shape == (3, 3)


def test_latency_target_is_measured_and_reported():
    net = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                        nn.Linear(512, 10))
    x = (torch.randn(64, 64),)
    small, rec = stage_on(structured_prune, net, StructuredPruneConfig(target={"latency": 0.6}),
                          example_inputs=x)
    t = rec.details["target"]
    assert t["metric"] == "latency" and t["asked"] == 0.6 and t["achieved"] > 0
    assert t["steps"][0]["trials"] and rec.details["flops"]["after"] < \
        rec.details["flops"]["before"]
    assert t["reached"] == (t["achieved"] <= 0.6)


def test_plan_with_a_target_searches_the_ratio():
    plan = plan_structured(_convnet(), StructuredPruneConfig(target={"params": 0.6}),
                           example_inputs=X)
    small = apply_structured(_convnet(), plan)
    frac = sum(p.numel() for p in small.parameters()) / sum(
        p.numel() for p in _convnet().parameters())
    assert plan["target"]["reached"] and frac == pytest.approx(plan["target"]["achieved"])
    assert 0.45 < frac <= 0.6


@pytest.mark.slow
def test_hf_bert_heads_and_hidden_size_are_pruned_consistently():
    transformers = pytest.importorskip("transformers")
    from slimkit.io.hf import HFLogits

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32, num_labels=5)
    model = HFLogits(transformers.BertForSequenceClassification(cfg).eval(), "input_ids")
    x = (torch.randint(0, 100, (2, 16)),)
    small, rec = stage_on(structured_prune, model,
                          StructuredPruneConfig(ratio=0.5, allocation="uniform"),
                          example_inputs=x)
    attn = small.model.bert.encoder.layer[0].attention.self
    assert attn.num_attention_heads == 2 and attn.all_head_size == 16
    assert attn.query.weight.shape == (16, 16)  # 2 heads x 8, hidden 32 -> 16
    assert small.model.bert.embeddings.word_embeddings.embedding_dim == 16
    assert _out(small, x).shape == (2, 5)


def test_squeeze_excite_and_transposed_conv_match_zeroed_consumers():
    torch.manual_seed(0)
    net = init_bn(SEDecoderNet()).double()
    x = (X[0].double(),)
    plan = plan_structured(net, StructuredPruneConfig(ratio=0.5, allocation="uniform"),
                           example_inputs=x)
    small = apply_structured(net, plan)
    gone = {r: [c for c in range(g["size"]) if c not in g["keep"]]
            for r, g in ((g["root"], g) for g in plan["groups"])}
    assert set(gone) == {"stem", "se_reduce", "up"} and all(len(v) for v in gone.values())
    ref = init_bn(SEDecoderNet()).double()
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():  # a removed channel = its consumers' inputs zeroed
        ref.se_reduce.weight[:, gone["stem"]] = 0
        ref.up.weight[gone["stem"]] = 0  # transposed conv: inputs are weight dim 0
        ref.se_expand.weight[:, gone["se_reduce"]] = 0
        ref.head.weight[:, gone["up"]] = 0
    torch.testing.assert_close(_out(small, x), _out(ref, x), rtol=1e-10, atol=1e-10)
    assert (small.up.in_channels, small.up.out_channels) == (8, 6)


def _zero_removed(model: nn.Module, x: tuple[torch.Tensor, ...], plan: dict) -> nn.Module:
    """A second implementation of a plan: the original with every slice of every removed
    channel set to zero (running_var to one), so removed channels contribute nothing."""
    groups = {g.id: g for g in build_dependency_graph(model, x).groups}
    ref = copy.deepcopy(model)
    tensors = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    with torch.no_grad():
        for pg in plan["groups"]:
            gone = [c for c in range(pg["size"]) if c not in pg["keep"]]
            for m in groups[pg["id"]].members:
                ix = torch.tensor([i for c in gone for i in m.indices[c]], dtype=torch.long)
                fill = 1.0 if m.param.endswith("running_var") else 0.0
                tensors[m.param].index_fill_(m.dim, ix, fill)
    return ref


@pytest.mark.parametrize("make", [ConvNet, ConcatNet, SplitNet, GroupedNet, SEDecoderNet,
                                  DenseNet, lambda: build_model("resnet20", (3, 8, 8), 10),
                                  pytest.param(lambda: build_model("mobilenetv2", (3, 8, 8), 10,
                                                                   width_mult=0.25),
                                               marks=pytest.mark.slow)],
                         ids=["conv", "concat", "split", "grouped", "se_transposed", "dense",
                              "resnet20", "mobilenetv2"])
def test_pruned_equals_original_with_removed_slices_zeroed(make):
    torch.manual_seed(0)
    net = init_bn(make()).double()
    x = (X[0][:2].double(),)
    plan = plan_structured(net, StructuredPruneConfig(ratio=0.5, allocation="uniform"),
                           example_inputs=x)
    small = apply_structured(net, plan)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
    torch.testing.assert_close(_out(small, x), _out(_zero_removed(net, x, plan), x),
                               rtol=1e-9, atol=1e-9)


def test_record_lists_layers_unsupported_ops_and_skips():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rolled, self.a, self.b = Rolled(), nn.Linear(4, 32), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(self.rolled(x))))

    small, rec = stage_on(structured_prune, Mixed(),
                          StructuredPruneConfig(ratio=0.5, allocation="uniform"),
                          example_inputs=X)
    assert [(u["module"], u["op"]) for u in rec.details["unsupported_ops"]] == [("rolled",
                                                                                 "roll")]
    layers = rec.details["layers"]
    assert layers["b"] == {"before": [4, 32], "after": [4, 16]}
    assert layers["a"] == {"before": [32, 4], "after": [16, 2]}
    assert "rolled.conv" not in layers  # its channels pass through roll: left alone
    assert any("roll" in s["why"] for s in rec.skipped)
    assert small.rolled.conv.out_channels == 8


class HardCoded(nn.Module):
    """A head that hard-codes its input width in a view (pruning cannot rewrite that)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = Flat()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8 * 64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(-1, 8 * 64))


def test_a_hard_coded_size_names_the_module_and_exclude_fixes_it():
    with pytest.raises(ModelError, match=r"module 'head \(Flat.forward\)'.*exclude: \['head'\]"):
        stage_on(structured_prune, HardCoded(), StructuredPruneConfig(ratio=0.5), example_inputs=X)
    small, rec = stage_on(structured_prune, HardCoded(), StructuredPruneConfig(ratio=0.5,
                                                             exclude=["head"]),
                          example_inputs=X)
    assert small.conv.out_channels == 8 and any("head.fc" in s["why"] for s in rec.skipped)


def test_ratio_zero_with_round_to_is_the_identity():
    from slimkit.io.loader import load_zoo

    model = load_zoo("lenet5", input_shape=(1, 28, 28), num_classes=10)
    x = model.example_inputs(2)
    same, rec = stage_on(structured_prune, model.module,
                         StructuredPruneConfig(ratio=0.0, round_to=8),
                         example_inputs=x)
    assert rec.details["params"]["after"] == rec.details["params"]["before"]
    torch.testing.assert_close(same(*x), model.module(*x), rtol=0, atol=0)


def _wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


@pytest.mark.parametrize("target", [{"flops": 1.0}, {"params": 1.0}, {"flops": 1.0, "params": 1.0}])
def test_a_target_the_unpruned_model_meets_removes_nothing(target: dict):
    # The search bisected toward ratio 0 but never tried it: a target that the unpruned
    # model meets still removed channels (ratio ~0.0035 here). Ratio 0 is measured now.
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)),)
    model = _wide_mlp()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(target=target),
                          example_inputs=x)
    assert rec.details["params"]["after"] == rec.details["params"]["before"]
    assert rec.details["layers"] == {} and rec.transforms == []
    t = rec.details["target"]
    assert t["reached"] and t["steps"][0]["ratio"] == 0.0
    assert t["steps"][0]["trials"][-1] == {"ratio": 0.0, "fraction": 1.0}
    assert all(v["achieved"] == 1.0 for v in t["by_metric"].values())
    torch.testing.assert_close(_out(small, x), _out(model, x), rtol=0, atol=0)
    plan = plan_structured(_wide_mlp(), StructuredPruneConfig(target=target), example_inputs=x)
    assert plan["slices"] == {} and plan["target"]["steps"][0]["ratio"] == 0.0


class HandAttention(nn.Module):
    """Attention written by hand: the head size is computed at run time from the input width."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, c))


class HandBlock(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = HandAttention(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


class HandTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.Sequential(HandBlock())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


def test_a_run_time_head_size_under_a_flops_target_names_the_module():
    # The target search measures pruned candidates: one whose reshape reads C // heads
    # failed there with a raw RuntimeError. It is a ModelError naming the module to exclude,
    # as with a fixed ratio; excluding it prunes the rest to the target.
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)),)
    names_it = (r"module 'blocks\.0\.attn \(HandAttention\.forward\)'"
                r".*exclude: \['blocks\.0\.attn'\]")
    with pytest.raises(ModelError, match=names_it):
        stage_on(structured_prune, HandTransformer(),
                 StructuredPruneConfig(target={"flops": 0.6}), example_inputs=x)
    with pytest.raises(ModelError, match=names_it):
        plan_structured(HandTransformer(), StructuredPruneConfig(target={"flops": 0.6}),
                        example_inputs=x)
    model = HandTransformer()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        target={"flops": 0.6}, exclude=["blocks.0.attn"]), example_inputs=x)
    assert rec.details["target"]["reached"]
    assert rec.details["flops"]["after"] < rec.details["flops"]["before"]
    assert small.blocks[0].attn.qkv.weight.shape == model.blocks[0].attn.qkv.weight.shape
    assert any("blocks.0.attn" in s["why"] for s in rec.skipped)


def _side_inputs(style: str, n: int = 3, seed: int = 0) -> tuple | dict:
    gen = torch.Generator().manual_seed(seed)
    image, side = torch.randn(n, 3, 8, 8, generator=gen), torch.randn(n, 5, generator=gen)
    return {"image": image, "side": side} if style == "dict" else (image, side)


def _side_net() -> nn.Module:
    torch.manual_seed(0)
    return init_bn(SideNet())


@pytest.mark.parametrize("style", ["tuple", "dict"])
def test_several_inputs_and_outputs_equal_the_original_with_removed_channels_zeroed(style):
    net = _side_net().double()
    x = B.tmap(torch.Tensor.double, _side_inputs(style))
    plan = plan_structured(net, StructuredPruneConfig(ratio=0.5, allocation="uniform"),
                           example_inputs=x)
    assert [g["root"] for g in plan["groups"]] == ["conv1"]  # conv2 feeds the features output
    assert {"what": "group 1 (conv2, 12 channels)",
            "why": "<root>: output: model output"} in plan["skipped"]
    keep = _group_keep(plan, "conv1")
    assert len(keep) == 4
    small = apply_structured(net, plan)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        ref.conv2.weight[:, [c for c in range(8) if c not in keep]] = 0
    got, want = B.flatten(B.call(small.eval(), x)), B.flatten(B.call(ref.eval(), x))
    assert list(got) == ["logits", "features"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10)
    assert small.conv1.out_channels == 4 and small.conv2.in_channels == 4


def test_stage_on_dict_inputs_checks_every_output_and_keeps_the_input_model():
    from slimkit.api import wrap

    net = _side_net()
    model = wrap(net, _side_inputs("dict", n=2), output="features")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out, rec = structured_prune(model, StructuredPruneConfig(ratio=0.5), StageContext())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert rec.details["layers"]["conv1"] == {"before": [8, 3], "after": [4, 3]}
    x = _side_inputs("dict", n=4, seed=1)
    shapes = {k: v.shape for k, v in B.flatten(B.call(out.module.eval(), x)).items()}
    assert shapes == {"logits": (4, 4), "features": (4, 12)}
    assert rec.details["flops"]["after"] < rec.details["flops"]["before"]


def test_taylor_on_dict_data_scores_as_on_the_same_tuple_data():
    """The judged output's loss drives the scores, whatever way the inputs are passed."""
    def bundle(style: str) -> DataBundle:
        labels = torch.randint(0, 4, (24,), generator=torch.Generator().manual_seed(2))
        return DataBundle("side", _side_inputs(style, 24), labels, _side_inputs(style, 8, 1),
                          labels[:8], 4)

    cfg = StructuredPruneConfig(ratio=0.5, criterion="taylor", calib_batches=2,
                                calib_batch_size=8)
    plans = [plan_structured(_side_net(), cfg, data=bundle(style)) for style in ("dict",
                                                                                 "tuple")]
    assert plans[0]["groups"] == plans[1]["groups"] and len(plans[0]["groups"][0]["keep"]) == 4
