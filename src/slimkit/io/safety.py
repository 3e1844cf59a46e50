"""Guards that keep slimkit from unpickling a user's file without an explicit opt-in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from slimkit.core.errors import UntrustedPickleError


@contextlib.contextmanager
def no_pickle(source: str, trust_pickle: bool) -> Iterator[None]:
    """Within the block, any ``torch.load`` that would unpickle arbitrary objects is refused.

    ``torch.export.load`` silently retries with ``weights_only=False`` when a restricted load
    fails; this guard turns that retry into a clear error unless the user opted in.
    """
    if trust_pickle:
        yield
        return
    original = torch.load

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("weights_only") is False:
            raise UntrustedPickleError(
                f"'{source}' holds pickled Python objects; loading it could run arbitrary code. "
                "Pass --trust-pickle (trust_pickle=True) only if you trust its author."
            )
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original
