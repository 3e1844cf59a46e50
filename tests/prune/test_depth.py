"""Depth pruning against hand-written references: removed branches, scores, plans, targets."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tests._stages import stage_on
from tests.prune._structured_models import eval_out, init_bn, n_params
from torch import fx, nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.data import build_bundle, calibration_subset
from slimkit.data.bundle import DataBundle
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.graph.branches import find_branches
from slimkit.io.model import SlimModel, TensorSpec
from slimkit.measure.relative import fractions_of
from slimkit.prune.depth import (
    output_change,
    rank_branches,
    remove_branches,
    score_branches,
    without_branches,
)
from slimkit.prune.structured import (
    StructuredPruneConfig,
    apply_structured,
    changes_structure,
    plan_structured,
    structured_prune,
)
from slimkit.prune.structured_depth import auto_blocks
from slimkit.prune.structured_plan import Job, select
from slimkit.prune.structured_target import Target
from slimkit.train import recalibrate_batchnorm
from slimkit.zoo import build_model

SHAPE = (1, 28, 28)
X = (torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0)),)


def _resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return init_bn(build_model("resnet20", SHAPE, 10))


def _branch(model: nn.Module, module: str, x: tuple[torch.Tensor, ...] = X) -> dict:
    return next(b.as_dict() for b in find_branches(model, x)[0] if b.module == module)


def _replaced(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """A copy of ``model`` with the submodule ``name`` swapped for ``new``."""
    ref = copy.deepcopy(model)
    parent, _, child = name.rpartition(".")
    setattr(ref.get_submodule(parent), child, new)
    return ref


def _removed_blocks(record) -> list[str]:
    return [b["module"] for b in record.details["plans"][0]["blocks"]]


def test_removing_a_basic_block_branch_leaves_relu_of_the_input():
    model = _resnet20().double()
    x = (X[0].double(),)
    small = without_branches(model, [_branch(model, "layer1.1", x)])
    ref = _replaced(model, "layer1.1", nn.ReLU())  # relu2(shortcut(x)), shortcut = Identity
    torch.testing.assert_close(eval_out(small, x), eval_out(ref, x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(eval_out(small, x), eval_out(model, x))  # something did change
    assert type(model.layer1[1]) is not fx.GraphModule  # the copy was changed, not the model
    assert without_branches(model, []) is model


def test_removing_an_inverted_residual_branch_is_the_identity():
    torch.manual_seed(0)
    model = init_bn(build_model("mobilenetv2", SHAPE, 10, width_mult=0.5)).double()
    x = (X[0].double(),)
    branch = find_branches(model, x)[0][1]
    small = remove_branches(copy.deepcopy(model), [branch.as_dict()])
    ref = _replaced(model, branch.module, nn.Identity())
    torch.testing.assert_close(eval_out(small, x), eval_out(ref, x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(eval_out(small, x), eval_out(model, x))


def test_removal_drops_exactly_the_branch_state_and_keeps_names():
    model = _resnet20()
    branch = _branch(model, "layer2.1")
    small = without_branches(model, [branch])
    gone = {k for k in model.state_dict() if any(k.startswith(f"{m}.") for m in branch["modules"])}
    assert gone and {k.split(".")[2] for k in gone} == {"conv1", "bn1", "conv2", "bn2"}
    assert list(small.state_dict()) == [k for k in model.state_dict() if k not in gone]
    block = small.layer2[1]
    assert isinstance(block, fx.GraphModule) and type(block).__name__ == "BasicBlock"
    assert sorted(n for n, _ in block.named_children()) == ["relu2", "shortcut"]
    assert n_params(model) - n_params(small) == branch["params"]


def test_a_plan_for_another_architecture_is_refused():
    model = _resnet20()
    branch = _branch(model, "layer1.1")
    with pytest.raises(ConfigError, match="no module 'layer9.1'"):
        remove_branches(copy.deepcopy(model), [{**branch, "module": "layer9.1"}])
    with pytest.raises(ConfigError, match="another architecture"):
        remove_branches(copy.deepcopy(model), [{**branch, "nodes": ["conv7"]}])


def test_score_is_the_relative_output_change_and_zero_for_a_dead_branch():
    model = _resnet20().double().train()
    x = (X[0].double(),)
    branches = [b for b in find_branches(model, x)[0] if b.module in ("layer1.1", "layer3.2")]
    with torch.no_grad():
        model.layer3[2].bn2.weight.zero_()
        model.layer3[2].bn2.bias.zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = score_branches(model, branches, x)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    y = eval_out(model, x)
    y_without = eval_out(_replaced(model, "layer1.1", nn.ReLU()), x)
    expected = float(((y_without - y) ** 2).sum() / (y ** 2).sum())
    assert expected > 1e-6 and scores[0] == pytest.approx(expected, rel=1e-9)
    assert scores[1] == 0.0  # its branch outputs exactly zero: removing it changes nothing


def test_output_change_of_a_broken_model_is_infinite():
    ref = torch.ones(2, 3)
    nan = nn.Sequential(nn.Linear(3, 3), nn.Hardtanh())
    nan[0].weight.data.fill_(float("nan"))
    assert output_change(nan, (torch.ones(2, 3),), ref) == float("inf")


class _Pair(nn.Module):
    """Dict inputs, two outputs: ``{"same": a, "double": 2 * b}``."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"same": a, "double": 2 * b}


def test_output_change_averages_the_relative_change_of_every_output():
    a, b = torch.ones(2, 3), torch.full((2, 3), 3.0)
    ref = {"same": a, "double": b}  # "double" moves by ||2b - b||^2 / ||b||^2 = 1
    assert output_change(_Pair(), {"a": a, "b": b}, ref) == pytest.approx(0.5, rel=1e-12)
    assert output_change(_Pair(), ({"a": a, "b": b / 2},), ref) == 0.0  # (x,) unwraps
    with pytest.raises(ModelError, match=r"outputs \['same'\] of the reference; _Pair "
                                         r"returned \['same', 'double'\]"):
        output_change(_Pair(), {"a": a, "b": b}, {"same": a})


def test_rank_orders_by_score_and_reports_excluded_branches():
    model = _resnet20()
    ranked, skipped = rank_branches(model, X, X, lambda m: m == "layer3.1.bn2")
    scores = [b["score"] for b in ranked]
    assert scores == sorted(scores) and len(ranked) == 6
    assert "layer3.1" not in [b["module"] for b in ranked]
    assert skipped == [{"what": "block layer3.1/add",
                        "why": "its branch holds excluded layer layer3.1.bn2"}]


def test_blocks_share_removes_the_least_important_and_the_plan_replays(tmp_path: Path):
    model = _resnet20()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(ratio=0.0, blocks=0.5),
                          example_inputs=X)
    info = rec.details["blocks"]
    assert (info["removable"], info["removed"], info["asked"]) == (7, round(0.5 * 7), 0.5)
    removed = _removed_blocks(rec)
    by_score = sorted(info["scores"], key=info["scores"].get)
    assert sorted(removed) == sorted(k.split("/")[0] for k in by_score[:4])
    assert max(info["scores"][f"{m}/add"] for m in removed) <= min(
        info["scores"][k] for k in by_score[4:])
    assert sum("residual branch removed" in c for c in rec.changed) == 4
    assert all(any(c.startswith(f"{m}: residual branch removed") for c in rec.changed)
               for m in removed)
    assert rec.details["params"]["after"] == n_params(small) < n_params(model)
    assert eval_out(small, X).shape == eval_out(model, X).shape
    plan = json.loads(json.dumps(rec.details["plans"][0]))
    assert changes_structure(plan)
    fresh = _resnet20(seed=1)  # other weights: only the structure comes from the plan
    replayed = apply_structured(fresh, plan)
    assert not hasattr(replayed, "slimkit_spec")  # the zoo spec alone would rebuild 20 layers
    shapes = {k: v.shape for k, v in small.state_dict().items()}
    assert {k: v.shape for k, v in replayed.state_dict().items()} == shapes
    replayed.load_state_dict(small.state_dict())
    torch.testing.assert_close(eval_out(replayed, X), eval_out(small, X), rtol=0, atol=0)


class _TwoBlocks(nn.Module):
    """Keyword inputs, two residual blocks of different weight, two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.f = nn.Linear(8, 8)
        self.g = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.g.weight.mul_(0.01)  # g's branch matters least
            self.g.bias.zero_()

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.stem(x)) * gate
        h = h + self.f(h)
        h = h + self.g(h)
        return {"logits": self.head(h), "hidden": h}


def test_blocks_on_dict_data_score_every_output_and_remove_the_least_important():
    torch.manual_seed(0)
    model = _TwoBlocks()
    gen = torch.Generator().manual_seed(0)

    def x(n: int) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(n, 6, generator=gen), "gate": torch.rand(n, 8, generator=gen)}

    data = DataBundle("two-blocks", x(32), torch.randint(0, 3, (32,), generator=gen), x(8),
                      torch.randint(0, 3, (8,), generator=gen), 3)
    small, rec = stage_on(structured_prune, SlimModel(
        module=model, input_shape=(6,), inputs=(TensorSpec("x", (6,)), TensorSpec("gate", (8,))),
        input_style="dict"), StructuredPruneConfig(ratio=0.0, blocks=0.5), data)
    scores = rec.details["blocks"]["scores"]
    assert set(scores) == {"/add", "/add_1"} and scores["/add_1"] < scores["/add"]
    assert _removed_blocks(rec) == [""] and rec.details["plans"][0]["blocks"][0]["add"] == "add_1"
    inputs = x(4)
    without_g = copy.deepcopy(model)
    without_g.g = _Zero()
    want, got = eval_out(without_g, (inputs,)), eval_out(small, (inputs,))
    assert list(got) == ["logits", "hidden"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)


class _Zero(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(h)


def test_blocks_with_a_flops_target_reaches_it_and_exports(tmp_path: Path):
    model = _resnet20()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        target={"flops": 0.5}, blocks=0.3, round_to=1), example_inputs=X)
    assert rec.details["blocks"]["removed"] == round(0.3 * 7) == len(_removed_blocks(rec))
    t = rec.details["target"]
    assert t["reached"] and t["metric"] == "flops"
    flops = t["by_metric"]["flops"]
    assert flops["achieved"] <= 0.5 and flops["reached"] and flops["asked"] == 0.5
    measured = rec.details["flops"]["after"] / rec.details["flops"]["before"]
    assert measured == pytest.approx(flops["achieved"], rel=1e-9)
    assert rec.details["plans"][0]["slices"]  # channels were pruned after the blocks
    slim = SlimModel(module=small, input_shape=SHAPE, input_dtype="float32", name="r20",
                     arch=None)
    path = export_onnx(slim, tmp_path / "r20.onnx")
    parity = check_parity(slim, path, slim.example_inputs(2, seed=2), atol=1e-4)
    assert parity["ok"], parity


@pytest.mark.parametrize(("bad", "message"), [
    ({"ratio": 0.0, "blocks": 1.5}, "blocks must be a share"),
    ({"ratio": 0.0, "blocks": -0.1}, "blocks must be a share"),
    ({"ratio": 0.0, "blocks": "half"}, "blocks"),
    ({"target": {"flops": 0.5}, "blocks": "auto"}, "latency"),
    ({"target": {"latency": 0.5}, "blocks": "auto"}, "latency"),
    ({"ratio": 0.3, "blocks": "auto"}, "latency"),
    ({"target": {"flops": 0.5, "bogus": 1.0}}, "['flops', 'params', 'latency']"),
])
def test_config_rejects_bad_blocks_and_targets(bad: dict, message: str):
    with pytest.raises(ValidationError, match=message.replace("[", r"\[")):
        StructuredPruneConfig(**bad)


def test_multi_key_target_is_accepted_in_a_fixed_order():
    cfg = StructuredPruneConfig(target={"latency": 0.9, "params": 0.5, "flops": 0.6},
                                blocks="auto")
    assert list(cfg.target) == ["flops", "params", "latency"] and cfg.blocks == "auto"
    again = StructuredPruneConfig.model_validate(json.loads(cfg.model_dump_json()))
    assert again.target == cfg.target and again.blocks == "auto"


def test_auto_blocks_search_is_recorded_and_meets_the_target():
    model = _resnet20()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        target={"flops": 0.6, "latency": 0.99}, blocks="auto"), example_inputs=X)
    info = rec.details["blocks"]
    trials = info["trials"]
    assert trials and [t["blocks"] for t in trials] == list(range(len(trials)))
    assert all(t["flops"] <= 0.6 + 1e-9 for t in trials)  # every trial met the count target
    # The search stops at the first count that needs no extra channel pruning.
    assert [t["extra_channels"] for t in trials[:-1]] == [True] * (len(trials) - 1)
    reached = [t for t in trials if t["reached"]]
    # Without data there are no outputs to judge: the candidate keeping the most FLOPs wins
    # (fewer blocks on a tie); if none meets the latency, the fastest.
    assert info["judge"] == "most flops kept (no data to judge outputs on)"
    assert all("output_change" not in t for t in trials)
    if reached:
        best = min(reached, key=lambda t: (-t["flops"], t["blocks"]))
    else:
        best = min(trials, key=lambda t: (t["latency"], t["blocks"]))
    assert info["removed"] == best["blocks"]
    assert len(_removed_blocks(rec)) == info["removed"] and info["asked"] == "auto"
    assert set(rec.details["target"]["by_metric"]) == {"flops", "latency"}
    assert rec.details["target"]["by_metric"]["flops"]["achieved"] <= 0.6
    # The winner's width step is the recorded step, and the plan replays to the result.
    assert rec.details["target"]["steps"][0]["achieved"] == {
        "flops": best["flops"], "latency": best["latency"]}
    replayed = apply_structured(_resnet20(seed=1), json.loads(json.dumps(
        rec.details["plans"][0])))
    replayed.load_state_dict(small.state_dict())
    torch.testing.assert_close(eval_out(replayed, X), eval_out(small, X), rtol=0, atol=0)


@pytest.mark.parametrize("blocks", [0.5, "auto"])
def test_plan_structured_with_blocks_replays(blocks):
    model = _resnet20()
    g = torch.Generator().manual_seed(2)
    data = build_bundle("t", torch.randn(48, *SHAPE, generator=g), torch.arange(48) % 4, seed=0)
    target = {"flops": 0.6, "latency": 1.0} if blocks == "auto" else {"flops": 0.6}
    cfg = StructuredPruneConfig(target=target, blocks=blocks, calib_batch_size=8,
                                calib_batches=2)
    plan = plan_structured(model, cfg, data=data, example_inputs=X)
    assert set(plan["target"]["by_metric"]) == set(target)
    if blocks == 0.5:
        assert len(plan["blocks"]) == round(0.5 * 7)
    small = apply_structured(model, json.loads(json.dumps(plan)))
    kept = fractions_of(model, ["flops"], X)["flops"](small)
    assert kept == pytest.approx(plan["target"]["achieved"]) and kept <= 0.6 + 1e-9
    assert n_params(small) < n_params(model)
    with pytest.raises(ConfigError, match="cannot be combined with a fixed ratio"):
        plan_structured(model, cfg.model_copy(update={"blocks": "auto"}), data=data,
                        example_inputs=X, ratio=0.3)


def _convs(m: nn.Module) -> int:
    return sum(isinstance(x, nn.Conv2d) for x in m.modules())


@pytest.mark.parametrize(("latency", "blocks", "extra"), [
    (0.7, 3, [True, True, True, False]),  # 19 convs -> 13: three blocks, none reached before
    (1.0, 0, [False]),  # channels alone are fast enough: no block goes
])
def test_auto_blocks_picks_a_count_that_meets_the_latency(latency, blocks, extra):
    # A deterministic stand-in for latency: the share of conv layers left (channel pruning
    # cannot lower it; only removing blocks can).
    model = _resnet20().eval()
    cfg = StructuredPruneConfig(target={"flops": 0.6, "latency": latency}, blocks="auto")
    fractions = {**fractions_of(model, ["flops"], X), "latency": lambda m: _convs(m) / 19}
    ranked, _ = rank_branches(model, X, X)
    trials: list[dict] = []
    k, _, _ = auto_blocks(model, Job(cfg, None, X, select(model, cfg)), ranked,
                          Target(dict(cfg.target), fractions), trials, X)
    assert k == blocks and [t["extra_channels"] for t in trials] == extra
    assert [t["reached"] for t in trials] == [False] * (len(extra) - 1) + [True]
    assert trials[-1]["latency"] == pytest.approx((19 - 2 * blocks) / 19)


def test_auto_blocks_keeps_the_candidate_whose_output_moves_least():
    # Latency stands in as the FLOPs share (deterministic): every count reaches 0.8 by
    # pruning more channels, until removing blocks alone gets there.
    model = _resnet20().eval()
    cfg = StructuredPruneConfig(target={"flops": 0.9, "latency": 0.8}, blocks="auto",
                                calib_batch_size=32)
    flops = fractions_of(model, ["flops"], X)["flops"]
    g = torch.Generator().manual_seed(1)
    data = build_bundle("t", torch.randn(80, *SHAPE, generator=g), torch.arange(80) % 4, seed=0)
    inputs = (calibration_subset(data, 64),)
    ranked, _ = rank_branches(model, X, inputs)
    trials: list[dict] = []
    k, (pruned, plan, found), judge = auto_blocks(
        model, Job(cfg, data, X, select(model, cfg)), ranked,
        Target(dict(cfg.target), {"flops": flops, "latency": flops}), trials, inputs)
    assert [t["blocks"] for t in trials] == list(range(len(trials))) and len(trials) >= 2
    assert all(t["reached"] and t["latency"] <= 0.8 + 1e-9 for t in trials)
    changes = [t["output_change"] for t in trials]
    assert all(isinstance(c, float) and c > 0 for c in changes) and len(set(changes)) > 1
    assert k == min(trials, key=lambda t: (t["output_change"], t["blocks"]))["blocks"]
    assert judge == "least output change after BatchNorm re-estimation"
    assert type(model.layer1[1]) is not fx.GraphModule  # candidates were copies
    # The winner's width step comes back as searched: its plan replays to the same model, its
    # record is the trial's, and its change was judged on re-estimated BatchNorm statistics
    # (of a copy: the returned model keeps the statistics it was pruned with).
    assert found["asked"] == dict(cfg.target) and found["achieved"] == {
        "flops": trials[k]["flops"], "latency": trials[k]["latency"]}
    replayed = apply_structured(without_branches(model, ranked[:k]), plan)
    torch.testing.assert_close(eval_out(replayed, inputs), eval_out(pruned, inputs))
    ref = eval_out(model, inputs)
    again = copy.deepcopy(pruned)
    recalibrate_batchnorm(again, inputs, batch_size=32)
    assert output_change(again, inputs, ref) == pytest.approx(trials[k]["output_change"])
    assert output_change(pruned, inputs, ref) != pytest.approx(trials[k]["output_change"])


def test_excluded_layer_keeps_its_block():
    model = _resnet20()
    small, rec = stage_on(structured_prune, model, StructuredPruneConfig(
        ratio=0.0, blocks=1.0, exclude=["layer1.1.conv1"]), example_inputs=X)
    removed = _removed_blocks(rec)
    assert "layer1.1" not in removed and len(removed) == 6
    assert type(small.layer1[1].conv1) is nn.Conv2d and not hasattr(small.layer1[0], "conv1")
    assert {"what": "block layer1.1/add",
            "why": "its branch holds excluded layer layer1.1.conv1"} in rec.skipped


def test_input_model_is_untouched_by_depth_pruning():
    model = _resnet20().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    small, _ = stage_on(structured_prune, model, StructuredPruneConfig(ratio=0.2, blocks=0.5),
                        example_inputs=X)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(model.state_dict()) == list(before)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert model.training and small is not model


def test_both_branches_of_one_transformer_block_can_be_removed():
    torch.manual_seed(0)
    model = build_model("vit", SHAPE, 10, dim=32, depth=1, heads=4).eval()
    branches = [b.as_dict() for b in find_branches(model, X)[0]]
    assert [(b["module"], b["nodes"]) for b in branches] == [
        ("blocks.0", ["norm1", "attn"]), ("blocks.0", ["norm2", "mlp"])]
    ref = _replaced(model, "blocks.0", nn.Identity())
    for order in (branches, branches[::-1]):  # a ranking may put either one first
        small = without_branches(model, order)
        torch.testing.assert_close(eval_out(small, X), eval_out(ref, X), rtol=0, atol=0)


def test_latency_is_timed_at_every_asked_batch_size():

    model = _resnet20().eval()
    seen: set[int] = set()
    model.register_forward_pre_hook(lambda m, args: seen.add(args[0].shape[0]))
    same = fractions_of(model, ["latency"], X, batches=[1, 5])["latency"](copy.deepcopy(model))
    assert seen == {1, 5} and 0.5 < same < 2.0  # the model against itself: a ratio near 1
    with pytest.raises(ValidationError, match="latency_batches"):
        StructuredPruneConfig(target={"latency": 0.5}, latency_batches=[0])
