"""The training loop: resume bit for bit, refusal of foreign checkpoints, NaN guard, schedules."""

from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.core.errors import ModelError, ResumeError
from slimkit.train import TrainConfig, fit
from slimkit.train.checkpoint import CHECKPOINT
from slimkit.train.loop import _schedule
from slimkit.train.objective import Objective


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(64, 10))


class Interrupt(Exception):
    pass


def test_killed_and_resumed_run_ends_with_identical_weights(digits, tmp_path: Path):
    cfg = TrainConfig(epochs=2, batch_size=128, lr=3e-3, checkpoint_every=5, seed=3)
    straight = net()
    fit(straight, digits, cfg, progress=False)

    def kill_at_13(model):
        kill_at_13.steps += 1
        if kill_at_13.steps == 13:
            raise Interrupt

    kill_at_13.steps = 0
    with pytest.raises(Interrupt):
        fit(net(), digits, cfg, after_step=kill_at_13, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT).is_file()
    resumed = net()
    hist = fit(resumed, digits, cfg, checkpoint_dir=tmp_path, progress=False)
    assert hist["resumed_from_step"] == 10
    assert hist["steps"] == 2 * 11 and len(hist["epochs"]) == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_from_another_run_is_refused(digits, tmp_path: Path):
    fit(net(), digits, TrainConfig(epochs=1, checkpoint_every=3), checkpoint_dir=tmp_path,
        progress=False)
    with pytest.raises(ResumeError, match="belongs to another run"):
        fit(net(), digits, TrainConfig(epochs=1, lr=0.1, checkpoint_every=3),
            checkpoint_dir=tmp_path, progress=False)


class NanAt(Objective):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, model, x, y):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.step else loss), logits, {}


def test_nan_loss_stops_saves_and_names_the_step(digits, tmp_path: Path):
    with pytest.raises(ModelError, match=r"loss became nan at step 4 .*saved in"):
        fit(net(), digits, TrainConfig(epochs=1), objective=NanAt(4), checkpoint_dir=tmp_path,
            progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_max_steps_early_stopping_and_history(digits):
    hist = fit(net(), digits, TrainConfig(epochs=5, max_steps=7), progress=False)
    assert hist["steps"] == 7 and len(hist["epochs"]) == 1
    # With a vanishing learning rate validation accuracy cannot improve: stop after patience.
    cfg = TrainConfig(epochs=10, optimizer="sgd", momentum=0, lr=1e-12,
                      early_stopping={"patience": 2})
    hist = fit(net(), digits, cfg, progress=False)
    assert hist["stopped_early"] and len(hist["epochs"]) == 3
    assert hist["epochs"][0]["val_top1"] is not None
    good = fit(net(), digits, TrainConfig(epochs=3, lr=3e-3), progress=False)
    assert good["epochs"][-1]["test_top1"] > 0.8
    assert good["epochs"][-1]["loss"] < good["epochs"][0]["loss"]


def test_bf16_autocast_on_cpu_trains(digits):
    hist = fit(net(), digits, TrainConfig(epochs=1, amp="bf16", lr=3e-3), progress=False)
    assert hist["epochs"][0]["test_top1"] > 0.5
    with pytest.raises(ValueError, match="fp16' needs CUDA"):
        TrainConfig(amp="fp16", device="cpu")


def test_schedules():
    cos = _schedule(TrainConfig(scheduler="cosine", warmup_steps=10), total=110)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0, abs=1e-12)
    step = _schedule(TrainConfig(scheduler="step", step_every=10, step_gamma=0.5), total=100)
    assert [step(0), step(10), step(25)] == [1.0, 0.5, 0.25]
