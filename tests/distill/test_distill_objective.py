"""DistillObjective on tiny CNNs and zoo ViTs: projectors, teacher safety, errors, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimkit.core.errors import ConfigError, ModelError
from slimkit.distill import (
    DistillConfig,
    FeaturePair,
    LogitKD,
    SelfDistill,
    TransformerKD,
    build_objective,
    kd_loss,
    soft_target_kl,
)
from slimkit.train.objective import Objective
from slimkit.zoo import build_model


class TinyCNN(nn.Module):
    def __init__(self, width: int, stride: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=stride, padding=1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x)).relu()
        return self.fc(self.conv2(x).relu().mean(dim=(2, 3)))


def _pair(classes: int = 10) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return TinyCNN(4, stride=1), TinyCNN(8, stride=2, classes=classes)  # 8x8 vs 4x4 maps


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


FEATURES = [FeaturePair(student="conv1", teacher="conv1"),
            FeaturePair(student="conv2", teacher="conv2", weight=0.5),
            FeaturePair(student="conv2", teacher="conv2", loss="attention"),
            FeaturePair(student="bn1", teacher="conv2", loss="relational")]


def test_projectors_are_built_from_the_dry_run() -> None:
    student, teacher = _pair()
    x, _ = _batch()
    stats = student.bn1.running_mean.clone()
    obj = build_objective(student, teacher, DistillConfig(features=FEATURES), x[:2])
    assert isinstance(obj, Objective)
    first, second = obj.feature_projectors[0], obj.feature_projectors[1]
    assert first.channel_map.weight.shape == (8, 4, 1, 1)  # 1x1 conv, 4 -> 8 channels
    assert second.channel_map.weight.shape == (16, 8, 1, 1)
    assert second(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)  # pooled to the teacher's map
    assert not list(obj.feature_projectors[2].parameters())  # attention/relational: no params
    own = {id(p) for p in obj.parameters()}
    assert {id(p) for p in first.parameters()} <= own
    assert not own & {id(p) for p in teacher.parameters()}
    assert not own & {id(p) for p in student.parameters()}
    assert all(k.startswith("feature_projectors.") for k in obj.state_dict())
    torch.testing.assert_close(student.bn1.running_mean, stats, rtol=0, atol=0)  # eval dry run


def test_projector_initialization_is_deterministic() -> None:
    student, teacher = _pair()
    x, _ = _batch()
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        states.append(build_objective(student, teacher, DistillConfig(features=FEATURES),
                                      x[:2]).state_dict())
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=0)


def test_backward_trains_student_and_projectors_and_leaves_the_teacher_alone() -> None:
    student, teacher = _pair()
    teacher.train()  # even a teacher left in train mode must not update its batch-norm stats
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = _batch()
    obj = build_objective(student, teacher, DistillConfig(features=FEATURES), x[:2])
    opt = torch.optim.SGD([*student.parameters(), *obj.parameters()], lr=0.1)
    loss, logits, parts = obj(student, x, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and logits.shape == (6, 10)
    assert set(parts) == {"ce", "kd", "hint:conv1->conv1", "hint:conv2->conv2",
                          "attention:conv2->conv2", "relational:bn1->conv2"}
    assert all(math.isfinite(v) and v >= 0 for v in parts.values())
    assert obj.feature_projectors[0].channel_map.weight.grad.abs().sum() > 0
    assert student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert teacher.training and teacher.bn1.training  # its mode was restored
    assert not any(m._forward_hooks for m in [*teacher.modules(), *student.modules()])
    assert obj.teacher is teacher


def test_logit_shape_mismatch_is_a_model_error() -> None:
    student, teacher = _pair(classes=5)
    with pytest.raises(ModelError, match=r"teacher logits have shape \(2, 5\).*\(2, 10\)"):
        build_objective(student, teacher, DistillConfig(), _batch()[0][:2])
    # without logit KD, features of a teacher with other classes are fine
    cfg = DistillConfig(logits=None, features=FEATURES[:1])
    loss, _, parts = build_objective(student, teacher, cfg, _batch()[0][:2])(student, *_batch())
    assert torch.isfinite(loss) and "kd" not in parts


@pytest.mark.parametrize(("pair", "side", "closest"), [
    (FeaturePair(student="conv_2", teacher="conv2"), "student", "conv2"),
    (FeaturePair(student="conv1", teacher="bn_1"), "teacher", "bn1"),
])
def test_unknown_layer_names_the_closest(pair: FeaturePair, side: str, closest: str) -> None:
    student, teacher = _pair()
    with pytest.raises(ConfigError, match=rf"{side}.*Did you mean '{closest}'"):
        build_objective(student, teacher, DistillConfig(features=[pair]), _batch()[0][:2])


def test_teacher_terms_without_a_teacher_are_a_config_error() -> None:
    student, _ = _pair()
    with pytest.raises(ConfigError, match="need a teacher"):
        build_objective(student, None, DistillConfig(), _batch()[0][:2])
    with pytest.raises(ConfigError, match="teacher=None"):
        build_objective(student, student, DistillConfig(), _batch()[0][:2])


def test_self_distillation_trains_exit_heads_without_a_teacher() -> None:
    student, _ = _pair()
    x, y = _batch()
    cfg = DistillConfig(logits=None, self_distill=SelfDistill(exits=["conv1", "conv2"],
                                                              feature_weight=0.5))
    obj = build_objective(student, None, cfg, x[:2])
    assert [h.fc.in_features for h in obj.exit_heads] == [4, 8]
    assert isinstance(obj.exit_projectors[0], nn.Linear)  # 4 -> 8 to the deepest feature
    loss, logits, parts = obj(student, x, y)
    assert torch.isfinite(loss)
    assert set(parts) == {"ce", "exit_ce", "exit_kd", "exit_hint"} and parts["exit_hint"] > 0
    loss.backward()
    for head in obj.exit_heads:
        assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0
    assert obj.exit_projectors[0].weight.grad.abs().sum() > 0
    assert student.fc.weight.grad.abs().sum() > 0


def test_transformer_kd_between_two_zoo_vits() -> None:
    torch.manual_seed(0)
    student = build_model("vit", (1, 8, 8), 10, dim=16, depth=2, heads=2)
    teacher = build_model("vit", (1, 8, 8), 10, dim=32, depth=2, heads=4)
    layers = ["blocks.0", "blocks.1"]
    cfg = DistillConfig(transformer=TransformerKD(student_layers=layers, teacher_layers=layers))
    x, y = _batch()
    obj = build_objective(student, teacher, cfg, x[:2])
    assert [type(p) for p in obj.hidden_projectors] == [nn.Linear, nn.Linear]
    assert obj.hidden_projectors[0].weight.shape == (32, 16)
    loss, _, parts = obj(student, x, y)
    assert torch.isfinite(loss) and parts["hidden"] > 0 and parts["attention"] > 0
    loss.backward()
    assert obj.hidden_projectors[1].weight.grad.abs().sum() > 0
    assert student.blocks[0].attn.q.weight.grad.abs().sum() > 0  # attention term reaches q/k
    assert all(p.grad is None for p in teacher.parameters())


def test_conv1d_features_get_a_conv1d_projector() -> None:
    torch.manual_seed(0)

    def net(width: int) -> nn.Module:
        return nn.Sequential(nn.Conv1d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(width * 12, 10))

    student, teacher = net(3), net(6)
    x = torch.randn(4, 1, 12)
    obj = build_objective(student, teacher, DistillConfig(
        features=[FeaturePair(student="1", teacher="1")]), x[:2])
    assert isinstance(obj.feature_projectors[0].channel_map, nn.Conv1d)
    loss, _, _ = obj(student, x, torch.randint(0, 10, (4,)))
    assert torch.isfinite(loss)


def test_kd_loss_pulls_a_student_towards_a_fixed_teacher() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)).eval()
    student = nn.Linear(8, 5)
    x, y = torch.randn(64, 8), torch.randint(0, 5, (64,))
    with torch.no_grad():
        t_logits = teacher(x)
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    start = soft_target_kl(student(x), t_logits, 2.0).item()
    for _ in range(30):
        opt.zero_grad()
        kd_loss(student(x), t_logits, y, temperature=2.0, alpha=0.1).backward()
        opt.step()
    end = soft_target_kl(student(x), t_logits, 2.0).item()
    assert end < 0.5 * start
    assert LogitKD(alpha=0.1, temperature=2.0).alpha == 0.1
