"""Hinton et al. 2015 on real MNIST (builtin:mnist, 4,000 train / 1,000 test images).

A large teacher MLP and a small student MLP; the student trained alone versus distilled from
the teacher with the same budget. Criterion: the distilled student closes at least half of the
accuracy gap between the student alone and the teacher. Prints JSON.
"""

from __future__ import annotations

import argparse

import torch
from _common import emit  # noqa: I001
from torch import nn

from slimkit.data import load_data
from slimkit.distill.config import DistillConfig, LogitKD
from slimkit.distill.objective import build_objective
from slimkit.train import TrainConfig, evaluate, fit


def mlp(hidden: list[int], dropout: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 10))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--student-epochs", type=int, default=20)
    ap.add_argument("--student-hidden", type=int, default=800)
    ap.add_argument("--temperature", type=float, default=8.0)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    data = load_data("builtin:mnist", seed=0)
    teacher = mlp([1200, 1200], 0.3, seed=0)
    fit(teacher, data, TrainConfig(epochs=args.teacher_epochs, lr=1e-3, batch_size=64),
        progress=False)
    t_acc = evaluate(teacher, data.x_test, data.y_test)
    s_cfg = TrainConfig(epochs=args.student_epochs, lr=3e-3, batch_size=64)
    kd = DistillConfig(logits=LogitKD(temperature=args.temperature, alpha=args.alpha))
    alone, distilled = [], []
    for seed in range(args.seeds):
        s = mlp([args.student_hidden], 0.0, seed=100 + seed)
        fit(s, data, s_cfg.model_copy(update={"seed": seed}), progress=False)
        alone.append(evaluate(s, data.x_test, data.y_test))
        s = mlp([args.student_hidden], 0.0, seed=100 + seed)
        objective = build_objective(s, teacher, kd, data.x_train[:2])
        fit(s, data, s_cfg.model_copy(update={"seed": seed}), objective=objective,
            progress=False)
        distilled.append(evaluate(s, data.x_test, data.y_test))
    a, d = sum(alone) / len(alone), sum(distilled) / len(distilled)
    closed = (d - a) / (t_acc - a) if t_acc > a else None
    emit({"benchmark": "distill_hinton", "data": data.name, "n_train": len(data.x_train),
          "n_test": len(data.x_test),
          "settings": vars(args) | {"teacher": "784-1200-1200-10, dropout 0.3",
                                    "student": f"784-{args.student_hidden}-10"},
          "teacher_top1": t_acc, "student_alone_top1": a, "student_distilled_top1": d,
          "per_seed": {"alone": alone, "distilled": distilled},
          "gap_closed": closed, "criterion": "gap_closed >= 0.5",
          "met": closed is not None and closed >= 0.5})


if __name__ == "__main__":
    main()
