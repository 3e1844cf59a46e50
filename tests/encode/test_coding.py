"""Canonical Huffman, ANS, stream selection and relative offsets with fillers."""

from fractions import Fraction

import numpy as np
import pytest

from slimkit.encode.huffman import (
    MAX_LEN,
    canonical_codes,
    code_lengths,
    huffman_decode,
    huffman_encode,
)
from slimkit.encode.sparse import from_relative, to_relative
from slimkit.encode.streams import (
    ans_decode,
    ans_encode,
    ans_frequencies,
    decode_stream,
    encode_stream,
    entropy_bits,
    read_table,
    read_varints,
    write_table,
    write_varints,
)


def _symbols(seed: int, n: int = 4000, alphabet: int = 33) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(alphabet, 0.4))
    return rng.choice(alphabet, size=n, p=p)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_huffman_round_trip_kraft_and_entropy(seed):
    s = _symbols(seed)
    counts = np.bincount(s)
    lengths = code_lengths(counts)
    data = huffman_encode(s, lengths)
    np.testing.assert_array_equal(huffman_decode(data, lengths, len(s)), s)
    # A Huffman tree is full: Kraft's sum over the used symbols is exactly 1.
    assert sum(Fraction(1, 2 ** int(lengths[i])) for i in np.flatnonzero(counts)) == 1
    assert np.all(lengths[counts == 0] == 0)
    # Average code length lies in [H, H + 1).
    h = entropy_bits(s) / len(s)
    avg = float((counts * lengths).sum()) / len(s)
    assert h <= avg < h + 1
    assert len(data) == -(-int((counts * lengths).sum()) // 8)


def test_canonical_codes_are_prefix_free_and_ordered():
    lengths = np.array([2, 0, 3, 3, 2, 2])
    codes = canonical_codes(lengths)
    words = {f"{codes[i]:0{lengths[i]}b}" for i in np.flatnonzero(lengths)}
    assert words == {"00", "01", "10", "110", "111"}
    assert not any(a != b and b.startswith(a) for a in words for b in words)


def test_code_lengths_are_limited_and_stay_complete():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)  # unlimited Huffman would need codes of 39 bits
    assert code_lengths(counts, max_len=64).max() == 39
    lengths = code_lengths(counts)
    assert lengths.max() <= MAX_LEN
    assert sum(Fraction(1, 2 ** int(v)) for v in lengths) == 1
    s = np.repeat(np.arange(40), 1)
    np.testing.assert_array_equal(huffman_decode(huffman_encode(s, lengths), lengths, 40), s)


def test_single_and_empty_streams():
    assert code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0]
    for coder in ("huffman", "ans", "auto"):
        for symbol in (0, 3):
            used, data = encode_stream(np.full(50, symbol), coder)
            np.testing.assert_array_equal(decode_stream(data, used, 50), np.full(50, symbol))
    assert encode_stream(np.zeros(0, dtype=np.int64)) == ("none", b"")
    assert decode_stream(b"", "none", 0).size == 0


@pytest.mark.parametrize("seed", [0, 3])
def test_ans_round_trip_close_to_entropy(seed):
    s = _symbols(seed, n=20000)
    freqs = ans_frequencies(np.bincount(s))
    assert freqs.sum() <= 2**14 + len(freqs) and np.all((freqs > 0) == (np.bincount(s) > 0))
    data = ans_encode(s, freqs)
    np.testing.assert_array_equal(ans_decode(data, freqs, len(s)), s)
    # Quantized frequencies and the final state cost a little over the entropy.
    assert 8 * len(data) < 1.01 * entropy_bits(s) + 64


def test_encode_stream_auto_picks_the_smaller_coder():
    for seed in range(3):
        s = _symbols(seed, n=3000)
        sizes = {c: len(encode_stream(s, c)[1]) for c in ("huffman", "ans")}
        used, data = encode_stream(s, "auto")
        assert len(data) == min(sizes.values()) and sizes[used] == len(data)
        np.testing.assert_array_equal(decode_stream(data, used, len(s)), s)
    with pytest.raises(ValueError, match="unknown stream coder"):
        decode_stream(encode_stream(s, "ans")[1], "zstd", len(s))


def test_varints_round_trip_and_truncation():
    values = [0, 1, 127, 128, 300, 2**14, 2**40]
    data = write_varints(values)
    assert read_varints(data, len(values)) == (values, len(data))
    with pytest.raises(ValueError, match="truncated"):
        read_varints(data[:-1], len(values))


@pytest.mark.parametrize("entries", [[3, 0, 15, 1, 0, 0], [3, 0, 16, 1], [0, 0], [7], [200, 5]])
def test_tables_trim_trailing_zeros_and_use_nibbles_when_small(entries):
    data = write_table(np.array(entries))
    trimmed = np.trim_zeros(np.array(entries), "b")
    values, end = read_table(data + b"tail")
    np.testing.assert_array_equal(values, trimmed)
    assert end == len(data)
    if trimmed.size and trimmed.max() < 16:
        assert len(data) == 1 + (len(trimmed) + 1) // 2


def test_relative_offsets_with_fillers_example():
    offsets, filler = to_relative(np.array([2, 40]), index_bits=5)
    assert offsets.tolist() == [2, 31, 5] and filler.tolist() == [False, True, False]
    assert from_relative(offsets, filler).tolist() == [2, 40]


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_relative_offsets_round_trip_with_long_gaps(bits):
    rng = np.random.default_rng(bits)
    gaps = rng.geometric(0.02, size=500)  # many gaps longer than 2^bits
    gaps[::50] = 3 * 2**bits + 7
    positions = np.cumsum(gaps) - 1
    offsets, filler = to_relative(positions, bits)
    assert offsets.min() >= 0 and offsets.max() < 2**bits
    assert int(filler.sum()) == int(((gaps - 1) // 2**bits).sum()) > 0
    np.testing.assert_array_equal(from_relative(offsets, filler), positions)
    with pytest.raises(ValueError, match="ascending"):
        to_relative(np.array([3, 3]), bits)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_codebook_round_trip_is_exact_and_compact(dtype):
    from slimkit.encode.codec import read_codebook, write_codebook

    rng = np.random.default_rng(0)
    values = np.unique(np.concatenate([-np.abs(rng.normal(0, 0.1, 100)),
                                       np.abs(rng.normal(0, 0.1, 100)), [65504.0, -3e-8]]))
    values = values.astype(np.float16).astype(np.float32) if dtype == "float16" else values
    values = np.unique(values.astype(np.float32))
    used, data = write_codebook(values, dtype)
    assert used == dtype
    decoded, end = read_codebook(data + b"x", len(values), dtype)
    assert end == len(data)
    np.testing.assert_array_equal(decoded.view(np.uint32), values.view(np.uint32))
    assert len(data) < len(values) * (2 if dtype == "float16" else 4)
    # values that float16 cannot hold exactly fall back to float32
    assert write_codebook(np.array([0.1, 0.2], dtype=np.float32), "float16")[0] == "float32"
