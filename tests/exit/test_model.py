"""EarlyExitModel against references: exits equal the head on the block's activation computed
apart, the samples that run to the end get the static model's logits, a batch gives each
sample what a batch of one gives it, and computation really stops."""

from __future__ import annotations

import math

import pytest
import torch
from tests.exit._models import ZOO, inputs, wrapped

from slimkit.exit.model import confidence, exit_index

NAMES = sorted(ZOO)


def _reference_conf(logits: torch.Tensor, how: str) -> list[float]:
    """Confidence from the definitions, one sample at a time, in Python floats."""
    out = []
    for row in logits.double().tolist():
        m = max(row)
        p = [math.exp(v - m) for v in row]
        p = [v / sum(p) for v in p]
        if how == "max_softmax":
            out.append(max(p))
        elif how == "entropy":
            out.append(sum(v * math.log(v) for v in p if v > 0))
        else:
            top = sorted(p, reverse=True)
            out.append(top[0] - top[1])
    return out


@pytest.mark.parametrize("how", ["max_softmax", "entropy", "margin"])
def test_confidence_matches_its_definition(how: str):
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)) * 3
    got = confidence(logits.double(), how)
    torch.testing.assert_close(got.double(), torch.tensor(_reference_conf(logits, how),
                                                          dtype=torch.float64),
                               rtol=0, atol=1e-6)


def _activations(ee, x: torch.Tensor) -> list[torch.Tensor]:
    """Each exit block's output from a plain forward of the backbone, by forward hooks."""
    acts: dict[str, torch.Tensor] = {}
    hooks = [ee.backbone.get_submodule(b).register_forward_hook(
        lambda _m, _i, out, b=b: acts.__setitem__(b, out.detach())) for b in ee.blocks]
    try:
        with torch.no_grad():
            ee.backbone(x)
    finally:
        for h in hooks:
            h.remove()
    return [acts[b] for b in ee.blocks]


def _mixed_thresholds(ee, x: torch.Tensor) -> list[float]:
    """Thresholds that send about a third of the samples to each exit and the final head:
    exit 0's at its 2/3 quantile, exit 1's at the median over the samples still running."""
    with torch.no_grad():
        exits, _ = ee.exit_outputs(x)
    c0, c1 = (confidence(e, "max_softmax") for e in exits)
    t0 = _between(c0, 2 / 3)
    return [t0, _between(c1[c0 < t0], 0.5)]


def _between(values: torch.Tensor, q: float) -> float:
    """A value between the two confidences around quantile ``q``: no sample sits on it, so
    float rounding cannot move a sample across it."""
    v = values.double().sort().values
    i = min(max(int(q * len(v)), 1), len(v) - 1)
    return float((v[i - 1] + v[i]) / 2)


@pytest.mark.parametrize("name", NAMES)
def test_exits_equal_heads_on_the_activations_and_the_rest_equals_the_static_model(name: str):
    ee, model = wrapped(name)
    x = inputs(model, 24, seed=3)
    x = x if not x.is_floating_point() else x.double()
    with torch.no_grad():
        static = ee.backbone(x)
        exits, final = ee.exit_outputs(x)
        for head, act, got in zip(ee.heads, _activations(ee, x), exits, strict=True):
            torch.testing.assert_close(got, head(act), rtol=0, atol=1e-12)
        torch.testing.assert_close(final, static, rtol=0, atol=1e-12)

        ee.set_thresholds(_mixed_thresholds(ee, x))
        where = exit_index(ee, x)
        assert set(where.tolist()) == {0, 1, 2}, "the batch must hold every kind of exit"
        out = ee(x)
    reference = torch.stack([exits[k][i] if k < len(exits) else static[i]
                             for i, k in enumerate(where.tolist())])
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-10)
    # The samples that run to the end get exactly the static model's logits.
    torch.testing.assert_close(out[where == 2], static[where == 2], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_a_mixed_batch_gives_each_sample_its_batch_of_one_result(name: str):
    ee, model = wrapped(name)
    x = inputs(model, 9, seed=5)
    x = x if not x.is_floating_point() else x.double()
    ee.set_thresholds(_mixed_thresholds(ee, x))
    with torch.no_grad():
        assert len(set(exit_index(ee, x).tolist())) == 3
        batch = ee(x)
        single = torch.cat([ee(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-10)


def test_later_blocks_only_see_the_samples_that_did_not_exit():
    ee, model = wrapped("resnet20")
    x = inputs(model, 16, seed=2).double()
    ee.set_thresholds(_mixed_thresholds(ee, x))
    seen: list[int] = []
    hook = ee.backbone.layer3.register_forward_hook(lambda _m, i, _o: seen.append(len(i[0])))
    try:
        with torch.no_grad():
            where = exit_index(ee, x)
            seen.clear()
            ee(x)
            assert seen == [int((where == 2).sum())]
            first = int((where == 0).nonzero()[0])
            seen.clear()
            ee(x[first:first + 1])
            assert seen == [], "a sample that exits at the first exit must not reach layer3"
    finally:
        hook.remove()


def test_training_mode_and_no_thresholds_give_the_static_model():
    ee, model = wrapped("vit")
    x = inputs(model, 6).double()
    with torch.no_grad():
        static = ee.backbone(x)
        torch.testing.assert_close(ee(x), static, rtol=0, atol=0)  # no thresholds yet
        ee.set_thresholds([0.0, 0.0])  # every sample would leave at the first exit
        ee.train()
        torch.testing.assert_close(ee.eval().train()(x), ee.backbone(x), rtol=0, atol=0)
        ee.eval()
        torch.testing.assert_close(ee(x), ee.exit_outputs(x)[0][0], rtol=0, atol=0)


def test_vit_exits_read_the_cls_token_and_conv_exits_a_pooled_grid():
    ee, _ = wrapped("vit")
    assert [e["pool"] for e in ee.plan["exits"]] == ["cls", "cls"]
    ee, _ = wrapped("resnet20")
    assert [(e["pool"], e["channels"]) for e in ee.plan["exits"]] == [("grid", 16), ("grid", 32)]
    ee, _ = wrapped("text_encoder")
    assert [e["pool"] for e in ee.plan["exits"]] == ["mean", "mean"]


def test_moving_the_model_retraces_its_segments():
    ee, model = wrapped("resnet20", torch.float32)
    x = inputs(model, 4)
    ee.set_thresholds(_mixed_thresholds(ee, x))
    with torch.no_grad():
        before = ee(x)
        ee.double()
        after = ee(x.double())
    torch.testing.assert_close(after.float(), before, rtol=1e-4, atol=1e-5)
    assert after.dtype == torch.float64
