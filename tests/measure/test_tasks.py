"""Tasks: metrics against float64 references, directions, the training loss, bad metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimkit.core.errors import ConfigError, DataError, ModelError
from slimkit.data.bundle import DataBundle
from slimkit.measure.quality import accuracy
from slimkit.measure.tasks import custom_task, data_batches, embed, get_task
from slimkit.pipeline.recipe import Target
from slimkit.pipeline.verdict import check_target, judge
from slimkit.train.config import TrainConfig
from slimkit.train.loop import fit


class TinyLM(nn.Module):
    """input_ids + attention_mask -> {"logits": [B, T, V]}: a causal bigram model."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.out = nn.Linear(8, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return {"logits": self.out(torch.tanh(self.embed(input_ids)))}


def _lm_data(n: int = 24, t: int = 9, vocab: int = 11) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, t), generator=gen)
    ids[:, 1::2] = (ids[:, 0::2][:, : ids[:, 1::2].shape[1]] + 1) % vocab  # learnable pattern
    mask = (torch.arange(t) < torch.randint(3, t + 1, (n, 1), generator=gen)).long()
    return {"input_ids": ids, "attention_mask": mask}, torch.zeros(n, dtype=torch.long)


def test_classification_matches_accuracy():
    torch.manual_seed(0)
    model, x = nn.Linear(4, 5), torch.randn(50, 4)
    y = torch.randint(0, 5, (50,))
    got = get_task("classification").evaluate(model, data_batches(x, y, batch_size=7))
    with torch.no_grad():
        assert got == pytest.approx(accuracy(model(x), y))


def test_regression_against_float64():
    torch.manual_seed(0)
    model, x = nn.Linear(3, 1), torch.randn(40, 3)
    y = torch.randn(40, 1)
    got = get_task("regression").evaluate(model, data_batches(x, y, batch_size=16))
    with torch.no_grad():
        err = model.double()(x.double()) - y.double()
    assert got["mse"] == pytest.approx(float((err ** 2).mean()), rel=1e-6)
    assert got["mae"] == pytest.approx(float(err.abs().mean()), rel=1e-6)


def test_perplexity_masks_padding_and_matches_float64():
    torch.manual_seed(0)
    model = TinyLM()
    x, y = _lm_data()
    got = get_task("causal_lm").evaluate(model, data_batches(x, y, batch_size=5))
    with torch.no_grad():
        logp = model.double()(**x)["logits"].log_softmax(-1)
    ids, mask = x["input_ids"], x["attention_mask"]
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = mask[:, 1:].double()
    expected = math.exp(float((nll * keep).sum() / keep.sum()))
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)
    # Changing a padded token changes nothing.
    x2 = {k: v.clone() for k, v in x.items()}
    row = int((x["attention_mask"].sum(1) < 9).nonzero()[0])
    x2["input_ids"][row, -1] = (x2["input_ids"][row, -1] + 3) % 11
    again = get_task("causal_lm").evaluate(model.float(), data_batches(x2, y, batch_size=5))
    assert again["perplexity"] == pytest.approx(got["perplexity"], rel=1e-5)


def test_fine_tuning_a_language_model_lowers_its_perplexity():
    torch.manual_seed(0)
    model = TinyLM()
    x, y = _lm_data(n=64)
    data = DataBundle("lm", x, y, x, y, 0, task="causal_lm")
    before = get_task("causal_lm").evaluate(model, data_batches(x, y))["perplexity"]
    history = fit(model, data, TrainConfig(epochs=3, batch_size=16, lr=0.05), progress=False)
    after = get_task("causal_lm").evaluate(model, data_batches(x, y))["perplexity"]
    assert after < 0.8 * before
    assert history["epochs"][-1]["test_perplexity"] == pytest.approx(after, rel=1e-5)
    assert "train_top1" not in history["epochs"][-1]


def test_embedding_cosine_and_neighbours_against_the_reference():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    noisy = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    noisy.load_state_dict(ref.state_dict())
    with torch.no_grad():
        noisy[0].weight.add_(0.3 * torch.randn(6, 6))
    x, y = torch.randn(30, 6), torch.zeros(30)
    task = get_task("embedding")
    same = task.evaluate(ref, data_batches(x, y), reference=ref)
    assert same == {"cosine": pytest.approx(1.0), "neighbour_top1": 1.0}
    other = task.evaluate(noisy, data_batches(x, y), reference=ref)
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(noisy(x).double(), ref(x).double()).mean()
    assert other["cosine"] == pytest.approx(float(cos), rel=1e-6) and other["cosine"] < 0.999


def test_embedding_mean_pools_over_the_kept_tokens():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    got = embed({"last_hidden_state": h}, {"attention_mask": mask})
    torch.testing.assert_close(got, torch.stack([h[0, :2].mean(0), h[1].mean(0)]))


def test_a_custom_metric_that_fails_or_is_nan_is_named():
    model, x, y = nn.Linear(2, 2), torch.randn(4, 2), torch.zeros(4)
    nan = custom_task(lambda m, b: {"f1": float("nan")}, {"f1": True}, name="mine")
    with pytest.raises(ModelError, match="task 'mine': metric 'f1' is nan, not a finite"):
        nan.evaluate(model, data_batches(x, y))

    def boom(m, batches):
        raise KeyError("label")

    with pytest.raises(ModelError, match=r"task 'mine': the metric function failed \(KeyError"):
        custom_task(boom, {"f1": True}, name="mine").evaluate(model, data_batches(x, y))
    ok = custom_task(lambda m, b: {"n": float(sum(len(yb) for _, yb in b))}, {"n": True})
    assert ok.evaluate(model, data_batches(x, y, batch_size=3)) == {"n": 4.0}


def test_metric_drop_follows_the_metric_direction():
    task = get_task("causal_lm")
    assert task.drop("perplexity", 10.0, 10.4) == pytest.approx(0.4)
    target = Target(max_metric_drop={"perplexity": 0.5})
    verdict = judge(target, {"metrics": {"perplexity": 10.0}},
                    {"metrics": {"perplexity": 10.6}}, {}, task="causal_lm")
    assert verdict["criteria"][0]["name"] == "max_metric_drop (perplexity)"
    assert verdict["criteria"][0]["achieved"] == pytest.approx(0.6) and not verdict["met"]
    data = DataBundle("lm", torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 3),
                      torch.zeros(2), 0, task="causal_lm")
    with pytest.raises(ConfigError, match="task 'causal_lm' has no metric 'top1'; its metrics "
                                          "are perplexity, loss"):
        check_target(Target(max_metric_drop={"top1": 0.01}), data)


def test_data_whose_input_names_differ_from_the_model_is_refused():
    from slimkit.api import wrap
    from slimkit.measure import check_fits

    x, y = _lm_data(n=8)
    model = wrap(TinyLM(), {k: v[:2] for k, v in x.items()},
                 dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}})
    wrong = {"input_ids": x["input_ids"], "mask": x["attention_mask"]}
    data = DataBundle("lm", wrong, y, wrong, y, 0, task="causal_lm")
    with pytest.raises(DataError, match="data 'lm' gives inputs input_ids, mask but model "
                                        "'python' takes input_ids, attention_mask "
                                        r"\(missing: attention_mask\) \(not taken: mask\)"):
        check_fits(model, data)
    longer = {k: torch.cat([v, v], 1) for k, v in x.items()}  # the sequence axis is dynamic
    check_fits(model, DataBundle("lm", longer, y, longer, y, 0, task="causal_lm"))
