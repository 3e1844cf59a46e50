"""The output term of distillation for each task: the labels and the teacher's judged output.

Hinton's soft targets compare class distributions; that is right for a classifier and, token
by token, for a language model, but meaningless for an encoder's embeddings or a regressor's
numbers. Each task therefore says here how the student's judged output is trained:

==============  ==========================================  ==================================
task            hard part (labels), ``alpha``               soft part (teacher), ``1 − alpha``
==============  ==========================================  ==================================
classification  cross-entropy                               ``kl``: ``T²·KL`` of the softened
                                                            class distributions
causal_lm       next-token cross-entropy (the task's loss,  ``kl``: ``T²·KL`` per token over
                padding masked by ``attention_mask``)       the vocabulary, averaged over the
                                                            tokens the mask keeps
regression      MSE to the targets                          ``mse``: MSE to the teacher's
                                                            output
embedding       none: an encoder has no labels, so the      ``cosine`` (``1 − cos``) or
                soft part is the whole term                 ``mse`` of the mean-pooled
                                                            embeddings (:func:`embed`)
==============  ==========================================  ==================================

``LogitKD.loss`` picks the soft part (``auto``: the first one listed). Without logit KD
(``logits: null``) a task with labels trains on its hard part alone and an encoder on its
``auto`` soft part, which is also its task's own fine-tuning loss.

Outputs reach the losses as the judged tensors, already selected (the teacher's by its own
name), so the task functions are called with the selection switched off
(:func:`slimkit.io.batch.judging` ``(None)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from slimkit.core.errors import ConfigError, ModelError
from slimkit.core.registry import Registry
from slimkit.distill.config import DistillConfig, LogitKD
from slimkit.distill.losses import cosine_embedding_loss, output_mse_loss, soft_target_kl
from slimkit.io import batch as B
from slimkit.measure.tasks import embed, get_task

__all__ = ["TASK_TERMS", "OutputLoss", "TaskTerms", "output_loss"]

Parts = dict[str, float]
#: ``hard(student_out, x, y)``: the loss on the labels.
Hard = Callable[[Tensor, B.Inputs, Tensor], Tensor]
#: ``soft(student_out, teacher_out, x, cfg)``: the loss to the teacher; checks the shapes.
Soft = Callable[[Tensor, Tensor, B.Inputs, LogitKD], Tensor]


@dataclass(frozen=True)
class TaskTerms:
    """How one task's student output is trained.

    Attributes:
        hard: the loss on the labels, or None for a task without labels.
        hard_name: its name in the objective's ``parts``.
        soft: the losses to the teacher's output by ``LogitKD.loss`` name; the first is what
            ``auto`` picks.
        soft_name: the soft loss's name in ``parts``.
        why: what the outputs are, for the error naming a soft loss that does not apply.
        exits: whether self-distillation's exit heads (classifiers on class labels) apply.
    """

    hard: Hard | None
    hard_name: str
    soft: dict[str, Soft]
    soft_name: str
    why: str
    exits: bool = False


def check_outputs(student: Tensor, teacher: Tensor, what: str = "logits",
                  fix: str = "logit KD needs both models to predict the same classes") -> None:
    """Raise a ModelError naming both shapes when the teacher's output does not match."""
    if student.shape != teacher.shape:
        raise ModelError(
            f"teacher {what} have shape {tuple(teacher.shape)} but the student's have "
            f"{tuple(student.shape)}; {fix}. Use a teacher with the student's outputs, or set "
            "logits: null and distill features only")


def _mask(x: B.Inputs) -> Tensor | None:
    return x.get("attention_mask") if isinstance(x, dict) else None


def _class_kl(s: Tensor, t: Tensor, _x: B.Inputs, kd: LogitKD) -> Tensor:
    check_outputs(s, t)
    return soft_target_kl(s, t, kd.temperature)


def _token_kl(s: Tensor, t: Tensor, x: B.Inputs, kd: LogitKD) -> Tensor:
    """``T²·KL`` per token over the vocabulary, averaged over the tokens the mask keeps: every
    kept position's distribution over the next token is a soft target (also the last one's,
    whose next token the data does not hold)."""
    if s.dim() != 3:
        raise ModelError(f"causal_lm: the judged output must be logits [batch, sequence, "
                         f"vocabulary], got {tuple(s.shape)} (set output: logits)")
    check_outputs(s, t, fix="token KD needs both models to share one vocabulary")
    mask = _mask(x)
    if mask is not None and tuple(mask.shape) != tuple(s.shape[:2]):
        raise ModelError(f"causal_lm: attention_mask {tuple(mask.shape)} does not match the "
                         f"logits' [batch, sequence] {tuple(s.shape[:2])}")
    return soft_target_kl(s, t, kd.temperature, mask=mask)


def _output_mse(s: Tensor, t: Tensor, _x: B.Inputs, _kd: LogitKD) -> Tensor:
    check_outputs(s, t, "outputs", "both models must predict the same targets")
    return output_mse_loss(s, t)


def _embeddings(s: Tensor, t: Tensor, x: B.Inputs) -> tuple[Tensor, Tensor]:
    with B.judging(None):
        es, et = embed(s, x), embed(t, x)
    check_outputs(es, et, "embeddings", "both models must embed into the same dimension")
    return es, et


def _embed_cosine(s: Tensor, t: Tensor, x: B.Inputs, _kd: LogitKD) -> Tensor:
    return cosine_embedding_loss(*_embeddings(s, t, x))


def _embed_mse(s: Tensor, t: Tensor, x: B.Inputs, _kd: LogitKD) -> Tensor:
    return output_mse_loss(*_embeddings(s, t, x))


def _task_loss(task: str) -> Hard:
    """The task's own loss (:mod:`slimkit.measure.tasks`) on the judged tensor."""
    loss = get_task(task).loss
    assert loss is not None

    def hard(s: Tensor, x: B.Inputs, y: Tensor) -> Tensor:
        with B.judging(None):
            return loss(s, x, y, None)

    return hard


TASK_TERMS: Registry[TaskTerms] = Registry("distillation task")
TASK_TERMS.register("classification", TaskTerms(
    lambda s, _x, y: F.cross_entropy(s, y), "ce", {"kl": _class_kl}, "kd",
    "its outputs are class logits", exits=True))
TASK_TERMS.register("causal_lm", TaskTerms(
    _task_loss("causal_lm"), "ce", {"kl": _token_kl}, "kd",
    "its outputs are next-token logits"))
TASK_TERMS.register("regression", TaskTerms(
    _task_loss("regression"), "mse", {"mse": _output_mse}, "kd",
    "its outputs are numbers, not class scores"))
TASK_TERMS.register("embedding", TaskTerms(
    None, "", {"cosine": _embed_cosine, "mse": _embed_mse}, "embed",
    "its outputs are embeddings, which have no softmax"))


class OutputLoss:
    """The output term of one distillation run (see the module's table).

    Call it as ``loss(student_out, teacher_out, x, y)`` for ``(loss, parts)``; ``teacher_out``
    is None when no term reads a teacher. Build it with :func:`output_loss`.
    """

    def __init__(self, task: str, terms: TaskTerms, kd: LogitKD | None) -> None:
        self.task, self.terms, self.kd = task, terms, kd
        auto = next(iter(terms.soft))
        self.soft = terms.soft[auto if kd is None or kd.loss == "auto" else kd.loss]

    def check(self, student_out: Tensor, teacher_out: Tensor, x: B.Inputs) -> None:
        """Fail now, naming both shapes, if the soft term cannot compare these outputs."""
        if self.kd is not None:
            self.soft(student_out, teacher_out, x, self.kd)

    def __call__(self, s: Tensor, t: Tensor | None, x: B.Inputs, y: Tensor,
                 ) -> tuple[Tensor, Parts]:
        terms, kd = self.terms, self.kd
        if terms.hard is None:  # no labels: the teacher's output is the only target
            assert t is not None, "output_loss refuses a label-free task without a teacher"
            soft = self.soft(s, t, x, kd or LogitKD())
            return soft, {terms.soft_name: float(soft.detach())}
        hard = terms.hard(s, x, y)
        if kd is None or t is None:
            return hard, {terms.hard_name: float(hard.detach())}
        soft = self.soft(s, t, x, kd)
        loss = kd.alpha * hard + (1.0 - kd.alpha) * soft
        return loss, {terms.hard_name: float(hard.detach()), terms.soft_name: float(soft.detach())}


def output_loss(task: str | None, cfg: DistillConfig, has_teacher: bool = True) -> OutputLoss:
    """The output term for ``task`` (None: classification) under ``cfg``.

    Raises:
        ConfigError: an unknown task, a soft loss (``logits.loss``) or ``self_distill`` that
            does not apply to the task, or a label-free task without a teacher; one line naming
            the loss and the task.

    Example:
        >>> loss, parts = output_loss("causal_lm", DistillConfig())(s_logits, t_logits, x, y)
    """
    task = task or "classification"
    if task not in TASK_TERMS:
        raise ConfigError(f"distill: task '{task}' has no distillation loss; distillation "
                          f"supports {', '.join(TASK_TERMS.names())}")
    terms = TASK_TERMS.get(task)
    kd = cfg.logits
    if kd is not None and kd.loss != "auto" and kd.loss not in terms.soft:
        raise ConfigError(f"distill: logits loss '{kd.loss}' does not apply to task '{task}' "
                          f"({terms.why}); use {' or '.join(terms.soft)}, or auto")
    if cfg.self_distill is not None and not terms.exits:
        raise ConfigError(f"distill: self_distill does not apply to task '{task}' (its exit "
                          "heads are classifiers trained on class labels); drop self_distill")
    if terms.hard is None and not has_teacher:
        raise ConfigError(f"distill: task '{task}' has no labels, so its student learns only "
                          "from a teacher's outputs; give a teacher")
    return OutputLoss(task, terms, kd)
