from pathlib import Path

import pytest
import torch

from slimkit.core.errors import ModelLoadError
from slimkit.io.weights import load_weights, save_weights


def test_sparse_and_dense_round_trip_exactly(tmp_path: Path):
    gen = torch.Generator().manual_seed(0)
    sparse = torch.randn(64, 50, generator=gen)
    sparse[torch.rand(64, 50, generator=gen) < 0.9] = 0
    state = {"a.weight": sparse, "a.bias": torch.randn(64, generator=gen),
             "steps": torch.tensor(7), "dense": torch.randn(30, 30, generator=gen)}
    save_weights(state, tmp_path / "w.safetensors")
    back = load_weights(tmp_path / "w.safetensors")
    assert back.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=0, atol=0)


def test_sparse_storage_really_shrinks_the_file(tmp_path: Path):
    w = torch.randn(256, 256)
    save_weights({"w": w}, tmp_path / "dense.safetensors")
    w[torch.rand_like(w) < 0.9] = 0
    save_weights({"w": w}, tmp_path / "sparse.safetensors")
    dense = (tmp_path / "dense.safetensors").stat().st_size
    sparse = (tmp_path / "sparse.safetensors").stat().st_size
    # 1 bit mask + 32 bits per kept value: 32 / (1 + 0.1 * 32) = 7.6x at best
    assert dense / sparse > 6.5


def test_truncated_file_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "w.safetensors"
    save_weights({"w": torch.randn(100, 100)}, path)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(ModelLoadError, match="w.safetensors.*truncated or corrupted"):
        load_weights(path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")
