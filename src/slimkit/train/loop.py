"""The one training loop every fine-tuning stage uses."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimkit.core.config import SlimConfig
from slimkit.core.errors import ModelError
from slimkit.core.seed import seed_everything
from slimkit.data.bundle import DataBundle
from slimkit.io.model import set_mode


class TrainConfig(SlimConfig):
    """How to train or fine-tune."""

    epochs: int = Field(1, ge=0, description="Passes over the training set.")
    batch_size: int = Field(64, ge=1, description="Samples per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer.")
    weight_decay: float = Field(0.0, ge=0, description="L2 / decoupled weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    scheduler: Literal["none", "cosine"] = Field("cosine", description="LR schedule per step.")
    grad_clip: float | None = Field(None, gt=0, description="Max global gradient norm.")
    seed: int = Field(0, description="Seed for shuffling and initialization.")


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``(x, y)``."""
    from slimkit.measure.quality import accuracy, predict

    return accuracy(predict(model, x, batch_size), y)["top1"]


def fit(model: nn.Module, data: DataBundle, cfg: TrainConfig,
        after_step: Callable[[nn.Module], None] | None = None,
        progress: bool = True, label: str = "train") -> dict:
    """Train ``model`` in place on ``data.x_train`` with cross-entropy.

    Args:
        after_step: called after each optimizer step (for example to re-apply pruning masks).
        progress: show a rich progress bar with loss and accuracy.

    Returns:
        ``{"epochs": [{"epoch", "loss", "test_top1", "seconds"}], "steps"}``.

    Raises:
        ModelError: the loss became NaN/Inf (naming the step).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    gen = seed_everything(cfg.seed)
    opt = _optimizer(model, cfg)
    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
             if cfg.scheduler == "cosine" else None)
    loss_fn = nn.CrossEntropyLoss()
    history, step = [], 0
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=total, info="")
        for epoch in range(cfg.epochs):
            start, running = time.perf_counter(), 0.0
            set_mode(model, True)
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
                if not torch.isfinite(loss):
                    raise ModelError(f"{label}: loss became {loss.item()} at step {step} "
                                     f"(epoch {epoch}); lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                if sched:
                    sched.step()
                if after_step:
                    after_step(model)
                running += loss.item() * len(idx)
                step += 1
                bar.update(task, advance=1, info=f"epoch {epoch + 1} loss {loss.item():.3f}")
            acc = evaluate(model, data.x_test, data.y_test)
            history.append({"epoch": epoch + 1, "loss": running / n, "test_top1": acc,
                            "seconds": time.perf_counter() - start})
            bar.update(task, info=f"epoch {epoch + 1} loss {running / n:.3f} acc {acc:.2%}")
    set_mode(model, False)
    return {"epochs": history, "steps": step}
