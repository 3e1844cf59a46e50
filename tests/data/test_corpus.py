"""The standard-library corpus: deterministic, split by file, lazy, byte-exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimkit.core.errors import ConfigError, DataError
from slimkit.data import corpus as C
from slimkit.data.corpus import ByteTokenizer, list_sources, split_of, stdlib_corpus
from slimkit.measure.tasks import get_task


def _tree(root: Path, n: int = 40, size: int = 300) -> dict[str, bytes]:
    """``n`` fake modules of ``size`` bytes (some in packages), plus files to leave out."""
    files = {}
    for i in range(n):
        rel = f"pkg{i % 3}/mod_{i}.py" if i % 2 else f"mod_{i}.py"
        body = (f"# module {i}\n" + "x = 'é…'\n" * size).encode()[:size]  # may cut a char
        files[rel] = body
    skipped = ["test/test_a.py", "pkg0/tests/b.py", "idlelib/idle_test/c.py",
               "site-packages/d.py", "__pycache__/e.py", "pkg1/test_f.py", "notes.txt"]
    for rel in skipped:
        files[rel] = b"skip = True\n"
    for rel, body in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    return {k: v for k, v in files.items() if k not in skipped}


def _stream(split: C.CorpusSplit) -> bytes:
    """The split's bytes as the batches carry them (padding dropped)."""
    out = bytearray()
    for b in split:
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
            out += ByteTokenizer.to_bytes(ids[mask.bool()])
    return bytes(out)


def test_tokenizer_round_trips_text_and_bytes():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'naïve ∑ 🐍'\n"
    ids = tok.encode(text)
    assert ids.dtype == torch.long and len(ids) == len(text.encode()) and int(ids.max()) < 256
    assert tok.decode(ids) == text
    raw = bytes(range(256))
    assert ByteTokenizer.to_bytes(tok.encode(raw)) == raw
    with pytest.raises(DataError, match="0..255"):
        tok.decode(torch.tensor([256]))


def test_files_are_listed_sorted_without_tests_or_packages(tmp_path):
    kept = _tree(tmp_path)
    assert list_sources(tmp_path) == sorted(kept)


def test_batches_carry_every_file_once_in_order_byte_exact(tmp_path):
    kept = _tree(tmp_path, n=13, size=101)
    data = stdlib_corpus(seq_len=32, batch_size=3, root=tmp_path, val_fraction=0.2,
                         test_fraction=0.2)
    total = 0
    for name in C.SPLITS:
        split = getattr(data, name)
        expect = b"".join(kept[f] + b"\0" for f in split.files)
        assert _stream(split) == expect
        assert len(list(split)) == len(split)
        assert split.token_count() == len(expect)
        total += len(split.files)
    assert total == len(kept) and data.meta["splits"]["train"]["files"] == len(data.train.files)


def test_splits_are_disjoint_by_file_and_deterministic(tmp_path):
    _tree(tmp_path, n=60)
    a = stdlib_corpus(root=tmp_path, val_fraction=0.2, test_fraction=0.2)
    b = stdlib_corpus(root=tmp_path, val_fraction=0.2, test_fraction=0.2)
    sets = [set(getattr(a, s).files) for s in C.SPLITS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(list_sources(tmp_path))
    for s in C.SPLITS:
        assert getattr(a, s).files == getattr(b, s).files
        for x, y in zip(getattr(a, s), getattr(b, s), strict=True):
            assert torch.equal(x["input_ids"], y["input_ids"])
    # the split of a file is a function of its relative path alone (same on every machine)
    assert split_of("json/decoder.py", 0.05, 0.05) == split_of("json/decoder.py", 0.05, 0.05)
    assert {split_of(f"m{i}.py", 0.3, 0.3) for i in range(50)} == set(C.SPLITS)


def test_batches_have_the_causal_lm_structure(tmp_path):
    _tree(tmp_path, n=20, size=250)
    data = stdlib_corpus(seq_len=64, batch_size=4, root=tmp_path, val_fraction=0.2,
                         test_fraction=0.2)
    batches = list(data.train)
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"}
        assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
        assert b["input_ids"].shape[1] == 64 and b["input_ids"].shape == b["attention_mask"].shape
    assert all(len(b["input_ids"]) == 4 for b in batches[:-1])
    last = batches[-1]["attention_mask"][-1]
    assert bool(last[0]) and bool((last[:-1] >= last[1:]).all())  # padding only at the end
    assert bool((batches[-1]["input_ids"][-1][~last.bool()] == 0).all())
    x, y = next(data.batches("val"))
    assert set(x) == {"input_ids", "attention_mask"} and bool((y == 0).all())


def test_reading_is_lazy_one_file_at_a_time(tmp_path, monkeypatch):
    _tree(tmp_path, n=50, size=1000)
    data = stdlib_corpus(seq_len=64, batch_size=2, root=tmp_path, val_fraction=0.1,
                         test_fraction=0.1)
    reads: list[int] = []
    monkeypatch.setattr(C, "read_source", lambda p: reads.append(1) or Path(p).read_bytes())
    it = iter(data.train)
    next(it)
    assert len(reads) == 1  # the first batch needs the first file only
    emitted, peak = 128, 0
    for b in it:
        emitted += int(b["attention_mask"].sum())
        # bytes read but not yet handed out: never more than one file plus one window
        peak = max(peak, 1001 * len(reads) - emitted)
    assert len(reads) == len(data.train.files)
    assert peak <= 1001 + 64


def test_max_bytes_caps_each_split(tmp_path):
    _tree(tmp_path, n=30, size=500)
    data = stdlib_corpus(seq_len=50, batch_size=2, root=tmp_path, val_fraction=0.2,
                         test_fraction=0.2, max_bytes={"train": 777})
    assert len(_stream(data.train)) == 777 and data.meta["splits"]["train"]["bytes"] == 777
    assert data.val.max_bytes is None
    with pytest.raises(ConfigError, match="unknown split 'tran'"):
        stdlib_corpus(root=tmp_path, max_bytes={"tran": 5})


def test_missing_source_is_a_clear_data_error(tmp_path, monkeypatch):
    (tmp_path / "only.pyc").write_bytes(b"\0")
    with pytest.raises(DataError, match="no Python source"):
        stdlib_corpus(root=tmp_path)
    monkeypatch.setattr(C.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path / "gone")})
    with pytest.raises(DataError, match="standard library source was not found"):
        stdlib_corpus()


def test_the_real_stdlib_streams_and_scores_as_causal_lm():
    data = stdlib_corpus(seq_len=32, batch_size=2, max_bytes=2000)
    assert data.task == "causal_lm" and data.meta["splits"]["train"]["files"] > 100
    assert "json/decoder.py" in {f for s in C.SPLITS for f in getattr(data, s).files}
    uniform = torch.nn.Module()
    uniform.forward = lambda input_ids, attention_mask: torch.zeros(*input_ids.shape, 256)
    ppl = get_task("causal_lm").evaluate(uniform, lambda: data.batches("test"))["perplexity"]
    assert ppl == pytest.approx(256.0, rel=1e-6)
