"""The technique contract: every stage kind is ``(SlimModel, Config, StageContext) -> (SlimModel,
Record)``, registered beside its config; structural changes are rebuilt by kind and version.

A technique package registers its config in a module that does not import torch (so a
recipe is validated, and checked against the data given, before torch or any model loads), and
its function beside it (as torchao registers a handler beside each config)::

    @stage_config                          # slimkit/prune/config.py
    class MagnitudePruneConfig(StageConfig): ...

    @register_stage(MagnitudePruneConfig)  # slimkit/prune/magnitude.py
    def magnitude_prune(model: SlimModel, cfg: MagnitudePruneConfig,
                        ctx: StageContext) -> tuple[SlimModel, Record]: ...

The decorator returns the technique wrapped in the one place that keeps the contract: it fills
a missing context (no data, the input as teacher), checks the config's type, and stores every
``record.transforms`` entry in the output's architecture (``{"kind", "version", "plan"}``)
while dropping the module's stale zoo spec. Calling the technique from Python and running it as
a recipe stage are the same call.

Artifacts name each structural change by its rebuilder's kind and version, never by a Python
module path; :data:`LEGACY_OWNERS` maps what artifacts written before that still say.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimkit.core.config import SlimConfig
from slimkit.core.errors import ConfigError, MissingDataError
from slimkit.core.record import Record
from slimkit.core.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from slimkit.data.bundle import DataBundle
    from slimkit.io.model import SlimModel

# The modules whose import registers the built-in stage configs: none imports torch.
STAGE_CONFIG_MODULES = ("slimkit.prune.config", "slimkit.prune.structured_config",
                        "slimkit.quant.config", "slimkit.lowrank.config",
                        "slimkit.distill.config", "slimkit.encode.config",
                        "slimkit.exit.config")
# The modules whose import registers the built-in stage functions and rebuilders (technique
# packages import their modules lazily, so the modules are named, not the packages).
TECHNIQUES = ("slimkit.prune.magnitude", "slimkit.prune.nm", "slimkit.prune.schedule",
              "slimkit.prune.sparse_train", "slimkit.prune.structured",
              "slimkit.prune.structured_plan", "slimkit.quant.dynamic", "slimkit.quant.extreme",
              "slimkit.quant.fold", "slimkit.quant.mixed", "slimkit.quant.plan",
              "slimkit.quant.outputs",
              "slimkit.quant.ptq", "slimkit.quant.qat", "slimkit.quant.weight_only",
              "slimkit.lowrank.plan", "slimkit.lowrank.run", "slimkit.distill.run",
              "slimkit.encode.stage", "slimkit.io.linear", "slimkit.exit.model",
              "slimkit.exit.stage")


@dataclass
class StageContext:
    """What a stage may use besides the model: data, the uncompressed teacher, logging.

    Attributes:
        data: training/calibration data, or None (stages that need it say so).
        teacher: the model as it was before compression (distillation, "untouched" checks);
            None means the stage's input model.
        seed: the recipe's seed.
        progress: show training progress bars.
        log: where stage messages go.
        workdir: where a stage's training checkpoints go (resumable), or None.
        extras: free-form values for third-party stages.
        hide_test: give the stage ``data`` without its test split (the runner sets it):
            reading the test split then raises ``TestSplitError``, so every choice a stage
            makes is made on training and validation data (see :mod:`slimkit.data.guard`).
    """

    data: DataBundle | None = None
    teacher: SlimModel | None = None
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = print
    workdir: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    hide_test: bool = False

    def __post_init__(self) -> None:
        if self.hide_test and self.data is not None:
            from slimkit.data.guard import hide_test  # data sits above core; only when asked

            self.data = hide_test(self.data)

    @property
    def teacher_module(self) -> nn.Module | None:
        return None if self.teacher is None else self.teacher.module


StageFn = Callable[..., "tuple[SlimModel, Record]"]


@dataclass(frozen=True)
class StageSpec:
    """A stage kind: its config class (with a ``kind`` literal) and the function applying it."""

    config: type[SlimConfig]
    apply: StageFn


class StageConfig(SlimConfig):
    """Base of a stage's config: a ``kind`` literal names the stage in recipes."""

    def needs_data(self) -> str | None:
        """Why a stage with these settings cannot run without data, or None if it can.

        Returns the reason for the message ("finetune needs data", "needs training data").
        Checked when a recipe meets the data given (``slimkit compress`` without ``--data``,
        before any model loads) and again when the stage runs.
        """
        return None


STAGE_CONFIGS: Registry[type[SlimConfig]] = Registry("stage kind", plugins=STAGE_CONFIG_MODULES)
STAGES: Registry[StageSpec] = Registry("stage kind", plugins=TECHNIQUES)
# What register_stage(needs=...) declared a kind always needs.
_DECLARED_NEEDS: dict[str, str] = {}


def _kind(config: type[SlimConfig]) -> str:
    kind_field = config.model_fields.get("kind")
    if kind_field is None or not isinstance(kind_field.default, str):
        raise ValueError(f"{config.__name__} has no 'kind' field with a default: a stage config "
                         "names its kind, e.g. kind: Literal['my_stage'] = 'my_stage'")
    return kind_field.default


def stage_config(config: type[SlimConfig]) -> type[SlimConfig]:
    """Register ``config`` (a class decorator) as the config of the stage kind it names.

    Recipes are validated against the registered configs, so a config registered in a module
    that does not import torch is checked before torch loads.
    """
    STAGE_CONFIGS.register(_kind(config), config)
    return config


def data_needed(cfg: SlimConfig) -> str | None:
    """Why the stage configured by ``cfg`` cannot run without data ("finetune needs data"), or
    None if it can."""
    declared = _DECLARED_NEEDS.get(getattr(cfg, "kind", ""))
    if declared:
        return f"needs {declared}"
    return cfg.needs_data() if isinstance(cfg, StageConfig) else None


def register_stage(config: type[SlimConfig],
                   needs: str | None = None) -> Callable[[StageFn], StageFn]:
    """Register ``fn(model, cfg, ctx)`` as the stage whose kind is ``config``'s ``kind`` default.

    Args:
        config: the stage's config class (registered too, unless :func:`stage_config` did).
        needs: what ``ctx.data`` must hold for this stage whatever its settings ("training
            data"), if anything; a :class:`StageConfig` can say it per settings instead
            (``needs_data``). A context without the data is refused before the technique runs.

    Returns the technique wrapped by the contract (see the module docstring): ``ctx`` becomes
    optional and the output's architecture records the technique's transforms.

    Raises:
        ValueError: the kind is registered already for another config, or twice.
    """
    kind = _kind(config)
    if kind not in STAGE_CONFIGS:
        STAGE_CONFIGS.register(kind, config)
    elif STAGE_CONFIGS.get(kind) is not config:
        raise ValueError(f"stage kind '{kind}' is registered already, for "
                         f"{STAGE_CONFIGS.get(kind).__qualname__}")
    if needs:
        _DECLARED_NEEDS[kind] = needs

    def add(fn: StageFn) -> StageFn:
        @wraps(fn)
        def stage(model: SlimModel, cfg: SlimConfig,
                  ctx: StageContext | None = None) -> tuple[SlimModel, Record]:
            if not isinstance(cfg, config):
                raise ConfigError(f"stage {kind} takes a {config.__name__}, got "
                                  f"{type(cfg).__name__}")
            if not hasattr(model, "module") or not hasattr(model, "arch"):
                raise ConfigError(f"stage {kind} takes a SlimModel, got {type(model).__name__}; "
                                  "wrap a module first: slimkit.wrap(module, example_input)")
            ctx = StageContext(progress=False) if ctx is None else ctx
            need = data_needed(cfg)
            if need and ctx.data is None:
                raise MissingDataError(f"stage {kind}: {need} (give --data)")
            if ctx.teacher is None:
                ctx = replace(ctx, teacher=model)
            from slimkit.io.batch import judging  # io sits above core; only at call time

            with judging(getattr(model, "output", None)):
                out, record = fn(model, cfg, ctx)
            commit_transforms(out, record)
            return out, record

        STAGES.register(kind, StageSpec(config, stage))
        return stage

    return add


def commit_transforms(model: SlimModel, record: Record) -> None:
    """Store ``record.transforms`` in ``model.arch`` (the one place this happens).

    The module's ``slimkit_spec`` (the zoo's build arguments) describes the structure before
    the change, so it is dropped: wrapping the module again must not rebuild the old shapes.
    A model without a rebuildable spec keeps ``arch`` None (its artifact stores a graph).
    """
    if not record.transforms:
        return
    if hasattr(model.module, "slimkit_spec"):
        del model.module.slimkit_spec
    if model.arch is None:
        return
    entries = model.arch.setdefault("transforms", [])
    for kind, plan in record.transforms:
        entries.append({"kind": kind, "version": REBUILDERS.get(kind).version, "plan": plan})


@dataclass(frozen=True)
class Rebuilder:
    """Replays a structural change on a freshly built module: ``fn(module, plan) -> module``."""

    fn: Callable[[Any, dict], Any]
    version: int


REBUILDERS: Registry[Rebuilder] = Registry("structural transform", plugins=TECHNIQUES)

# Artifacts written before transforms were named by kind and version held the Python module
# that registered the rebuilder ("owner"); those entries are version 1 of these kinds.
LEGACY_OWNERS: dict[str, frozenset[str]] = {
    "slimkit.prune.structured": frozenset({"structured_prune"}),
    "slimkit.lowrank.plan": frozenset({"lowrank"}),
    "slimkit.quant.fold": frozenset({"bn_fold"}),
    "slimkit.quant.plan": frozenset({"quant_layers"}),
    "slimkit.quant.extreme": frozenset({"packed_quant"}),
    "slimkit.quant.weight_only": frozenset({"weight_only_quant"}),
    "slimkit.quant.dynamic": frozenset({"dynamic_quant"}),
}


def register_rebuilder(kind: str, version: int = 1) -> Callable[[Callable], Callable]:
    """Register ``fn(module, plan) -> module`` replaying transform ``kind`` at ``version``.

    Raise ``version`` when the plan's meaning changes: artifacts naming a newer version than
    the registered one are refused with a message instead of being rebuilt wrongly.
    """

    def add(fn: Callable) -> Callable:
        REBUILDERS.register(kind, Rebuilder(fn, version))
        return fn

    return add
