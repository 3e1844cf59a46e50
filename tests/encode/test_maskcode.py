import numpy as np
import pytest
import torch

from slimkit.encode.codec import decode_raw, decode_shared, encode_raw, encode_shared
from slimkit.encode.maskcode import decode_mask, encode_mask, mask_bound, mask_cost


def _structured_mask(rows: int, cols: int, seed: int) -> np.ndarray:
    """Columns with their own keep rate (some dead), like pruned inputs of a first layer."""
    rng = np.random.default_rng(seed)
    rate = rng.choice([0.0, 0.02, 0.1, 0.3], size=cols)
    return rng.random((rows, cols)) < rate


@pytest.mark.parametrize("shape", [(40, 96), (12, 3, 5, 5), (7, 1)])
def test_mask_round_trip_is_exact_and_near_the_model_bound(shape):
    numel = int(np.prod(shape))
    mask = _structured_mask(shape[0], numel // shape[0], seed=numel).ravel()
    mask[0] = True
    data, params = encode_mask(mask, list(shape))
    back = decode_mask(data, list(shape), int(mask.sum()), params)
    np.testing.assert_array_equal(back, mask)
    bound = mask_bound(mask, list(shape), params)
    assert 8 * len(data) <= bound + 64  # ANS: within two 32-bit words of the ideal length


def test_cost_matches_a_direct_sequential_computation():
    mask = _structured_mask(6, 5, seed=1)
    p, alpha = mask.mean(), 4.0
    bits = 0.0
    for r in range(6):
        for c in range(5):
            q = (mask[:r, c].sum() + alpha * p) / (r + alpha)
            bits -= np.log2(q if mask[r, c] else 1 - q)
    assert mask_cost(mask, alpha, p) == pytest.approx(bits, rel=1e-12)


def test_column_structure_beats_relative_offsets_and_auto_picks_it():
    torch.manual_seed(0)
    mask = torch.from_numpy(_structured_mask(100, 300, seed=3))
    w = torch.where(mask, torch.randint(1, 5, mask.shape).float() / 4, torch.zeros(()))
    sizes = {}
    for mode in ("offsets", "mask", "auto"):
        payload, meta, _ = encode_shared(w, 5, "auto", "float32", mode)
        torch.testing.assert_close(decode_shared(payload, meta), w, rtol=0, atol=0)
        sizes[mode] = (len(payload), meta["positions_mode"])
    assert sizes["mask"][0] < sizes["offsets"][0]
    assert sizes["auto"] == sizes["mask"]
    # Huffman-only coding never switches to the (ANS) mask model
    _, meta, _ = encode_shared(w, 5, "huffman", "float32", "auto")
    assert meta["positions_mode"] == "offsets"


def test_damaged_mask_is_refused():
    mask = _structured_mask(20, 30, seed=5).ravel()
    data, params = encode_mask(mask, [20, 30])
    with pytest.raises(ValueError, match="expected"):
        decode_mask(data, [20, 30], int(mask.sum()) + 1, params)
    with pytest.raises(ValueError, match="alpha"):
        decode_mask(data, [20, 30], int(mask.sum()), {"transpose": False, "alpha": 3.0})


def test_raw_float32_stored_as_float16_only_when_exact():
    exact = torch.tensor([0.5, -1.25, 3.0, 0.0])
    data, meta = encode_raw(exact)
    assert meta["stored"] == "float16" and len(data) == 8
    out = decode_raw(data, meta)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exact, rtol=0, atol=0)
    inexact = torch.tensor([0.1, 2.0])
    data, meta = encode_raw(inexact)
    assert "stored" not in meta and len(data) == 8
    torch.testing.assert_close(decode_raw(data, meta), inexact, rtol=0, atol=0)
