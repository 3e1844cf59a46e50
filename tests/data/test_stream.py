"""Streaming data: any iterable of batches for calibration, training and evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slimkit.core.errors import ConfigError, DataError
from slimkit.core.stages import STAGES, StageContext
from slimkit.data.stream import StreamData
from slimkit.io.model import SlimModel
from slimkit.measure.tasks import data_batches, get_task
from slimkit.train.config import TrainConfig
from slimkit.train.loop import fit


def _xy(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _stream(x: torch.Tensor, y: torch.Tensor, bs: int = 16, **kw) -> StreamData:
    loader = DataLoader(TensorDataset(x, y), batch_size=bs)
    return StreamData("toy", train=loader, test=loader, num_classes=3, **kw)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_training_on_a_stream_takes_its_batches_in_order():
    x, y = _xy()
    stream = _stream(x, y, val=DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16))
    model, manual = _net(), _net()
    fit(model, stream, TrainConfig(epochs=2, batch_size=16, lr=0.1, optimizer="sgd",
                                   momentum=0.0, scheduler="none"), progress=False)
    opt = torch.optim.SGD(manual.parameters(), lr=0.1)
    for _ in range(2):
        for i in range(0, 96, 16):
            opt.zero_grad()
            nn.functional.cross_entropy(manual(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
    for a, b in zip(model.state_dict().values(), manual.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_without_a_val_stream_the_first_batches_are_held_out_of_training():
    x, y = _xy()
    stream = _stream(x, y, holdout=2)
    seen = [b[0] for b in stream.batches("train")]
    assert len(seen) == 4 and torch.equal(seen[0], x[32:48])
    val = [b[0] for b in stream.batches("val")]
    assert len(val) == 2 and torch.equal(val[1], x[16:32])


def test_evaluation_on_a_stream_equals_in_memory():
    x, y = _xy()
    model = _net()
    task = get_task("classification")
    streamed = task.evaluate(model, lambda: _stream(x, y, bs=7).batches("test"))
    assert streamed == task.evaluate(model, data_batches(x, y))


def test_calibration_reads_only_what_it_needs():
    x, y = _xy()
    read = []

    def source():
        for i in range(0, 96, 16):
            read.append(i)
            yield x[i:i + 16], y[i:i + 16]

    stream = StreamData("gen", train=source, test=source, num_classes=3, holdout=0)
    calib = stream.calibration(40)
    assert torch.equal(calib, x[:40]) and read == [0, 16, 32]


def test_ptq_on_a_stream_equals_ptq_on_the_same_samples():
    x, y = _xy()
    model = SlimModel(module=_net().eval(), input_shape=(6,), num_classes=3)
    stream = _stream(x, y, holdout=0)
    cfg = STAGES.get("ptq").config(num_samples=48)
    streamed, _ = STAGES.get("ptq").apply(model.copy(), cfg, StageContext(data=stream))
    from slimkit.quant.ptq import _ptq

    direct, _ = _ptq(model.copy().module, cfg, x[:48])
    with torch.no_grad():
        torch.testing.assert_close(streamed.module(x), direct(x), rtol=0, atol=0)


def test_bad_streams_are_named():
    x, y = _xy()
    empty = StreamData("empty", train=list, test=list)
    with pytest.raises(DataError, match="the test stream of 'empty' yielded no batch"):
        list(empty.batches("test"))

    def changing():
        yield x[:8], y[:8]
        yield x[:8, :4], y[:8]

    bad = StreamData("mixed", train=changing, test=changing)
    with pytest.raises(DataError, match="'mixed' test batch 1 has inputs input float32 2-d"):
        list(bad.batches("test"))

    once = StreamData("once", train=iter([(x[:8], y[:8])]), test=[(x[:8], y[:8])], holdout=0)
    list(once.batches("train"))
    with pytest.raises(DataError, match="one-shot iterator .* give a function returning"):
        list(once.batches("train"))

    endless = StreamData("gen", train=lambda: iter([(x[:3], y[:3])]), test=[(x, y)], holdout=0,
                         num_classes=3)
    with pytest.raises(ConfigError, match="the train stream of 'gen' has no length .* set "
                                          "max_steps"):
        fit(_net(), endless, TrainConfig(epochs=1), progress=False)
    with pytest.raises(DataError, match="its train stream ended after 3 sample"):
        endless.calibration(64)


def test_dict_batches_with_labels_key_split_into_inputs_and_labels():
    ids = torch.randint(0, 9, (4, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.ones(4)}
    stream = StreamData("hf", train=[batch], test=[batch])
    (x, labels), = list(stream.batches("test"))
    assert set(x) == {"input_ids", "attention_mask"} and torch.equal(labels, torch.ones(4))


def test_a_stream_and_a_bundle_give_the_same_compress_verdict(tmp_path):
    """End to end: compress() on a language model fed by a generator, judged by perplexity."""
    from tests.measure.test_tasks import TinyLM, _lm_data  # noqa: PLC0415

    import slimkit

    x, y = _lm_data(n=64)

    def chunks():
        for i in range(0, 64, 16):
            yield {k: v[i:i + 16] for k, v in x.items()}

    stream = StreamData("lm-stream", train=chunks, test=chunks, task="causal_lm", holdout=1)
    torch.manual_seed(0)
    model = slimkit.wrap(TinyLM(), {k: v[:2] for k, v in x.items()}, output="logits",
                         dynamic_axes={"input_ids": {1: "sequence"},
                                       "attention_mask": {1: "sequence"}})
    recipe = {"target": {"max_metric_drop": {"perplexity": 0.5}},
              "stages": [{"kind": "dynamic_quant"}],
              "measure": {"batch_sizes": [1], "repeats": 2, "warmup": 1}}
    report = slimkit.compress(model, stream, recipe, tmp_path / "out", progress=False,
                              log=lambda _m: None)
    base, final = report["baseline"]["metrics"], report["final"]["metrics"]
    assert base["perplexity"] == pytest.approx(
        get_task("causal_lm").evaluate(model.module, data_batches(x, y, 16))["perplexity"])
    crit = report["verdict"]["criteria"][0]
    assert crit["name"] == "max_metric_drop (perplexity)"
    assert crit["achieved"] == pytest.approx(final["perplexity"] - base["perplexity"])
    assert report["data"]["n_test"] is None and report["fidelity"]["output"] == "logits"
    html = (tmp_path / "out" / "report.html").read_text()
    assert '<th scope="row">Perplexity</th>' in html and "Top-1 accuracy" not in html
    assert "Perplexity against size on disk" in html
    assert f"perplexity {base['perplexity']:.4g} → {final['perplexity']:.4g}" in html


def test_training_reads_the_test_split_once_at_the_end():
    x, y = _xy()
    reads = []

    def test_source():
        reads.append(1)
        yield x[:32], y[:32]

    stream = StreamData("toy", train=DataLoader(TensorDataset(x, y), batch_size=16),
                        test=test_source, num_classes=3, holdout=1)
    history = fit(_net(), stream, TrainConfig(epochs=3, batch_size=16), progress=False)
    assert len(reads) == 1
    assert [("test_top1" in e) for e in history["epochs"]] == [False, False, True]
