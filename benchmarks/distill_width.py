"""A zoo CNN made ~50% smaller in FLOPs by width, fine-tuned with and without distillation.

Teacher: zoo:resnet20 (width 16) trained on builtin:mnist1d. Student: resnet20 at width 11
((11/16)^2 = 47% of the FLOPs), trained for the same budget from the same initialization with
plain cross-entropy and with distillation from the teacher (logit KD plus FitNets hints at
layer2/layer3 by default; ``--feature-loss none`` for logits alone). Prints JSON.
"""

from __future__ import annotations

import argparse

import torch
from _common import emit  # noqa: I001

from slimkit.data import load_data
from slimkit.distill.config import DistillConfig, FeaturePair, LogitKD
from slimkit.distill.objective import build_objective
from slimkit.io.loader import load_zoo
from slimkit.measure import count_flops
from slimkit.train import TrainConfig, evaluate, fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="builtin:mnist1d")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=11)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--feature-loss", choices=["none", "hint", "attention", "relational"],
                    default="hint", help="Also match layer2/layer3 features.")
    args = ap.parse_args()
    data = load_data(args.data, seed=0)
    torch.manual_seed(0)
    teacher = load_zoo("resnet20", data).module
    fit(teacher, data, TrainConfig(epochs=args.teacher_epochs, lr=2e-3), progress=False)
    t_acc = evaluate(teacher, data.x_test, data.y_test)
    x1 = data.x_test[:1]
    cfg = TrainConfig(epochs=args.epochs, lr=2e-3)
    pairs = [] if args.feature_loss == "none" else [
        FeaturePair(student=n, teacher=n, loss=args.feature_loss) for n in ("layer2", "layer3")]
    kd = DistillConfig(logits=LogitKD(temperature=args.temperature, alpha=args.alpha),
                       features=pairs)
    plain, distilled = [], []
    for seed in range(args.seeds):
        torch.manual_seed(100 + seed)
        student = load_zoo("resnet20", data, width=args.width).module
        init = {k: v.clone() for k, v in student.state_dict().items()}
        fit(student, data, cfg.model_copy(update={"seed": seed}), progress=False)
        plain.append(evaluate(student, data.x_test, data.y_test))
        student.load_state_dict(init)
        objective = build_objective(student, teacher, kd, data.x_train[:2])
        fit(student, data, cfg.model_copy(update={"seed": seed}), objective=objective,
            progress=False)
        distilled.append(evaluate(student, data.x_test, data.y_test))
    flops_t = count_flops(teacher, (x1,))["flops"]
    flops_s = count_flops(student, (x1,))["flops"]
    p, d = sum(plain) / len(plain), sum(distilled) / len(distilled)
    emit({"benchmark": "distill_width", "data": data.name, "settings": vars(args),
          "flops_ratio_student_over_teacher": flops_s / flops_t,
          "teacher_top1": t_acc, "student_plain_top1": p, "student_distilled_top1": d,
          "per_seed": {"plain": plain, "distilled": distilled},
          "criterion": "distilled >= plain", "met": d >= p})


if __name__ == "__main__":
    main()
