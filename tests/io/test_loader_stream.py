"""zoo:NAME fitted to streamed data: shape, classes and dtype from the stream's first batch."""

from __future__ import annotations

import pytest
import torch

from slimkit.core.errors import DataError
from slimkit.data.stream import StreamData
from slimkit.io.loader import load_model


def _stream(x: torch.Tensor, y: torch.Tensor, **kw) -> StreamData:
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, len(x), 4)]
    return StreamData("s", train=batches, test=batches, num_classes=int(y.max()) + 1, **kw)


def test_a_zoo_model_fits_a_stream_of_images():
    x, y = torch.randn(16, 1, 12, 12), torch.arange(16) % 3
    model = load_model("zoo:lenet5", data=_stream(x, y))
    assert model.input_shape == (1, 12, 12) and model.num_classes == 3
    assert model.module(x[:2]).shape == (2, 3)


def test_streamed_token_ids_take_the_vocabulary_the_stream_states():
    x, y = torch.randint(0, 50, (16, 10)), torch.arange(16) % 2
    model = load_model("zoo:text_encoder", data=_stream(x, y, meta={"vocab_size": 64}))
    assert model.input_dtype == "int64"
    assert model.module(x[:2]).shape == (2, 2)
    emb = next(m for m in model.module.modules() if isinstance(m, torch.nn.Embedding))
    assert emb.num_embeddings == 64
    with pytest.raises(DataError, match="'s' streams token ids without saying how many"):
        load_model("zoo:text_encoder", data=_stream(x, y))
