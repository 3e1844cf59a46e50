"""The shared training loop, its config, objectives and checkpoints."""

from slimkit.train.bn import recalibrate_batchnorm
from slimkit.train.config import EarlyStopping, TrainConfig
from slimkit.train.loop import evaluate, fit
from slimkit.train.objective import CrossEntropy, Objective

__all__ = ["CrossEntropy", "EarlyStopping", "Objective", "TrainConfig", "evaluate", "fit",
           "recalibrate_batchnorm"]
