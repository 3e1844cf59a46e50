"""The test split out of a stage's reach: every choice is made on train and validation data.

A compression stage chooses things (densities, thresholds, bit widths, checkpoints); if it
could read the test split, the accuracy reported on that split would be optimistic. The
runner hands stages :func:`hide_test` of the data: the same dataset (a DataBundle or a
StreamData, so type checks hold) whose test split raises :class:`TestSplitError` when read.
The runner itself reads the test split once, after the last stage.

Example:
    >>> view = hide_test(load_data("builtin:digits"))  # doctest: +SKIP
    >>> next(view.batches("test"))  # doctest: +SKIP
    Traceback (most recent call last):
    TestSplitError: a stage cannot read the test split of 'builtin:digits' ...
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any, NoReturn

import torch

from slimkit.core.errors import DataError
from slimkit.data.bundle import DataBundle
from slimkit.data.stream import StreamData


class TestSplitError(DataError):
    """A stage tried to read the test split, which only the runner reads, at the end."""

    __test__ = False  # not a pytest test class, whatever its name


def hidden_test_message(name: str) -> str:
    """The one error line for a stage reading the test split of the dataset ``name``."""
    return (f"a stage cannot read the test split of '{name}': make choices on the validation "
            "split (data.batches('val'), data.head('val', n)); the runner evaluates the test "
            "split once, after the last stage")


class _Hidden:
    """What a stage's view holds instead of test tensors: any use raises the error."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def _refuse(self, *_: Any, **__: Any) -> NoReturn:
        raise TestSplitError(hidden_test_message(object.__getattribute__(self, "_name")))

    def __getattr__(self, attr: str) -> NoReturn:
        if attr.startswith("__"):  # protocol probes (copy, pickle) are not reads
            raise AttributeError(attr)
        self._refuse()

    __getitem__ = __len__ = __iter__ = __array__ = __call__ = _refuse
    __bool__ = __float__ = __int__ = _refuse

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> NoReturn:
        from torch.utils._pytree import tree_leaves

        hidden = [a for a in tree_leaves((args, kwargs or {})) if isinstance(a, _Hidden)]
        raise TestSplitError(hidden_test_message(
            object.__getattribute__(hidden[0], "_name") if hidden else "the data"))


def hides_test(data: Any) -> bool:
    """True when ``data`` is a stage's view (:func:`hide_test`): its test split is not
    readable, so a stage records what it measures on the validation split instead."""
    return bool(getattr(data, "test_hidden", False))


def record_split(data: Any) -> str:
    """The split a stage evaluates what it records on: ``val`` in a stage's view, ``test``
    for data a user hands a technique directly."""
    return "val" if hides_test(data) else "test"


@dataclass
class _StageBundle(DataBundle):
    """A DataBundle without its test split (see the module docstring)."""

    test_hidden = True

    def _split(self, split: str) -> tuple[Any, torch.Tensor]:
        if split == "test":
            raise TestSplitError(hidden_test_message(self.name))
        return super()._split(split)

    @property
    def n_test(self) -> int:  # a count reads no sample
        return self._full.n_test


    def fingerprint(self) -> str:  # the run's identity is the whole dataset's
        return self._full.fingerprint()


class _StageStream(StreamData):
    """A StreamData without its test stream (see the module docstring)."""

    test_hidden = True

    def _source(self, split: str) -> Any:
        if split == "test":
            raise TestSplitError(hidden_test_message(self.name))
        return super()._source(split)



def hide_test(data: Any) -> Any:
    """A stage's view of ``data``: the same dataset with its test split unreadable.

    Reading it (``batches("test")``, ``head("test", n)``, ``x_test``, ``y_test``, a
    stream's ``test`` source) raises :class:`TestSplitError`. Training and validation data
    are shared, not copied.

    Args:
        data: a DataBundle, a StreamData, an already hidden view (returned as is), or None.

    Returns:
        The view, or ``data`` unchanged when it is None or of another type (a plain
        calibration tensor has no test split).
    """
    if data is None or hides_test(data):
        return data
    if isinstance(data, DataBundle):
        kept = {f.name: getattr(data, f.name) for f in fields(DataBundle)}
        view = _StageBundle(**{**kept, "x_test": _Hidden(data.name),
                               "y_test": _Hidden(data.name)})
        view._full = data
        return view
    if isinstance(data, StreamData):
        view = copy.copy(data)
        view.__class__ = _StageStream
        view.test = _Hidden(data.name)
        return view
    return data
