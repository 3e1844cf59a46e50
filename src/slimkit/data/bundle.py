"""The in-memory dataset every layer works with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DataBundle:
    """A labelled dataset split into train and test, held as tensors.

    Attributes:
        name: where it came from (``builtin:mnist``, a path, ...), used in reports and fingerprints.
        x_train, y_train, x_test, y_test: inputs and int64 labels. Inputs are a tensor
            (float32, or int64 tokens), or a tuple or dict of tensors for models that take
            several (``input_ids`` and ``attention_mask``), all with the sample first; see
            :mod:`slimkit.io.batch`.
        num_classes: number of classes; labels lie in ``[0, num_classes)`` (0 when the task
            has no classes).
        task: what the model is for (:mod:`slimkit.measure.tasks`): ``classification``,
            ``regression`` (float targets in ``y``), ``causal_lm`` or ``embedding`` (no
            labels: ``y`` holds zeros).
        meta: free-form facts for the report (source, split seed, normalization).
    """

    name: str
    x_train: Any
    y_train: torch.Tensor
    x_test: Any
    y_test: torch.Tensor
    num_classes: int
    meta: dict = field(default_factory=dict)
    task: str = "classification"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample (its first input's, for several), without the batch axis."""
        from slimkit.io.batch import leaves

        return tuple(leaves(self.x_train)[0].shape[1:])

    @property
    def n_train(self) -> int:
        from slimkit.io.batch import size

        return size(self.x_train)

    @property
    def n_test(self) -> int:
        from slimkit.io.batch import size

        return size(self.x_test)

    def example_inputs(self, batch: int = 1) -> tuple | dict:
        """The first ``batch`` test samples as the model takes them (see ``io.batch.call``):
        a one-tensor tuple, or the data's own tuple or dict of tensors."""
        from slimkit.io.batch import take, tmap

        x = tmap(torch.clone, take(self.x_test, slice(0, batch)))
        return x if isinstance(x, tuple | dict) else (x,)
