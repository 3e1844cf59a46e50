"""The distillation objective: what the training loop minimizes when a student learns.

:func:`build_objective` turns a :class:`~slimkit.distill.config.DistillConfig` into an
:class:`~slimkit.train.objective.Objective`. The loop stays the one in ``train/``: it calls
``objective(model, x, y)`` and trains ``objective.parameters()`` (projectors and exit heads)
together with the student.

Why the construction does a dry run: projectors and exit heads need the feature shapes, which
are only known after a forward pass. Creating them lazily on the first training step would
leave them out of an optimizer built before it, so they are created at construction, from one
forward pass of both models on ``example_x`` (in eval mode and under ``no_grad``, so batch-norm
statistics and the models themselves are left unchanged), in config order, which makes their
initialization deterministic under ``torch.manual_seed``.

The teacher is held outside the module tree (in a tuple), so its parameters are neither in
``objective.parameters()`` nor in its ``state_dict``; it runs in eval mode under ``no_grad``
with its own training flags restored afterwards, and is never written to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from slimkit.core.errors import ConfigError, ModelError
from slimkit.core.registry import Registry
from slimkit.distill.config import DistillConfig, SelfDistill, TransformerKD
from slimkit.distill.hooks import FeatureTaps, attention_probs, find_attention
from slimkit.distill.losses import (
    attention_map_loss,
    attention_transfer_loss,
    hidden_state_loss,
    hint_loss,
    similarity_preserving_loss,
    soft_target_kl,
)
from slimkit.distill.outputs import output_loss
from slimkit.distill.projectors import (
    ExitHead,
    Projector,
    channel_map,
    feature_channels,
    pool_features,
    resolve_layout,
    to_channels_first,
)
from slimkit.io import batch as B
from slimkit.io.model import modes_kept, set_mode
from slimkit.measure.tasks import Task
from slimkit.train.objective import Objective

__all__ = ["FEATURE_LOSSES", "DistillObjective", "build_objective"]

Parts = dict[str, float]

#: Feature-pair losses by ``FeaturePair.loss``; each takes (student, teacher) channels-first.
FEATURE_LOSSES: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("feature loss")
FEATURE_LOSSES.register("hint", hint_loss)
FEATURE_LOSSES.register("attention", attention_transfer_loss)
FEATURE_LOSSES.register("relational", similarity_preserving_loss)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode, then restore every submodule's own training flag."""
    with modes_kept(model):
        set_mode(model, False)
        yield


def _inner(model: nn.Module) -> nn.Module:
    """The module whose names the config uses (DDP prefixes them with ``module.``)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _device(model: nn.Module, default: torch.device) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else default


def _input_device(x: B.Inputs) -> torch.device:
    """Where a batch lives (its first tensor's device)."""
    tensors = B.leaves(x)
    return tensors[0].device if tensors else torch.device("cpu")


def _shapes(x: B.Inputs) -> str:
    """A batch's tensor shapes for messages: ``(2, 3, 8, 8)`` or ``input_ids (2, 12), ...``."""
    if isinstance(x, Tensor):
        return str(tuple(x.shape))
    return ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(B.names(x), B.leaves(x),
                                                             strict=False))


def _dry_run(model: nn.Module, names: list[str], x: B.Inputs, label: str,
             output: str | None = None) -> tuple[Tensor, FeatureTaps]:
    """The judged output (logits; ``output`` by name, else :func:`slimkit.io.batch.select`'s)
    of one eval-mode forward pass, and the tapped features."""
    taps = FeatureTaps(model, names, label)
    try:
        with torch.no_grad(), _eval_mode(model), taps:
            out = B.select(B.call(model, B.to(x, _device(model, _input_device(x)))), output)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ModelError(f"{label} ({type(model).__name__}) failed on example_x of shape "
                         f"{_shapes(x)}: {err}") from err
    return out, taps


def _add(a: tuple[Tensor, Parts], b: tuple[Tensor, Parts]) -> tuple[Tensor, Parts]:
    return a[0] + b[0], {**a[1], **b[1]}


class DistillObjective(Objective):
    """The task's loss or logit KD, plus feature, transformer and self-distillation terms.

    ``forward(model, x, y)`` returns the total loss, the student's logits, and ``parts``: the
    unweighted float value of every term ("ce", "kd", "<loss>:<student>-><teacher>", "hidden",
    "attention", "exit_ce", "exit_kd", "exit_hint"; "mse" for regression's targets, "embed"
    for an encoder's embedding loss). Logits are each model's judged output
    (:func:`slimkit.io.batch.select`: the stage's ``SlimModel.output``, or ``teacher_output``
    for the teacher); feature taps are by layer name whatever the models return. How the
    logits are trained depends on the data's task (:mod:`slimkit.distill.outputs`):
    cross-entropy and softmax KD for a classifier, the same per token (padding masked) for a
    causal LM, MSE for a regressor, cosine (or MSE) of the embeddings for an encoder.

    Build it with :func:`build_objective` (same arguments). Submodules: ``feature_projectors``
    (one per feature pair), ``hidden_projectors`` (one per transformer pair), ``exit_heads``
    and ``exit_projectors`` (self-distillation). Inputs are moved to the teacher's device for
    its forward pass and its outputs back, so the teacher may stay where it is.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig,
                 example_x: B.Inputs, teacher_output: str | None = None,
                 task: str | Task | None = None) -> None:
        super().__init__()
        self._teacher_output = teacher_output
        self.task = task.name if isinstance(task, Task) else (task or "classification")
        if cfg.needs_teacher and teacher is None:
            raise ConfigError("distill: logits, features and transformer terms need a teacher "
                              "model; give one, or keep only self_distill (set logits: null)")
        if teacher is not None and teacher is _inner(student):
            raise ConfigError("distill: the teacher is the student itself; pass teacher=None "
                              "and use self_distill to let a model teach its own exits")
        self.cfg = cfg.model_copy(deep=True)  # later edits to cfg must not desync the heads
        cfg = self.cfg
        self._outputs = output_loss(self.task, cfg, has_teacher=teacher is not None)
        self._teacher: tuple[nn.Module, ...] = () if teacher is None else (teacher,)
        student = _inner(student)
        self._attention: list[tuple[str, str, int, str, str, int]] = []
        self._student_names, self._teacher_names = self._plan_taps(student, teacher)
        s_logits, s_taps = _dry_run(student, self._student_names, example_x, "student")
        t_taps = None
        if teacher is not None and cfg.needs_teacher:
            t_logits, t_taps = _dry_run(teacher, self._teacher_names, example_x, "teacher",
                                        teacher_output)
            with torch.no_grad():  # fail now, naming both shapes, not at the first step
                self._outputs.check(s_logits, t_logits.to(s_logits.device),
                                    B.to(example_x, s_logits.device))
        self._build_feature_projectors(student, teacher, s_taps, t_taps)
        self._build_hidden_projectors(s_taps, t_taps)
        self._build_exits(student, s_taps, s_logits)
        self.to(s_logits.device)  # a float64 or GPU student gets projectors to match
        if s_logits.dtype.is_floating_point:
            self.to(s_logits.dtype)

    @property
    def teacher(self) -> nn.Module | None:
        """The teacher model (not a submodule of the objective), or None."""
        return self._teacher[0] if self._teacher else None

    def _plan_taps(self, student: nn.Module, teacher: nn.Module | None,
                   ) -> tuple[list[str], list[str]]:
        """Layer names to tap on each side; locates attention q/k linears for TinyBERT."""
        cfg = self.cfg
        s_names = [p.student for p in cfg.features]
        t_names = [p.teacher for p in cfg.features]
        if cfg.transformer is not None and teacher is not None:
            tkd = cfg.transformer
            s_names += tkd.student_layers
            t_names += tkd.teacher_layers
            if tkd.attention_weight > 0:
                for s_block, t_block in zip(tkd.student_layers, tkd.teacher_layers, strict=True):
                    sq, sk, sh = find_attention(student, s_block, "student")
                    tq, tk, th = find_attention(teacher, t_block, "teacher")
                    self._attention.append((sq, sk, sh, tq, tk, th))
                    s_names += [sq, sk]
                    t_names += [tq, tk]
        if cfg.self_distill is not None:
            sd = cfg.self_distill
            s_names += [*sd.exits, sd.feature_layer or sd.exits[-1]]
        return list(dict.fromkeys(s_names)), list(dict.fromkeys(t_names))

    def _build_feature_projectors(self, student: nn.Module, teacher: nn.Module | None,
                                  s_taps: FeatureTaps, t_taps: FeatureTaps | None) -> None:
        """One Projector per pair (learned only for "hint"); checks each loss runs."""
        self.feature_projectors = nn.ModuleList()
        self._teacher_layouts: list[str] = []
        if teacher is None or t_taps is None:
            return
        for pair in self.cfg.features:
            what = f"feature pair {pair.student!r} -> {pair.teacher!r}"
            fs, ft = s_taps[pair.student], t_taps[pair.teacher]
            s_layout = resolve_layout(student, pair.student, fs.dim(), pair.layout)
            t_layout = resolve_layout(teacher, pair.teacher, ft.dim(), pair.layout)
            if pair.loss == "hint":
                proj = Projector(tuple(fs.shape), tuple(ft.shape), s_layout, t_layout, what)
            else:  # attention/relational compare any widths: only move to channels first
                proj = Projector(tuple(fs.shape), tuple(fs.shape), s_layout, s_layout, what)
            self.feature_projectors.append(proj)
            self._teacher_layouts.append(t_layout)
            try:  # fail now, naming the pair, rather than at the first training step
                with torch.no_grad():
                    FEATURE_LOSSES.get(pair.loss)(proj(fs), to_channels_first(ft, t_layout))
            except ValueError as err:
                raise ModelError(f"{what}: {err}") from err

    def _build_hidden_projectors(self, s_taps: FeatureTaps, t_taps: FeatureTaps | None) -> None:
        """TinyBERT's W_h: a Linear on the last (hidden) dim, or Identity for equal widths."""
        self.hidden_projectors = nn.ModuleList()
        tkd = self.cfg.transformer
        if tkd is None or t_taps is None:
            return
        for s_name, t_name in zip(tkd.student_layers, tkd.teacher_layers, strict=True):
            hs, ht = s_taps[s_name], t_taps[t_name]
            if hs.dim() != ht.dim() or hs.shape[:-1] != ht.shape[:-1]:
                raise ModelError(
                    f"transformer pair {s_name!r} -> {t_name!r}: hidden states "
                    f"{tuple(hs.shape)} and {tuple(ht.shape)} must agree in all but the last "
                    "(hidden) dim; pair blocks that see the same number of tokens")
            self.hidden_projectors.append(
                channel_map(hs.shape[-1], ht.shape[-1], 2, "channels_last", s_name))

    def _build_exits(self, student: nn.Module, s_taps: FeatureTaps, logits: Tensor) -> None:
        """Exit heads (pool + Linear) and, for the hint, Linear maps to the deepest width."""
        self.exit_heads = nn.ModuleList()
        self.exit_projectors = nn.ModuleList()
        self._exit_layouts: list[str] = []
        sd = self.cfg.self_distill
        if sd is None:
            return
        if logits.dim() != 2:
            raise ModelError(f"self_distill needs [batch, classes] logits, the student returns "
                             f"{tuple(logits.shape)}")
        deep_name = sd.feature_layer or sd.exits[-1]
        deep = s_taps[deep_name]
        self._deep_layout = resolve_layout(student, deep_name, deep.dim(), sd.layout)
        deep_width = feature_channels(tuple(deep.shape), self._deep_layout)
        for name in sd.exits:
            feat = s_taps[name]
            layout = resolve_layout(student, name, feat.dim(), sd.layout)
            width = feature_channels(tuple(feat.shape), layout)
            self._exit_layouts.append(layout)
            self.exit_heads.append(ExitHead(width, logits.shape[-1], layout))
            if sd.feature_weight > 0:
                self.exit_projectors.append(channel_map(width, deep_width, 2, layout, name))

    def forward(self, model: nn.Module, x: B.Inputs, y: Tensor,
                ) -> tuple[Tensor, Tensor, Parts]:
        """Total loss, the student's logits, and each term's float value.

        ``x`` is a batch as :func:`slimkit.io.batch.call` takes it (a tensor, a tuple or a
        dict); the logits are each model's judged output (:func:`slimkit.io.batch.select`).

        Raises:
            ModelError: a tapped layer did not run, or teacher and student logits differ.
        """
        with FeatureTaps(_inner(model), self._student_names, "student") as s_taps:
            logits = B.select(B.call(model, x))
        t_logits, t_taps = None, None
        if self.cfg.needs_teacher:
            t_logits, t_taps = self._run_teacher(x)
        loss, parts = self._outputs(logits, t_logits, x, y)
        if t_taps is not None and self.cfg.features:
            loss, parts = _add((loss, parts), self._feature_terms(s_taps, t_taps))
        if t_taps is not None and self.cfg.transformer is not None:
            loss, parts = _add((loss, parts),
                               self._transformer_terms(self.cfg.transformer, s_taps, t_taps))
        if self.cfg.self_distill is not None:
            loss, parts = _add((loss, parts),
                               self._exit_terms(self.cfg.self_distill, logits, s_taps, y))
        return loss, logits, parts

    def _run_teacher(self, x: B.Inputs) -> tuple[Tensor, FeatureTaps]:
        """The teacher's judged output (logits) and taps, moved to the batch's device."""
        teacher = self._teacher[0]
        device = _input_device(x)
        taps = FeatureTaps(teacher, self._teacher_names, "teacher")
        with torch.no_grad(), _eval_mode(teacher), taps:
            t_logits = B.select(B.call(teacher, B.to(x, _device(teacher, device))),
                                self._teacher_output)
        taps.features = {k: v.to(device) for k, v in taps.features.items()}
        return t_logits.to(device), taps

    def _feature_terms(self, s_taps: FeatureTaps, t_taps: FeatureTaps) -> tuple[Tensor, Parts]:
        weighted, parts = [], {}
        for pair, proj, t_layout in zip(self.cfg.features, self.feature_projectors,
                                        self._teacher_layouts, strict=True):
            fs = proj(s_taps[pair.student])
            ft = to_channels_first(t_taps[pair.teacher], t_layout)
            value = FEATURE_LOSSES.get(pair.loss)(fs, ft)
            weighted.append(pair.weight * value)
            parts[f"{pair.loss}:{pair.student}->{pair.teacher}"] = float(value.detach())
        return torch.stack(weighted).sum(), parts

    def _transformer_terms(self, tkd: TransformerKD, s_taps: FeatureTaps,
                           t_taps: FeatureTaps) -> tuple[Tensor, Parts]:
        """TinyBERT: Σ MSE(H_s W_h, H_t) and Σ MSE(A_s, A_t) over the layer pairs."""
        pairs = zip(tkd.student_layers, tkd.teacher_layers, self.hidden_projectors, strict=True)
        hidden = torch.stack([hidden_state_loss(proj(s_taps[s]), t_taps[t])
                              for s, t, proj in pairs]).sum()
        loss, parts = tkd.hidden_weight * hidden, {"hidden": float(hidden.detach())}
        if self._attention:  # attention maps recomputed from the tapped q/k projections
            attn = torch.stack([
                attention_map_loss(attention_probs(s_taps[sq], s_taps[sk], sh),
                                   attention_probs(t_taps[tq], t_taps[tk], th))
                for sq, sk, sh, tq, tk, th in self._attention]).sum()
            loss = loss + tkd.attention_weight * attn
            parts["attention"] = float(attn.detach())
        return loss, parts

    def _exit_terms(self, sd: SelfDistill, logits: Tensor, s_taps: FeatureTaps, y: Tensor,
                    ) -> tuple[Tensor, Parts]:
        """Be Your Own Teacher: per exit CE + weight·KD(final→exit) + feature_weight·hint."""
        target = logits.detach()
        deep_name = sd.feature_layer or sd.exits[-1]
        deep = pool_features(s_taps[deep_name], self._deep_layout).detach()
        ce = kd = hint = torch.zeros((), device=logits.device)
        for i, (name, head) in enumerate(zip(sd.exits, self.exit_heads, strict=True)):
            feat = s_taps[name]
            exit_logits = head(feat)
            ce = ce + F.cross_entropy(exit_logits, y)
            kd = kd + soft_target_kl(exit_logits, target, sd.temperature)
            if sd.feature_weight > 0 and name != deep_name:
                pooled = pool_features(feat, self._exit_layouts[i])
                hint = hint + hint_loss(self.exit_projectors[i](pooled), deep)
        parts = {"exit_ce": float(ce.detach()), "exit_kd": float(kd.detach())}
        if sd.feature_weight > 0:
            parts["exit_hint"] = float(hint.detach())
        return ce + sd.weight * kd + sd.feature_weight * hint, parts


def build_objective(student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig,
                    example_x: B.Inputs, teacher_output: str | None = None,
                    task: str | Task | None = None) -> Objective:
    """Build the distillation objective for ``student`` (and ``teacher``) from ``cfg``.

    Args:
        student: the model being trained; only read here (a dry forward pass in eval mode).
        teacher: the fixed teacher, or None for self-distillation only. It is never modified
            and never becomes a submodule of the objective.
        cfg: which terms to use.
        example_x: one input batch (a tensor, a tuple or a dict, as
            :func:`slimkit.io.batch.call` takes it); its forward pass gives the shapes of the
            projectors and exit heads, which are created here (deterministically, in config
            order). Logit terms use each model's judged output (:func:`slimkit.io.batch.select`).
        teacher_output: the teacher's judged output by :func:`slimkit.io.batch.flatten` name
            (its ``SlimModel.output``); None: the one the student is judged by.
        task: the data's task (``DataBundle.task``); None is classification. It decides how
            the logits are trained (:mod:`slimkit.distill.outputs`): softmax KD for class or
            token logits, MSE for a regressor, cosine or MSE of the embeddings for an encoder.

    Returns:
        A :class:`DistillObjective`; train its parameters with the student's.

    Raises:
        ConfigError: a term needs a teacher and none was given; an unknown layer name (naming
            the closest one); a transformer block without recomputable attention; a logit loss
            or self_distill that does not apply to the task.
        ModelError: teacher and student outputs of different shapes (logit KD); features that
            cannot be matched; a model that fails on ``example_x``.

    Example:
        >>> objective = build_objective(student, teacher, DistillConfig(), B.take(x, slice(0, 8)))
        >>> loss, logits, parts = objective(student, x, y)
    """
    return DistillObjective(student, teacher, cfg, example_x, teacher_output, task)
