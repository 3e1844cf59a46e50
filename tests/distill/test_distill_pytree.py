"""Distillation on models with several inputs and outputs: tuple and dict batches, the judged
output as logits (``SlimModel.output`` / :func:`slimkit.io.batch.judging`), taps by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.data.bundle import DataBundle
from slimkit.distill import DistillConfig, FeaturePair, LogitKD, build_objective
from slimkit.distill.config import DistillStageConfig
from slimkit.distill.losses import soft_target_kl
from slimkit.distill.run import _distill, _judged_name
from slimkit.io import batch as B
from slimkit.io.model import SlimModel
from slimkit.train.config import TrainConfig


class MaskedText(nn.Module):
    """Dict inputs (input_ids, attention_mask); dict outputs whose judged one is not first."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, dim)
        self.ff = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        h = torch.relu(self.ff(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return {"pooled": pooled, "logits": self.head(pooled)}


class TwoInputs(nn.Module):
    """forward(image, side) -> (logits, features)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.side = nn.Linear(3, width)
        self.head = nn.Linear(width, 5)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> tuple:
        h = torch.relu(self.conv(image)).mean((2, 3)) + self.side(side)
        return self.head(h), h


def _text_batch(n: int = 6) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (n, 7), generator=g)
    mask = (torch.arange(7) < torch.randint(2, 8, (n, 1), generator=g)).long()
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 5, (n,), generator=g)


def _tuple_batch(n: int = 6) -> tuple[tuple, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return ((torch.randn(n, 1, 6, 6, generator=g), torch.randn(n, 3, generator=g)),
            torch.randint(0, 5, (n,), generator=g))


def test_dict_inputs_kd_uses_the_judged_output_and_taps_by_name() -> None:
    torch.manual_seed(0)
    student, teacher = MaskedText(8).eval(), MaskedText(16).eval()
    x, y = _text_batch()
    kd = LogitKD(temperature=2.0, alpha=0.3)
    cfg = DistillConfig(logits=kd, features=[FeaturePair(student="ff", teacher="ff")])
    with B.judging("logits"):
        obj = build_objective(student, teacher, cfg, B.take(x, slice(0, 2)))
        loss, logits, parts = obj(student, x, y)
    with torch.no_grad():
        s_logits, t_logits = student(**x)["logits"], teacher(**x)["logits"]
    assert torch.equal(logits.detach(), s_logits)
    assert abs(parts["ce"] - float(F.cross_entropy(s_logits, y))) < 1e-6
    assert abs(parts["kd"] - float(soft_target_kl(s_logits, t_logits, 2.0))) < 1e-6
    assert "hint:ff->ff" in parts and torch.isfinite(loss)
    loss.backward()
    assert student.head.weight.grad is not None


def test_tuple_inputs_and_outputs_judge_the_first_output() -> None:
    torch.manual_seed(0)
    student, teacher = TwoInputs(4).eval(), TwoInputs(8).eval()
    x, y = _tuple_batch()
    obj = build_objective(student, teacher, DistillConfig(), B.take(x, slice(0, 2)))
    loss, logits, parts = obj(student, x, y)
    with torch.no_grad():
        s_logits, t_logits = student(*x)[0], teacher(*x)[0]
    assert torch.equal(logits.detach(), s_logits)
    assert abs(parts["kd"] - float(soft_target_kl(s_logits, t_logits, 4.0))) < 1e-6
    assert torch.isfinite(loss)


def test_the_teacher_may_name_its_own_judged_output() -> None:
    """A teacher returning (features, logits) distils into a student judged by 'logits'."""

    class Swapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TwoInputs(8)

        def forward(self, image: torch.Tensor, side: torch.Tensor) -> tuple:
            logits, feats = self.inner(image, side)
            return feats, logits

    torch.manual_seed(0)
    student, teacher = TwoInputs(4).eval(), Swapped().eval()
    x, y = _tuple_batch()
    obj = build_objective(student, teacher, DistillConfig(), B.take(x, slice(0, 2)),
                          teacher_output="output_1")
    _, _, parts = obj(student, x, y)
    with torch.no_grad():
        want = soft_target_kl(student(*x)[0], teacher(*x)[1], 4.0)
    assert abs(parts["kd"] - float(want)) < 1e-6


def test_judged_name_is_the_models_output_else_its_first() -> None:
    x, _ = _text_batch(2)
    module = MaskedText().eval()
    named = SlimModel(module=module, input_shape=(7,), output="logits")
    assert _judged_name(named, x) == "logits"
    assert _judged_name(SlimModel(module=module, input_shape=(7,)), x) == "pooled"


def test_distill_on_dict_data_trains_the_judged_output() -> None:
    torch.manual_seed(0)
    student, teacher = MaskedText(8).eval(), MaskedText(16).eval()
    x, y = _text_batch(24)
    data = DataBundle("synthetic", x, y, B.take(x, slice(0, 8)), y[:8], 5)
    cfg = DistillStageConfig(train=TrainConfig(max_steps=2, batch_size=8))
    with B.judging("logits"):
        out, record = _distill(student, teacher, data, cfg)
    assert record.details["student_train"]["steps"] == 2
    assert 0.0 <= record.details["student_top1"] <= 1.0
    assert not torch.equal(out.head.weight, student.head.weight)  # trained a copy
