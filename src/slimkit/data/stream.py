"""Streaming data: batches from any iterable, never all in memory.

:class:`StreamData` holds *sources* of batches: a ``torch.utils.data.DataLoader``, an
``IterableDataset`` wrapped in one, a list, or a function returning a fresh iterable (a
generator function). Each batch is ``(inputs, labels)``, a dict with a ``labels`` key (the
Hugging Face convention), or bare inputs (for tasks without labels: language models,
encoders); inputs are a tensor, a tuple or a dict of tensors (:mod:`slimkit.io.batch`).

Everything slimkit does with data goes through the methods both :class:`StreamData` and the
in-memory :class:`~slimkit.data.bundle.DataBundle` have: ``batches(split)``,
``calibration(n)``, ``head(split, n)``, ``example_inputs(b)``. Memory is bounded by the batch
size and by the calibration/selection subsets a stage asks for, whatever the stream's length.

Example:
    >>> data = StreamData("corpus", train=loader, test=test_loader, task="causal_lm")
    >>> slimkit.compress(model, data, "recipe.yaml", "out/")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from slimkit.core.errors import ConfigError, DataError
from slimkit.io import batch as B

Source = Iterable | Callable[[], Iterable]


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` of one batch as a source yields it.

    A pair ``(inputs, labels)`` (inputs: a tensor, tuple or dict); a dict, whose ``labels``
    (or ``label``) key holds the labels and the rest the named inputs; a 1-tuple ``(inputs,)``
    or a bare tensor, without labels. A model taking several positional inputs gets them as
    ``((a, b), labels)``.
    """
    if isinstance(batch, Mapping):
        rest = {k: v for k, v in batch.items() if k not in ("labels", "label")}
        return rest, batch.get("labels", batch.get("label"))
    if isinstance(batch, list | tuple):
        if len(batch) == 2:
            x = tuple(batch[0]) if isinstance(batch[0], list) else batch[0]
            return x, batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise DataError(f"a batch must be (inputs, labels), (inputs,), a dict or a tensor; "
                        f"got a {type(batch).__name__} of {len(batch)} items")
    return batch, None


class _OneShot:
    """A one-shot iterator (a generator object): one pass, then a clear error."""

    def __init__(self, it: Iterator, what: str) -> None:
        self.it, self.what, self.used = it, what, False

    def __iter__(self) -> Iterator:
        if self.used:
            raise DataError(f"{self.what} is a one-shot iterator (a generator object) and was "
                            "read already; give a function returning a fresh one, a list or a "
                            "DataLoader")
        self.used = True
        return iter(self.it)


@dataclass
class StreamData:
    """A dataset as sources of batches (see the module docstring).

    Attributes:
        name: for reports and fingerprints.
        train, test: sources of batches; ``val`` (optional) is where choices (early stopping,
            mixed-precision fallbacks, checkpoints) are made when given, else the first
            ``holdout`` batches of ``train`` are held out of training for them.
        task: :mod:`slimkit.measure.tasks` name.
        num_classes: for classification.
        holdout: batches of ``train`` held out as the validation split when ``val`` is None.
        length: batches per training epoch, when the source cannot say (``len``); without
            either, training needs ``max_steps``.
    """

    name: str
    train: Source
    test: Source
    val: Source | None = None
    task: str = "classification"
    num_classes: int = 0
    holdout: int = 1
    length: int | None = None
    meta: dict = field(default_factory=dict)
    streaming = True

    def __post_init__(self) -> None:
        for role in ("train", "test", "val"):
            src = getattr(self, role)
            if src is None:
                continue
            if not (callable(src) or isinstance(src, Iterable)):
                raise ConfigError(f"StreamData {role}: give an iterable of batches or a "
                                  f"function returning one, not {type(src).__name__}")
            if isinstance(src, Iterator):
                setattr(self, role, _OneShot(src, f"the {role} stream of '{self.name}'"))
        self._first: dict[str, tuple] = {}

    # -- iteration ------------------------------------------------------------------------

    def _source(self, split: str) -> Iterable:
        if split == "val" and self.val is None:
            return self._holdout()
        src = getattr(self, split)
        if src is None:
            raise DataError(f"'{self.name}' has no {split} stream")
        return src() if callable(src) and not isinstance(src, Iterable) else src

    def _holdout(self) -> Iterable:
        def gen() -> Iterator:
            for i, b in enumerate(self._source("train")):
                if i >= self.holdout:
                    return
                yield b
        return gen()

    def batches(self, split: str = "test", batch_size: int | None = None,
                ) -> Iterator[tuple[Any, torch.Tensor]]:
        """``(inputs, labels)`` batches of ``split`` (``train`` skips the held-out batches
        when there is no ``val`` stream); labels are zeros for label-free batches.

        Raises:
            DataError: the stream yields nothing, or a batch whose structure (input names,
                per-sample shapes apart from the sequence length, dtypes) differs from the
                first one's (naming the batch index).
        """
        skip = self.holdout if split == "train" and self.val is None else 0
        first = None
        n = 0
        for i, raw in enumerate(self._source(split)):
            if i < skip:
                continue
            x, y = split_batch(raw)
            if not B.leaves(x):
                raise DataError(f"'{self.name}' {split} batch {i} holds no tensor")
            rows = B.size(x)
            sig = _signature(x)
            if first is None:
                first = sig
                self._first.setdefault(split, sig)
            elif sig != first:
                raise DataError(f"'{self.name}' {split} batch {i} has inputs {_show(sig)}, "
                                f"the first batch {_show(first)}; every batch must have one "
                                "structure")
            if y is None:
                y = torch.zeros(rows, dtype=torch.long)
            n += 1
            yield from _rebatch(x, y, batch_size)
        if n == 0:
            raise DataError(f"the {split} stream of '{self.name}' yielded no batch")

    def head(self, split: str, n: int) -> tuple[Any, torch.Tensor]:
        """The first ``n`` samples of ``split`` (fewer if it ends sooner), as one batch."""
        xs, ys, got = [], [], 0
        for x, y in self.batches(split):
            xs.append(x)
            ys.append(y)
            got += B.size(x)
            if got >= n:
                break
        return B.take(B.cat(xs), slice(0, n)), torch.cat(ys)[:n]

    def calibration(self, n: int, seed: int = 0) -> Any:
        """``n`` training inputs for calibration: the stream's first ``n`` (a stream is read
        in its own order, which should be shuffled); fewer when it ends sooner."""
        from slimkit.data.split import MIN_CALIBRATION_SAMPLES

        x, _ = self.head("train", n)
        if B.size(x) < min(n, MIN_CALIBRATION_SAMPLES):
            raise DataError(f"cannot calibrate on '{self.name}': its train stream ended after "
                            f"{B.size(x)} sample(s); give at least {MIN_CALIBRATION_SAMPLES}")
        return x

    def calibration_batch(self, n: int, seed: int = 0) -> tuple[Any, torch.Tensor]:
        """:meth:`calibration`'s samples with their labels."""
        x = self.calibration(n, seed)
        return x, self.head("train", B.size(x))[1]

    def example_inputs(self, batch: int = 1) -> tuple | dict:
        """The first ``batch`` validation inputs (never test ones: the test split is read
        once, at the end)."""
        x, _ = self.head("val", batch)
        x = B.tmap(torch.clone, x)
        return x if isinstance(x, tuple | dict) else (x,)

    # -- facts ----------------------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(B.leaves(self.example_inputs(1))[0].shape[1:])

    @property
    def n_train(self) -> int | None:
        return _length(self.train) if self.val is not None else None

    @property
    def n_test(self) -> int | None:
        return None

    def epoch_batches(self) -> int | None:
        """Training batches per epoch, when known."""
        if self.length is not None:
            return self.length
        n = _length(self.train)
        return None if n is None else n - (self.holdout if self.val is None else 0)

    def fingerprint(self) -> str:
        """What identifies the stream for resuming: its name and its first training batches'
        bytes (the test split is left unread until the end)."""
        h = hashlib.sha256(self.name.encode())
        x, y = self.head("train", 8)
        for t in [*B.leaves(x), y]:
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def _length(src: Any) -> int | None:
    try:
        return len(src)
    except TypeError:
        return None


def _signature(x: Any) -> tuple:
    # The per-sample shape without the sequence axis: padded batches vary in length.
    return tuple((n, t.dim(), t.dtype, tuple(t.shape[2:]) if t.dim() > 2 and not
                  t.is_floating_point() else tuple(t.shape[1:]) if t.is_floating_point()
                  else ()) for n, t in zip(B.names(x), B.leaves(x), strict=True))


def _show(sig: tuple) -> str:
    return ", ".join(f"{n} {str(d).removeprefix('torch.')} {k}-d" for n, k, d, _ in sig)


def _rebatch(x: Any, y: torch.Tensor, batch_size: int | None,
             ) -> Iterator[tuple[Any, torch.Tensor]]:
    n = B.size(x)
    if batch_size is None or n <= batch_size:
        yield x, y
        return
    for i in range(0, n, batch_size):
        s = slice(i, i + batch_size)
        yield B.take(x, s), y[s]
