"""The in-memory dataset every layer works with."""

from __future__ import annotations

from collections.abc import Iterator
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
        x_val, y_val: a validation split held out of ``x_train`` (every choice is made on
            it, never on the test split), or None: ``val`` is then a fixed 20% of the
            training split (class-stratified, seed 0), which training also sees.
    """

    name: str
    x_train: Any
    y_train: torch.Tensor
    x_test: Any
    y_test: torch.Tensor
    num_classes: int
    meta: dict = field(default_factory=dict)
    task: str = "classification"
    x_val: Any = None
    y_val: torch.Tensor | None = None

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

    @property
    def n_val(self) -> int:
        """Samples in the validation split (held out, or the 20% slice of train)."""
        return len(self._split("val")[1])

    streaming = False

    def batches(self, split: str = "test", batch_size: int | None = 256,
                ) -> Iterator[tuple[Any, torch.Tensor]]:
        """``(inputs, labels)`` batches of ``split`` in order: ``train``, ``test``, or
        ``val``: the held-out ``x_val`` when the bundle has one, else a fixed 20% of the
        training split (class-stratified, seed 0); selections are made on it (never on the
        test split); see also :class:`StreamData`."""
        from slimkit.io.batch import take

        x, y = self._split(split)
        n = len(y)
        step = batch_size or max(n, 1)
        for i in range(0, n, step):
            yield take(x, slice(i, i + step)), y[i:i + step]

    def _split(self, split: str) -> tuple[Any, torch.Tensor]:
        from slimkit.io.batch import take

        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        if split == "val" and self.y_val is not None:
            return self.x_val, self.y_val
        if split == "val":
            from slimkit.data.split import split_indices

            idx = torch.from_numpy(split_indices(self.y_train, 0.2, seed=0)[1])
            return take(self.x_train, idx), self.y_train[idx]
        raise ValueError(f"unknown split '{split}' (train, val or test)")

    def head(self, split: str, n: int) -> tuple[Any, torch.Tensor]:
        """The first ``n`` samples of ``split`` (all when it has fewer)."""
        from slimkit.io.batch import take

        x, y = self._split(split)
        return take(x, slice(0, n)), y[:n]

    def calibration(self, n: int, seed: int = 0) -> Any:
        """A class-stratified, seed-determined subset of ``n`` training inputs."""
        from slimkit.data.split import calibration_subset

        return calibration_subset(self, n, seed)

    def calibration_batch(self, n: int, seed: int = 0) -> tuple[Any, torch.Tensor]:
        """:meth:`calibration`'s samples with their labels (importance scores need both)."""
        from slimkit.data.split import calibration_indices
        from slimkit.io.batch import take

        idx = calibration_indices(self, n, seed)
        return take(self.x_train, idx), self.y_train[idx]

    def fingerprint(self) -> str:
        """A hash of every tensor (what makes a resumable run the same run)."""
        import hashlib

        from slimkit.io.batch import leaves

        h = hashlib.sha256(self.name.encode())
        held = () if self.y_val is None else (self.x_val, self.y_val)
        for t in leaves((self.x_train, self.y_train, self.x_test, self.y_test, *held)):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def example_inputs(self, batch: int = 1) -> tuple | dict:
        """The first ``batch`` validation samples (training samples when the bundle holds no
        validation split) as the model takes them (see ``io.batch.call``): a one-tensor
        tuple, or the data's own tuple or dict of tensors. Never test samples: tracing,
        verifying and timing happen before the test split is read, once, at the end."""
        from slimkit.io.batch import take, tmap

        source = self.x_train if self.y_val is None else self.x_val
        x = tmap(torch.clone, take(source, slice(0, batch)))
        return x if isinstance(x, tuple | dict) else (x,)
