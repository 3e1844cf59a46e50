"""Registers the ``gradual_prune``, ``nm_prune`` and ``sparse_train`` stage kinds.

Composition only: the techniques live in ``slimkit.prune``. None of them changes a model's
structure (they zero weights), so no rebuild transform is recorded; pack the model
(``encode``) to make the zeros cost no bytes.
"""

from __future__ import annotations

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.io.model import SlimModel
from slimkit.pipeline.stages import StageContext, register_stage
from slimkit.prune.nm import NMPruneConfig, nm_prune
from slimkit.prune.schedule import GradualPruneConfig, gradual_prune
from slimkit.prune.sparse_train import SparseTrainConfig, sparse_train


@register_stage(GradualPruneConfig)
def _gradual_prune(model: SlimModel, cfg: GradualPruneConfig,
                   ctx: StageContext) -> tuple[SlimModel, Record]:
    if ctx.data is None:
        raise ConfigError("stage gradual_prune needs training data (give --data)")
    module, record = gradual_prune(model.module, cfg, ctx.data, teacher=ctx.teacher.module,
                                   progress=ctx.progress, checkpoint_dir=ctx.workdir)
    return model.copy(module), record


@register_stage(NMPruneConfig)
def _nm_prune(model: SlimModel, cfg: NMPruneConfig,
              ctx: StageContext) -> tuple[SlimModel, Record]:
    module, record = nm_prune(model.module, cfg, ctx.data, teacher=ctx.teacher.module,
                              progress=ctx.progress, checkpoint_dir=ctx.workdir)
    return model.copy(module), record


@register_stage(SparseTrainConfig)
def _sparse_train(model: SlimModel, cfg: SparseTrainConfig,
                  ctx: StageContext) -> tuple[SlimModel, Record]:
    if ctx.data is None:
        raise ConfigError("stage sparse_train needs training data (give --data)")
    module, record = sparse_train(model.module, cfg, ctx.data, teacher=ctx.teacher.module,
                                  progress=ctx.progress, checkpoint_dir=ctx.workdir)
    return model.copy(module), record
