"""The one training loop every fine-tuning stage uses.

Features: optimizer and LR schedule from config, epochs or a step budget, gradient clipping,
mixed precision where the device supports it, a rich progress bar, evaluation each epoch,
resumable checkpoints (bit-exact on CPU), early stopping on a held-out split, NaN/Inf guard,
and data parallelism over torch.distributed when launched by torchrun.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import DataError, ModelError
from slimkit.core.progress import current_mode, step
from slimkit.core.seed import seed_everything
from slimkit.core.tracking import log_scalars
from slimkit.data.bundle import DataBundle
from slimkit.io import batch as B
from slimkit.io.model import set_mode
from slimkit.train.checkpoint import CHECKPOINT, load_checkpoint, run_fingerprint, save_checkpoint
from slimkit.train.config import TrainConfig
from slimkit.train.distributed import average_gradients, shard, world
from slimkit.train.objective import Objective, default_objective


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
             task: str = "classification") -> float:
    """The task's primary metric of ``model`` on ``(x, y)``: top-1 accuracy (fraction) for
    classification, perplexity for a causal LM, ... (see :mod:`slimkit.measure.tasks`)."""
    if task == "classification":
        from slimkit.measure.quality import accuracy, predict

        return accuracy(predict(model, x, batch_size), y)["top1"]
    from slimkit.measure.tasks import data_batches, get_task

    t = get_task(task)
    return t.evaluate(model, data_batches(x, y, batch_size))[t.primary]


def evaluate_data(model: nn.Module, data: Any, split: str | None = None,
                  batch_size: int = 256) -> float:
    """:func:`evaluate` over a dataset's split, in memory or streamed (``data.batches``).

    ``split`` None: the test split of data a user gives, the validation split inside a stage
    (whose data hides the test split, see :mod:`slimkit.data.guard`)."""
    from slimkit.data.guard import record_split
    from slimkit.measure.tasks import get_task

    split = split or record_split(data)
    t = get_task(data.task)
    return t.evaluate(model, lambda: data.batches(split, batch_size))[t.primary]


def score(model: nn.Module, x: Any, y: torch.Tensor, batch_size: int = 256,
          task: str = "classification") -> float:
    """A higher-is-better quality for selections: top-1 in points (0..100) for
    classification, else the task's primary metric, negated when lower is better (perplexity).
    Differences of scores are drops in those units."""
    value = evaluate(model, x, y, batch_size, task)
    if task == "classification":
        return 100 * value
    return value if _metric(task)[1] else -value


def _metric(task: str) -> tuple[str, bool]:
    """The epoch log's metric name and whether higher is better."""
    from slimkit.measure.tasks import get_task

    t = get_task(task)
    return t.primary, t.higher_is_better[t.primary]


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up, then cosine / step decay / constant."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = step - cfg.warmup_steps
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t / max(1, total - cfg.warmup_steps))))
        if cfg.scheduler == "step":
            return cfg.step_gamma ** (t // cfg.step_every)
        return 1.0

    return factor


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("train: device 'cuda' asked for but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())  # torchrun sets it per rank
    return torch.device("cpu")


def _autocast(cfg: TrainConfig, device: torch.device) -> tuple[Any, torch.amp.GradScaler | None]:
    """(autocast context factory, grad scaler): fp16 + scaler on CUDA, bf16 where asked."""
    mode = cfg.amp
    if mode == "auto":
        mode = "fp16" if device.type == "cuda" else "off"
    if mode == "off":
        return contextlib.nullcontext, None
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _split_validation(data: DataBundle, cfg: TrainConfig) -> tuple[DataBundle, tuple | None]:
    """Hold out a deterministic validation split when early stopping is on (never the test);
    a stream's is its ``val`` stream (or held-out first batches), read as it comes."""
    if cfg.early_stopping is None:
        return data, None
    if data.streaming:
        return data, ("stream",)
    if getattr(data, "y_val", None) is not None:  # held out of training already: use it
        return data, (data.x_val, data.y_val)
    from slimkit.data.split import split

    xt, yt, xv, yv = split(data.x_train, data.y_train, cfg.early_stopping.val_fraction,
                           seed=cfg.seed)
    train = copy.copy(data)
    train.x_train, train.y_train = xt, yt
    return train, (xv, yv)


def _batches(n: int, cfg: TrainConfig, gen: torch.Generator, start: int, world_size: int,
             ) -> Iterator[tuple[int, torch.Tensor]]:
    """(step index within the epoch, global batch indices), from ``start`` on.

    Under data parallelism a last batch smaller than the world would leave a rank without
    samples; it is dropped.
    """
    perm = torch.randperm(n, generator=gen)
    for i, lo in enumerate(range(0, n, cfg.batch_size)):
        idx = perm[lo:lo + cfg.batch_size]
        if i >= start and len(idx) >= world_size:
            yield i, idx


def _epoch(run: _Run, start: int) -> Iterator[tuple[int, Any, torch.Tensor, int]]:
    """(step index within the epoch, this rank's inputs and labels, global batch size).

    In memory: a seeded permutation of the training split in ``cfg.batch_size`` batches. A
    stream: its own batches (its loader sets their size) in its own order (resuming skips
    the ``start`` batches already trained on); under torchrun every rank reads the stream
    and keeps its shard of each batch's rows (as a DistributedSampler would of a map-style
    dataset).
    """
    if not run.train.streaming:
        for i, idx in _batches(run.n, run.cfg, run.gen, start, run.size):
            local = shard(idx, run.rank, run.size)
            yield i, B.take(run.train.x_train, local), run.train.y_train[local], len(idx)
        return
    for i, (x, y) in enumerate(run.train.batches("train")):
        n = len(y)
        if i < start or n < run.size:
            continue
        local = shard(torch.arange(n), run.rank, run.size)
        yield i, B.take(x, local), y[local], n


def fit(model: nn.Module, data: DataBundle, cfg: TrainConfig,
        objective: Objective | None = None,
        after_step: Callable[[nn.Module], None] | None = None,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True, label: str = "train") -> dict[str, Any]:
    """Train ``model`` in place on ``data.x_train``.

    Args:
        objective: what to minimize (default: cross-entropy); its own parameters
            (projectors, exit heads) are trained too.
        after_step: called after each optimizer step (for example to re-apply pruning masks).
        checkpoint_dir: where ``cfg.checkpoint_every`` saves; a checkpoint found there is
            resumed (and refused when it belongs to another run).
        progress: show a progress bar with loss and accuracy.

    Returns:
        ``{"epochs": [{"epoch", "loss", "train_top1", "val_top1", "seconds"}], "steps",
        "stopped_early", "resumed_from_step", "world_size"}``; the last epoch also holds
        ``test_top1`` (for other tasks, ``test_`` and their primary metric): the test split
        is read once, after training, on the weights kept.

    Raises:
        ModelError: the loss became NaN/Inf (saying at which step, after saving a checkpoint
        of the last good state when a checkpoint directory is given).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    home = next(model.parameters()).device
    run = _Run.start(model, data, cfg, objective or default_objective(data.task),
                     checkpoint_dir, label)
    state = run.state
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    stopped_early = False
    shown = progress and run.rank == 0
    plain = shown and current_mode() != "rich"  # no terminal: periodic log lines instead
    with Progress(*columns, disable=not shown or plain, transient=True) as bar, \
            step(label, total=run.total, enabled=plain, done=state["step"]) as lines:
        task = bar.add_task(label, total=run.total, completed=state["step"], info="")
        while state["step"] < run.total and not stopped_early and (
                cfg.max_steps or state["epoch"] < cfg.epochs):
            start = time.perf_counter()
            run.gen.set_state(state["epoch_gen_state"])
            set_mode(model, True)
            run.objective.train()
            steps_before = state["step"]
            for i, xb, yb, n in _epoch(run, state["step_in_epoch"]):
                if state["step"] >= run.total:
                    break
                loss = run.step(xb, yb, n, after_step)
                state["step_in_epoch"] = i + 1
                bar.update(task, advance=1, info=f"epoch {state['epoch'] + 1} "
                           f"loss {loss:.3f}")
                lines.advance(epoch=state["epoch"] + 1, loss=float(loss))
                log_scalars(f"train/{label}", {"loss": loss,
                                               "lr": run.opt.param_groups[0]["lr"]},
                            state["step"])
            if state["step"] == steps_before:  # else max_steps would never be reached
                raise DataError(f"training on '{getattr(data, 'name', 'the data')}': an epoch "
                                "gave no step (every batch was empty, or had fewer labelled "
                                f"samples than the {run.size} rank(s)); give batches of "
                                "(inputs, labels) with one label per sample")
            stopped_early = _end_epoch(model, data, run.val, cfg, state, start)
            entry = state["history"][-1]
            lines.say(_epoch_line(entry))
            log_scalars(f"epoch/{label}", entry, entry["epoch"])
            state["epoch_gen_state"] = run.gen.get_state()
            bar.update(task, info=f"epoch {entry['epoch']} loss {entry['loss']:.3f}")
    run.finish(home)
    from slimkit.data.guard import hides_test

    # The test split is read once, at the end, on the kept weights; a stage's data hides it
    # (the runner reads it after the last stage).
    if state["history"] and not hides_test(data):
        metric = _metric(data.task)[0]
        state["history"][-1][f"test_{metric}"] = evaluate_data(model, data, "test")
    return {"epochs": state["history"], "steps": state["step"], "stopped_early": stopped_early,
            "resumed_from_step": run.resumed_from, "world_size": run.size}


def _epoch_line(entry: dict[str, Any]) -> str:
    """``epoch 2, loss 0.412, val_top1 0.9712, 31 s`` from a history entry."""
    shown = [f"{k} {v:.4g}" for k, v in entry.items()
             if k not in ("epoch", "seconds") and isinstance(v, float)]
    return ", ".join([f"epoch {entry.get('epoch')}", *shown,
                      f"{entry.get('seconds', 0.0):.0f} s"])


@dataclass
class _Run:
    """One training run's moving parts: what :func:`fit` steps, checkpoints and resumes."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    objective: Objective
    cfg: TrainConfig
    train: DataBundle
    val: tuple | None
    gen: torch.Generator
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    autocast: Any
    scaler: torch.amp.GradScaler | None
    params: list[nn.Parameter]
    extra: list[nn.Parameter]  # the objective's own trainable parameters (averaged under DDP)
    device: torch.device
    fingerprint: str
    ckpt_path: Path | None
    label: str
    total: int
    rank: int = 0
    size: int = 1
    state: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None

    @property
    def n(self) -> int | None:
        return self.train.n_train

    @classmethod
    def start(cls, model: nn.Module, data: DataBundle, cfg: TrainConfig, objective: Objective,
              checkpoint_dir: str | Path | None, label: str) -> _Run:
        """Set up optimizer, schedule, precision and DDP, then resume a checkpoint if any."""
        rank, size = world()
        device = _device(cfg)
        objective = objective.to(device)
        what = ((data.fingerprint(),) if data.streaming else (data.x_train, data.y_train))
        fingerprint = run_fingerprint(model, what, cfg.model_dump(), _describe(objective))
        model.to(device)
        gen = seed_everything(cfg.seed)
        train_data, val = _split_validation(data, cfg)
        total = cfg.max_steps or _total(train_data, cfg, label)  # steps beat epochs
        if not train_data.streaming and train_data.n_train < size:
            raise ModelError(f"{label}: {train_data.n_train} training samples cannot feed "
                             f"{size} processes")
        params = [p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad]
        opt = _optimizer(params, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
        autocast, scaler = _autocast(cfg, device)
        net: nn.Module = model
        if size > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=None if device.type == "cpu" else [device.index or 0])
        run = cls(model, net, objective, cfg, train_data, val, gen, opt, sched, autocast,
                  scaler, params, [p for p in objective.parameters() if p.requires_grad],
                  device, fingerprint, Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir
                  else None, label, total, rank, size)
        run.state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "history": [], "best": None,
                     "best_state": None, "bad_epochs": 0, "epoch_gen_state": gen.get_state(),
                     "running": 0.0, "correct": 0, "seen": 0}
        run.resume()
        return run

    def resume(self) -> None:
        resumed = load_checkpoint(self.ckpt_path, self.fingerprint) if self.ckpt_path else None
        if not resumed:
            return
        self.model.load_state_dict(resumed["model"])
        self.objective.load_state_dict(resumed["objective"])
        self.opt.load_state_dict(resumed["optimizer"])
        self.sched.load_state_dict(resumed["scheduler"])
        if self.scaler and resumed.get("scaler"):
            self.scaler.load_state_dict(resumed["scaler"])
        torch.set_rng_state(resumed["torch_rng"])
        self.state.update({k: resumed[k] for k in self.state if k in resumed})
        self.resumed_from = self.state["step"]

    def snapshot(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "model": self.model.state_dict(),
                "objective": self.objective.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "torch_rng": torch.get_rng_state(),
                "scaler": self.scaler.state_dict() if self.scaler else None, **self.state}

    def step(self, xb: Any, yb: torch.Tensor, global_n: int,
             after_step: Callable[[nn.Module], None] | None) -> float:
        """One optimizer step on this rank's shard ``(xb, yb)`` of a global batch of
        ``global_n`` samples; its loss."""
        state, cfg = self.state, self.cfg
        if (self.ckpt_path and cfg.checkpoint_every and self.rank == 0 and state["step"] > 0
                and state["step"] % cfg.checkpoint_every == 0
                and state["step"] != self.resumed_from):
            save_checkpoint(self.ckpt_path, self.snapshot())
        xb, yb = B.to(xb, self.device), yb.to(self.device)
        local_n = len(yb)
        with self.autocast():
            loss, logits, _parts = self.objective(self.net, xb, yb)
        if not torch.isfinite(loss):
            self._diverged(loss)
        self.opt.zero_grad(set_to_none=True)
        scaled = loss * (local_n * self.size / global_n)  # global-batch mean under DDP
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        average_gradients(self.extra)
        if self.scaler:
            self.scaler.unscale_(self.opt)
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        if after_step:
            after_step(self.model)
        state["running"] += float(loss.detach()) * local_n
        if logits.dim() == 2 and len(logits) == len(yb) and not yb.is_floating_point():
            state["correct"] += int((logits.detach().argmax(1) == yb).sum())
        state["seen"] += local_n
        state["step"] += 1
        return float(loss.detach())

    def _diverged(self, loss: torch.Tensor) -> None:
        where = ""
        if self.ckpt_path and self.rank == 0:
            save_checkpoint(self.ckpt_path, self.snapshot())
            where = f"; the last good state is saved in '{self.ckpt_path}'"
        raise ModelError(f"{self.label}: loss became {loss.item()} at step "
                         f"{self.state['step']} (epoch {self.state['epoch'] + 1}){where}; "
                         "lower the learning rate or check the data")

    def finish(self, home: torch.device) -> None:
        """Restore the best state (early stopping), save the last checkpoint, hand back."""
        if (self.cfg.early_stopping and self.cfg.early_stopping.restore_best
                and self.state["best_state"]):
            self.model.load_state_dict(self.state["best_state"])
        if self.ckpt_path and self.rank == 0:
            save_checkpoint(self.ckpt_path, self.snapshot())
        self.opt.zero_grad(set_to_none=True)
        self.model.to(home)
        set_mode(self.model, False)
        if self.net is not self.model:
            # The DDP wrapper's reducer holds gloo work and sits in reference cycles: freed
            # by a late garbage collection (after the process group is gone, at exit) it can
            # abort the process. Free it now, while the group is alive.
            import gc

            self.net = self.model
            gc.collect()


def _total(data: Any, cfg: TrainConfig, label: str) -> int:
    """Optimizer steps for ``cfg.epochs`` epochs of ``data``."""
    if not data.streaming:
        return math.ceil(data.n_train / cfg.batch_size) * cfg.epochs
    per_epoch = data.epoch_batches()
    if per_epoch is None:
        from slimkit.core.errors import ConfigError

        raise ConfigError(f"{label}: the train stream of '{data.name}' has no length (a "
                          "generator or IterableDataset); set max_steps, or give "
                          "StreamData(length=batches per epoch)")
    return per_epoch * cfg.epochs


def _describe(objective: Objective) -> str:
    """What the objective optimizes, for the run fingerprint (kind and settings)."""
    cfg = getattr(objective, "cfg", None)
    return type(objective).__name__ + (cfg.model_dump_json() if cfg is not None else "")


def _end_epoch(model: nn.Module, data: DataBundle, val: tuple | None, cfg: TrainConfig,
               state: dict[str, Any], start: float) -> bool:
    """Record the epoch, evaluate, and decide early stopping (on the validation split, by
    the task's primary metric in its direction). Returns True to stop."""
    metric, higher = _metric(data.task)
    seen = max(1, state["seen"])
    if val == ("stream",):
        val_score = evaluate_data(model, data, "val")
    else:
        val_score = evaluate(model, *val, task=data.task) if val else None
    entry = {"epoch": state["epoch"] + 1, "loss": state["running"] / seen,
             f"val_{metric}": val_score, "seconds": time.perf_counter() - start}
    if data.task == "classification":
        entry["train_top1"] = state["correct"] / seen
    state["history"].append(entry)
    state.update(epoch=state["epoch"] + 1, step_in_epoch=0, running=0.0, correct=0, seen=0)
    if cfg.early_stopping is None:
        return False
    es = cfg.early_stopping
    gain = None if state["best"] is None else (
        val_score - state["best"] if higher else state["best"] - val_score)
    if gain is None or gain > es.min_delta:
        state["best"], state["bad_epochs"] = val_score, 0
        state["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return False
    state["bad_epochs"] += 1
    return state["bad_epochs"] >= es.patience
