"""Low-rank tests run torch on one thread: on a shared 2-core machine two intra-op threads made
this package ~2x slower, and one thread keeps float reductions in a fixed order."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
