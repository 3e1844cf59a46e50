"""The shared training loop."""

from slimkit.train.loop import TrainConfig, evaluate, fit

__all__ = ["TrainConfig", "evaluate", "fit"]
