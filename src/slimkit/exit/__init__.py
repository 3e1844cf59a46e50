"""Dynamic inference with early exits: heads after chosen blocks, trained by
self-distillation, one confidence threshold per exit calibrated on a validation split, and
inference that stops (in PyTorch, and in ONNX Runtime as a chain of steps with a runner).

Plan, then apply: :func:`~slimkit.exit.plan.build_plan` sizes the heads from a traced pass
(a JSON plan), :class:`~slimkit.exit.model.EarlyExitModel` builds them on the backbone, and
the ``early_exit`` stage trains, calibrates (with a safety margin: the drop's one-sided
upper confidence bound on validation stays within the target) and records; transformers
models are cut through :mod:`slimkit.exit.hf`. Names are imported on first use
(see :mod:`slimkit.core.lazy`); the config needs no torch.
"""

from slimkit.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "slimkit.exit.config": ("EarlyExitConfig",),
    "slimkit.exit.model": ("EarlyExitModel", "confidence", "exit_index"),
    "slimkit.exit.onnx": ("check_exit_parity", "export_exit_onnx"),
    "slimkit.exit.plan": ("build_plan", "default_exits"),
    "slimkit.exit.runner": ("EarlyExitRunner",),
    "slimkit.exit.stage": ("early_exit",),
})
