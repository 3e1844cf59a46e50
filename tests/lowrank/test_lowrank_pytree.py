"""Low-rank factorization of models with several inputs and outputs: tuple and dict batches
for calibration, sensitivity, the latency check, FLOPs and the finite check."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.data.bundle import DataBundle
from slimkit.io import batch as B
from slimkit.lowrank import LowRankConfig, plan_lowrank
from slimkit.lowrank.plan import capture_inputs
from slimkit.lowrank.run import _lowrank


class MaskedText(nn.Module):
    """Dict inputs (input_ids, attention_mask) -> dict outputs (logits, pooled)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 32)
        self.ff1 = nn.Linear(32, 64)
        self.ff2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        h = self.embed(input_ids)
        h = h + self.ff2(torch.relu(self.ff1(h)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return {"logits": self.head(pooled), "pooled": pooled}


class TwoInputs(nn.Module):
    """forward(image, side) -> (logits, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.side = nn.Linear(6, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> tuple:
        h = torch.relu(self.conv(image)).mean((2, 3)) + torch.relu(self.side(side))
        return self.head(h), h


def _text(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (n, 9), generator=g)
    mask = (torch.arange(9) < torch.randint(3, 10, (n, 1), generator=g)).long()
    return {"input_ids": ids, "attention_mask": mask}


def _images(n: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 6, generator=g)


def _bundle(x: object, n: int) -> DataBundle:
    y = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(1))
    return DataBundle("synthetic", x, y, B.take(x, slice(0, 8)), y[:8], 5)


def test_capture_inputs_takes_dict_and_tuple_batches() -> None:
    torch.manual_seed(0)
    text, x = MaskedText().eval(), _text(4)
    seen = capture_inputs(text, ["ff1", "head"], x)
    assert torch.equal(seen["ff1"], text.embed(x["input_ids"]).detach())
    assert seen["head"].shape == (4, 32)
    image = TwoInputs().eval()
    seen = capture_inputs(image, ["conv", "side"], _images(3))
    assert seen["conv"].shape == (3, 3, 8, 8) and seen["side"].shape == (3, 6)


def test_sensitivity_and_latency_check_run_on_dict_data() -> None:
    torch.manual_seed(0)
    model, n = MaskedText().eval(), 24
    data = _bundle(_text(n), n)
    cfg = LowRankConfig(rank="sensitivity", tolerance=0.5, calib_samples=16,
                        check_latency=True, latency_repeats=3, margin=0.0)
    out, record = _lowrank(model, cfg, data)
    layers = record.details["plan"]["layers"]
    assert {"ff1", "ff2", "head"} <= set(layers)
    assert all("latency" in e or "reason" in e for e in layers.values())
    x = B.take(data.x_test, slice(0, 4))
    with torch.no_grad():
        got, ref = B.flatten(B.call(out, x)), B.flatten(B.call(model, x))
    assert [(k, v.shape) for k, v in got.items()] == [(k, v.shape) for k, v in ref.items()]
    assert record.details["totals"]["model_flops_before"] > 0


def test_example_inputs_without_data_may_be_a_dict_or_a_tuple() -> None:
    """The latency check times on the example when there is no data (any batch structure)."""
    torch.manual_seed(0)
    cfg = LowRankConfig(rank="ratio", ratio=0.5, check_latency=True, latency_repeats=3)
    for model, example in [(MaskedText().eval(), _text(1)), (TwoInputs().eval(), _images(1))]:
        out, record = _lowrank(model, cfg, example_inputs=example)
        assert record.details["totals"]["model_flops_after"] is not None
        assert all("latency" in e or "reason" in e
                   for e in record.details["plan"]["layers"].values())
        B.call(out, example)


def test_identity_on_tuple_inputs_keeps_every_output() -> None:
    torch.manual_seed(0)
    model, n = TwoInputs().eval(), 16
    data = _bundle(_images(n), n)
    plan = plan_lowrank(model, LowRankConfig(rank="energy", energy=1.0), calib_x=data.x_train)
    assert plan["layers"]
    out, _ = _lowrank(model, LowRankConfig(rank="energy", energy=1.0), data)
    x = B.take(data.x_test, slice(0, 4))
    with torch.no_grad():
        for a, b in zip(B.call(out, x), B.call(model, x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
