"""The early_exit stage: calibration on validation data only, the record, bad input with its
exact message, the artifact round trip and the ONNX chain that stops, per exit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tests.exit._models import ZeroedExit, no_test
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.core.stages import StageContext
from slimkit.data.bundle import DataBundle
from slimkit.exit import calibrate as C
from slimkit.exit.config import EarlyExitConfig
from slimkit.exit.model import EarlyExitModel, exit_index
from slimkit.exit.onnx import check_exit_parity, export_exit_onnx
from slimkit.exit.runner import EarlyExitRunner
from slimkit.exit.stage import early_exit
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.model import SlimModel

FAST = {"train": {"epochs": 2, "batch_size": 32, "lr": 1e-2}, "latency_samples": 0,
        "margin": "none"}  # the margin has its own tests (test_margin.py)


def _cfg(**kw) -> EarlyExitConfig:
    return EarlyExitConfig.model_validate({**FAST, **kw})


def _run(model: SlimModel, data: DataBundle, **kw) -> tuple[SlimModel, object]:
    return early_exit(model, _cfg(**kw), StageContext(data=data, progress=False))


def test_thresholds_are_chosen_on_validation_data_and_never_read_the_test(trained_resnet):
    model, data = trained_resnet
    out, record = _run(model, no_test(data), report_split="none", max_drop=2.0)
    assert isinstance(out.module, EarlyExitModel)
    # The same run with the test split readable (and its labels scrambled) chooses the same.
    scrambled = DataBundle(data.name, data.x_train, data.y_train, data.x_test,
                           data.y_test.flip(0), 4)
    out2, record2 = _run(model, scrambled, max_drop=2.0)
    assert record2.details["thresholds"] == record.details["thresholds"]
    assert "test" in record2.details and "test" not in record.details
    # The thresholds keep the validation top-1 within the allowed drop.
    val = record.details["val"]
    assert val["static_top1"] - val["top1"] <= 0.02 + 1e-12
    assert any(t is not None for t in record.details["thresholds"])


def test_the_record_matches_a_recount_on_the_validation_split(trained_resnet):
    model, data = trained_resnet
    out, record = _run(model, data, max_drop=2.0)
    ee = out.module
    from slimkit.data.split import split_indices

    cal = torch.from_numpy(split_indices(data.y_train, 0.2, seed=0)[1])
    x, y = data.x_train[cal], data.y_train[cal]
    with torch.no_grad():
        where = exit_index(ee, x)
        pred = ee(x).argmax(1)
    val = record.details["val"]
    assert val["n"] == len(y)
    assert val["top1"] == pytest.approx(float((pred == y).double().mean()), abs=1e-12)
    # Only open exits remain in the model; a closed one is removed and said so.
    assert len(ee.heads) == len(record.details["exits"]) == len(record.details["thresholds"])
    assert all(t is not None for t in record.details["thresholds"])
    assert [s["what"] for s in record.skipped] == [
        f"exit after {b}" for b in record.details.get("closed_exits", [])]
    counts = torch.bincount(where, minlength=len(ee.heads) + 1).double() / len(y)
    assert val["exit_fraction"] == pytest.approx(counts.tolist(), abs=1e-12)
    costs = record.details["costs"]["path_macs"]
    assert costs == sorted(costs) and costs[-1] > record.details["costs"]["static_macs"]
    expected = sum(f * c for f, c in zip(counts.tolist(), costs, strict=True))
    assert val["mean_cost"] == pytest.approx(expected, rel=1e-9)
    assert record.changed and any(line.startswith("validation top-1") for line in record.changed)
    assert len(record.details["sweep"]) >= 3


def test_the_frozen_backbone_is_left_exactly_as_it_was(trained_resnet):
    model, data = trained_resnet
    out, _ = _run(model, data, max_drop=2.0)
    before = model.module.state_dict()
    after = out.module.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_unknown_block_is_refused_naming_the_closest(trained_resnet):
    model, data = trained_resnet
    with pytest.raises(ConfigError, match=re.escape(
            "early_exit: the model has no block 'layr1'. Did you mean 'layer1'? Name blocks "
            "as in model.named_modules(), e.g. adapt, conv1, bn1, relu")):
        _run(model, data, exits=["layr1"])


class TupleBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class NotPerSample(nn.Module):
    """After ``blocks.0`` the forward still needs the batch size as a number."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = TupleBlock()
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.pair(x)
        n = a.shape[0]
        h = self.blocks(a)
        return self.fc(h.reshape(n, -1))


def _tiny(module: nn.Module) -> tuple[SlimModel, DataBundle]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=gen), torch.randint(0, 2, (40,), generator=gen)
    data = DataBundle("tiny", x, y, x[:8], y[:8], 2)
    return SlimModel(module=module, input_shape=(4,), num_classes=2), data


def test_a_block_whose_output_cannot_feed_a_head_is_refused():
    model, data = _tiny(NotPerSample())
    with pytest.raises(ModelError, match=re.escape(
            "early_exit: block 'pair' returns a tuple; an exit head needs a float [batch, "
            "channels, ...] tensor (batch 4); put the exit after another block")):
        _run(model, data, exits=["pair"])


def test_a_cut_the_rest_of_the_model_cannot_resume_from_is_refused():
    model, data = _tiny(NotPerSample())
    with pytest.raises(ModelError, match=re.escape(
            "early_exit: cannot stop after block 'blocks.0': the rest of the model also reads "
            "a int computed before it, which is not one row per sample; put the exit after a "
            "later block")):
        _run(model, data, exits=["blocks.0"])


def test_a_block_that_runs_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.lin(self.lin(x)))

    model, data = _tiny(Twice())
    with pytest.raises(ConfigError, match=re.escape(
            "early_exit: block 'lin' runs 2 times in the model's forward; an exit goes after "
            "a block that runs exactly once")):
        _run(model, data, exits=["lin"])


def test_a_target_no_threshold_meets_keeps_the_static_model():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    data = DataBundle("sign", x, y, x[:20], y[:20], 2)
    model = SlimModel(module=ZeroedExit(), input_shape=(4,), num_classes=2)
    out, record = _run(model, data, exits=["blocks.0"], max_drop=0.0)
    assert not isinstance(out.module, EarlyExitModel)
    assert record.skipped == [{"what": "early_exit", "why": (
        "no threshold keeps top-1 within 0 points of the static model's 100.00% on the "
        "validation split (20 samples); kept the static model")}]
    assert torch.equal(out.module(x), model.module(x))


def test_choose_keeps_an_exit_closed_when_every_threshold_costs_too_much():
    # Exit 0 is wrong on its most confident samples; exit 1 is always right.
    conf = torch.tensor([[0.9, 0.5], [0.8, 0.6], [0.2, 0.7], [0.1, 0.8]])
    correct = torch.tensor([[False, True], [False, True], [True, True], [True, True]])
    stats = C.ExitStats(conf, correct, torch.ones(4, dtype=torch.bool))
    assert C.choose(stats, 0.0) == [None, 0.5]
    # With 50 points allowed, exit 0 opens at its lowest value that costs at most 2 samples.
    t = C.choose(stats, 50.0)
    assert t[0] is not None and C.summarize(stats, t)["top1"] >= 0.5


def test_the_artifact_rebuilds_the_exits_and_thresholds(trained_resnet, tmp_path: Path):
    model, data = trained_resnet
    out, _ = _run(model, data, max_drop=5.0)
    save_artifact(out, tmp_path / "artifact")
    back = load_artifact(tmp_path / "artifact")
    assert isinstance(back.module, EarlyExitModel)
    assert back.module.plan == out.module.plan
    assert back.arch["transforms"][-1]["kind"] == "early_exit"
    x = data.x_test
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), out.module(x), rtol=0, atol=0)
        assert torch.equal(exit_index(back.module, x), exit_index(out.module, x))


def _mixed(out: SlimModel, x: torch.Tensor) -> None:
    """Thresholds between two samples' confidences, so that the test samples take every
    path and no sample sits on a threshold (where float rounding would decide its exit)."""
    from slimkit.exit.model import confidence

    with torch.no_grad():
        exits, _ = out.module.exit_outputs(x)
    c0, c1 = (confidence(e, "max_softmax") for e in exits)
    t0 = _between(c0, 0.6)
    out.module.set_thresholds([t0, _between(c1[c0 < t0], 0.5)])


def _between(values: torch.Tensor, q: float) -> float:
    v = values.double().sort().values
    i = min(max(int(q * len(v)), 1), len(v) - 1)
    return float((v[i - 1] + v[i]) / 2)


def test_conv_heads_are_sized_from_the_map_rebuilt_and_exported(trained_resnet, tmp_path):
    """head: conv puts a stride-2 3x3 conv (twice the channels) before the pooling; the head
    computes exactly that by hand, the artifact rebuilds it, the ONNX chain matches."""
    import torch.nn.functional as F

    model, data = trained_resnet
    out, record = _run(model, data, max_drop=5.0, min_exit_fraction=0.0, head="conv")
    ee = out.module
    for row in ee.plan["exits"]:
        c, h, w = row["feature_shape"]
        assert row["conv"] == [c, 2 * c]
        assert row["channels"] == (4 * 2 * c if min(h, w) >= 3 else 2 * c)
        assert f"{2 * c}-channel conv" in " ".join(record.changed)
    x = data.x_test[:16]
    with torch.no_grad():
        exits, _ = ee.exit_outputs(x)
        feat = ee.segments()[0].module(x)[1]
        conv, bn = ee.heads[0].conv[0], ee.heads[0].conv[1]
        y = F.relu(F.batch_norm(F.conv2d(feat.double(), conv.weight.double(), stride=2,
                                         padding=1), bn.running_mean.double(),
                                bn.running_var.double(), bn.weight.double(), bn.bias.double(),
                                eps=bn.eps))
        hh, ww = y.shape[2] // 2, y.shape[3] // 2
        pooled = torch.cat([y[:, :, :hh, :ww].mean((2, 3)), y[:, :, :hh, ww:].mean((2, 3)),
                            y[:, :, hh:, :ww].mean((2, 3)), y[:, :, hh:, ww:].mean((2, 3))], 1)
        ref = pooled @ ee.heads[0].fc.weight.double().T + ee.heads[0].fc.bias.double()
    torch.testing.assert_close(exits[0].double(), ref, rtol=0, atol=1e-4)
    save_artifact(out, tmp_path / "artifact")
    back = load_artifact(tmp_path / "artifact").module
    with torch.no_grad():
        torch.testing.assert_close(back(data.x_test), ee(data.x_test), rtol=0, atol=0)
    _mixed(out, x)
    export_exit_onnx(out, tmp_path / "chain")
    assert check_exit_parity(out, tmp_path / "chain", x)["ok"]


def test_the_onnx_chain_matches_pytorch_at_every_exit_and_stops(trained_resnet, tmp_path):
    model, data = trained_resnet
    out, _ = _run(model, data, max_drop=5.0, min_exit_fraction=0.0)
    assert len(out.module.heads) == 2
    x = data.x_test[:32]
    _mixed(out, x)
    export_exit_onnx(out, tmp_path / "chain")
    assert sorted(p.name for p in (tmp_path / "chain").iterdir()) == [
        "early_exit.json", "early_exit.onnx", "runner.py", "step_0.onnx", "step_1.onnx",
        "step_2.onnx"]
    parity = check_exit_parity(out, tmp_path / "chain", x)
    assert parity["ok"], parity
    assert parity["graph_same_exits"] and parity["graph_max_abs_diff"] <= 1e-4
    assert len(parity["exit_max_abs_diff"]) == 3
    where = exit_index(out.module, x)
    assert set(where.tolist()) == {0, 1, 2}

    runner = EarlyExitRunner(tmp_path / "chain")
    runner.graph = None  # the chain, step by step
    calls: list[int] = []
    for k, s in enumerate(runner.sessions):
        runner.sessions[k] = _Counting(s, k, calls)
    first = int((where == 0).nonzero()[0])
    runner.run({"input": x[first:first + 1].numpy()})
    assert calls == [0], "a sample leaving at the first exit runs only the first step"

    # The whole model as one ONNX file (every exit computed, each sample's picked) matches.
    path = export_onnx(out, tmp_path / "model.onnx")
    assert check_parity(out, path, x)["ok"]


def test_the_if_graph_runs_only_the_steps_up_to_the_exit_taken(trained_resnet, tmp_path):
    """ONNX Runtime's profile of one call: a sample leaving at exit k runs no node of a later
    step; a closed exit's head is gone from the graph."""
    import json

    import onnx
    import onnxruntime as ort

    model, data = trained_resnet
    out, _ = _run(model, data, max_drop=5.0, min_exit_fraction=0.0)
    x = data.x_test[:32]
    _mixed(out, x)
    export_exit_onnx(out, tmp_path / "chain")
    where = exit_index(out.module, x)
    for k in range(3):
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(tmp_path / f"profile{k}")
        session = ort.InferenceSession(str(tmp_path / "chain" / "early_exit.onnx"), opts,
                                       providers=["CPUExecutionProvider"])
        i = int((where == k).nonzero()[0])
        logits, taken = session.run(None, {"input": x[i:i + 1].numpy()})
        assert int(taken) == k
        events = json.loads(Path(session.end_profiling()).read_text())
        ran = {e["name"].split("/")[0] for e in events if e.get("cat") == "Node"}
        assert {f"s{j}" for j in range(k + 1)} <= ran, ran
        assert not ran & {f"s{j}" for j in range(k + 1, 3)}, (k, ran)

    out.module.set_thresholds([None, out.module.thresholds[1]])
    export_exit_onnx(out, tmp_path / "closed")
    graph = onnx.load(str(tmp_path / "closed" / "early_exit.onnx"))
    made = {o for n in _all_nodes(graph.graph) for o in n.output}
    assert "s1/exit_logits" in made and "s0/exit_logits" not in made
    assert check_exit_parity(out, tmp_path / "closed", x)["ok"]


def _all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.g.node:
                yield from _all_nodes(a.g)


class _Counting:
    def __init__(self, session, k: int, calls: list[int]) -> None:
        self.session, self.k, self.calls = session, k, calls

    def run(self, *args):
        self.calls.append(self.k)
        return self.session.run(*args)


@pytest.mark.parametrize("name", ["vit", "text_encoder"])
def test_transformers_get_exits_on_their_blocks(name: str, tmp_path: Path):
    from tests.exit._models import inputs, zoo_model

    model = zoo_model(name)
    gen = torch.Generator().manual_seed(0)
    x = inputs(model, 96, seed=1)
    y = torch.randint(0, 4, (96,), generator=gen)
    data = DataBundle("random", x, y, x[:24], y[:24], 4)
    out, record = _run(model, data, max_drop=100.0, min_exit_fraction=0.0,
                       train={"epochs": 1, "batch_size": 32})
    assert [e["block"] for e in record.details["exits"]] == ["blocks.0", "blocks.1"]
    _mixed(out, x[:32])
    export_exit_onnx(out, tmp_path / "chain")
    parity = check_exit_parity(out, tmp_path / "chain", x[:32])
    assert parity["ok"], parity


def test_a_stream_trains_on_train_and_calibrates_on_val_without_reading_test(trained_resnet):
    from slimkit.data.stream import StreamData

    model, data = trained_resnet

    def chunks(x: torch.Tensor, y: torch.Tensor) -> list:
        return [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(y), 32)]

    def no_test() -> list:
        raise AssertionError("the test stream was read")

    stream = StreamData("stream", train=chunks(data.x_train[:160], data.y_train[:160]),
                        val=chunks(data.x_train[160:], data.y_train[160:]), test=no_test,
                        num_classes=4)
    out, record = _run(model, stream, max_drop=3.0, report_split="none")
    assert isinstance(out.module, EarlyExitModel)
    assert record.details["val"]["n"] == len(data.y_train) - 160
    assert record.details["sweep_split"] == "val"


def test_a_closed_exit_is_removed_with_its_head():
    from tests.exit._models import inputs, wrapped

    from slimkit.exit.stage import _drop_closed

    ee, model = wrapped("resnet20")
    x = inputs(model, 8).double()
    stats = C.gather(ee, [(x, torch.zeros(8, dtype=torch.long))])
    details: dict = {"exits": ee.plan["exits"]}
    head1 = {k: v.clone() for k, v in ee.heads[1].state_dict().items()}
    out, kept = _drop_closed(ee, stats, [None, 0.5], details)
    assert out.blocks == ["layer2.2"] and len(out.heads) == 1 and out.thresholds == [0.5]
    assert details["closed_exits"] == ["layer1"] and details["exits"] == out.plan["exits"]
    assert all(torch.equal(v, head1[k]) for k, v in out.heads[0].state_dict().items())
    torch.testing.assert_close(kept.conf, stats.conf[:, 1:], rtol=0, atol=0)
    with torch.no_grad():
        exits, final = out.exit_outputs(x)
        torch.testing.assert_close(exits[0], ee.exit_outputs(x)[0][1], rtol=0, atol=0)
        torch.testing.assert_close(final, ee.backbone(x), rtol=0, atol=0)


def test_an_exit_taking_too_few_samples_is_closed_and_the_rest_chosen_again():
    # Exit 0 is right only on its most confident sample; exit 1 is right everywhere.
    conf = torch.stack([torch.linspace(0.9, 0.3, 10), torch.full((10,), 0.5)], 1)
    correct = torch.stack([torch.arange(10) == 0, torch.ones(10, dtype=torch.bool)], 1)
    stats = C.ExitStats(conf, correct, torch.ones(10, dtype=torch.bool))
    t = C.choose(stats, 0.0)
    assert 0.9 - 0.6 / 9 < t[0] <= 0.9 and t[1] == pytest.approx(0.5)  # only sample 0 exits
    assert C.summarize(stats, t)["exit_fraction"] == pytest.approx([0.1, 0.9, 0.0])
    t = C.choose(stats, 0.0, min_fraction=0.2)
    assert t[0] is None and t[1] == pytest.approx(0.5)
    assert C.summarize(stats, t)["exit_fraction"] == pytest.approx([0.0, 1.0, 0.0])


class UserNet(nn.Module):
    """A user's own CNN: exits go after the blocks the user names."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage2(self.stage1(self.stem(x)) + x)
        return self.head(h.mean((2, 3)))


def test_a_users_model_gets_exits_after_the_blocks_it_names(tmp_path: Path):
    from tests.exit._models import class_data

    data = class_data(n_train=96, n_test=32)
    torch.manual_seed(0)
    model = SlimModel(module=UserNet().eval(), input_shape=(1, 8, 8), num_classes=4)
    out, record = _run(model, data, exits=["stage1"], max_drop=100.0, min_exit_fraction=0.0)
    assert out.module.blocks == ["stage1"] and record.details["exits"][0]["pool"] == "grid"
    x = data.x_test
    with torch.no_grad():
        exits, final = out.module.exit_outputs(x)
        feat = model.module.stage1(model.module.stem(x))
        torch.testing.assert_close(exits[0], out.module.heads[0](feat), rtol=0, atol=0)
        torch.testing.assert_close(final, model.module(x), rtol=0, atol=0)
    out.module.set_thresholds([_between(confidence_of(out, x), 0.5)])
    export_exit_onnx(out, tmp_path / "chain")
    assert check_exit_parity(out, tmp_path / "chain", x)["ok"]


def confidence_of(out: SlimModel, x: torch.Tensor) -> torch.Tensor:
    from slimkit.exit.model import confidence

    with torch.no_grad():
        return confidence(out.module.exit_outputs(x)[0][0], "max_softmax")


def test_a_one_pixel_map_is_pooled_whole_not_in_quarters():
    from slimkit.exit.plan import build_plan

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 8), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 1, 8, 8)
    plan = build_plan(net, ["0"], x, 2, "max_softmax", "auto")
    assert plan["exits"][0]["pool"] == "spatial" and plan["exits"][0]["channels"] == 4
    ee = EarlyExitModel(net, plan).eval()
    with torch.no_grad():
        exits, _ = ee.exit_outputs(x)
        torch.testing.assert_close(exits[0], ee.heads[0].fc(net[0](x).flatten(1)), rtol=0,
                                   atol=0)
