"""The in-memory dataset every layer works with."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DataBundle:
    """A labelled dataset split into train and test, held as tensors.

    Attributes:
        name: where it came from (``builtin:mnist``, a path, ...), used in reports and fingerprints.
        x_train, y_train, x_test, y_test: inputs (float32 or int64 tokens) and int64 labels.
        num_classes: number of classes; labels lie in ``[0, num_classes)``.
        meta: free-form facts for the report (source, split seed, normalization).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension."""
        return tuple(self.x_train.shape[1:])

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor]:
        """The first ``batch`` test samples, as the tuple a model's forward takes."""
        return (self.x_test[:batch].clone(),)
