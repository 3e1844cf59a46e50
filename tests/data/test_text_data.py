"""Text files (.jsonl, .csv) tokenized with the model's own tokenizer, streamed batch by batch.

The reference is a second tokenizer written here: the vocabulary is whole lowercase words, so
BERT's WordPiece must give ``[CLS] word ids [SEP]`` (``[UNK]`` for any other word), truncated
to the maximum and padded with ``[PAD]`` to the batch's longest row.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.core.errors import DataError
from slimkit.data import load_data
from slimkit.data.load import DataOptions, ModelHints, model_hints
from slimkit.data.split import split_indices

transformers = pytest.importorskip("transformers")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "good", "bad", "movie", "very", "was",
         "not", "fun"]
VOCAB = SPECIAL + WORDS
MAX_POS = 12


def save_tokenizer(path: Path) -> None:
    """A BERT WordPiece tokenizer over :data:`VOCAB`, saved as ``save_pretrained`` does."""
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})
    tok.save_pretrained(str(path))


def tiny_model(path: Path, cls: str = "BertForSequenceClassification", *, tokenizer: bool = True,
               **config) -> Path:
    """A tiny HF model saved with (or without) its tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if cls == "GPT2LMHeadModel":
        cfg = transformers.GPT2Config(vocab_size=len(VOCAB), n_embd=16, n_layer=1, n_head=2,
                                      n_positions=MAX_POS, **config)
    else:
        cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=MAX_POS,
                                      **config)
    getattr(transformers, cls)(cfg).eval().save_pretrained(str(path))
    if tokenizer:
        save_tokenizer(path)
    return path


def reference(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """What the tokenizer must give, computed from the vocabulary alone."""
    index = {w: i for i, w in enumerate(VOCAB)}
    words = [re.findall(r"\w+|[^\w\s]", t.lower()) for t in texts]  # punctuation apart
    rows = [[2, *[index.get(w, 1) for w in ws][:max_length - 2], 3] for ws in words]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def texts(n: int) -> list[str]:
    """``n`` distinct texts of 1 to 14 words (some longer than MAX_POS - 2 = 10)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        words = rng.choice(WORDS + ["zebra"], size=1 + i % 14).tolist()
        out.append(" ".join([f"{WORDS[i % len(WORDS)]}", *words]).capitalize())
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("m") / "bert", num_labels=3)


def hints_of(model_dir: Path) -> ModelHints:
    from slimkit.io.hf import load_hf_dir

    return model_hints(load_hf_dir(model_dir), str(model_dir))


@pytest.fixture(scope="module")
def bert_hints(bert) -> ModelHints:
    return hints_of(bert)


def flatten(stream, split: str) -> tuple[list[dict], list[torch.Tensor]]:
    xs, ys = [], []
    for x, y in stream.batches(split):
        xs.append(x)
        ys.append(y)
    return xs, ys


def test_jsonl_batches_equal_the_reference_tokenization(tmp_path, bert_hints):
    rows = [{"text": t, "label": i % 3, "id": i} for i, t in enumerate(texts(30))]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_data(str(path), seed=3, hints=bert_hints, options=DataOptions(batch_size=4))
    assert data.streaming and data.task == "classification" and data.num_classes == 3
    labels = torch.tensor([r["label"] for r in rows])
    train, test = split_indices(labels, 0.2, seed=3)
    xs, ys = flatten(data, "test")
    assert [len(y) for y in ys] == [4, 2]  # 6 test rows in batches of 4
    for k, x in enumerate(xs):
        rows_k = test[4 * k:4 * k + 4]
        want = reference([rows[i]["text"] for i in rows_k], MAX_POS)
        assert list(x) == ["input_ids", "attention_mask", "token_type_ids"]
        for name in want:
            assert x[name].dtype == torch.int64
            torch.testing.assert_close(x[name], want[name], rtol=0, atol=0)
        assert ys[k].tolist() == labels[rows_k].tolist()
    # the training split: every training row once, in a fixed shuffled order
    by_ids = {tuple(reference([r["text"]], MAX_POS)["input_ids"][0].tolist()): i
              for i, r in enumerate(rows)}
    seen = [by_ids[tuple(r[m.bool()].tolist())] for x, _ in data.batches("train")
            for r, m in zip(x["input_ids"], x["attention_mask"], strict=True)]
    assert sorted(seen) == train.tolist() and seen != train.tolist()
    again = [x["input_ids"] for x, _ in data.batches("train")]
    assert all(torch.equal(a, b) for a, b in zip(again, [x["input_ids"] for x, _ in
                                                         data.batches("train")], strict=True))
    assert data.meta["n_train"] == 24 and data.meta["n_test"] == 6
    assert data.epoch_batches() == 6


def test_csv_with_quoted_newlines_and_commas_equals_jsonl(tmp_path, bert_hints):
    body = texts(12)
    body[3] = "the cat,\nsat on\n\nthe mat"  # a record over several lines
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "body"])
        for i, t in enumerate(body):
            w.writerow([["pos", "neg"][i % 2], t])
    rows = [{"body": t, "label": ["pos", "neg"][i % 2]} for i, t in enumerate(body)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    opts = DataOptions(text_column="body", batch_size=5)
    a = load_data(str(tmp_path / "d.csv"), hints=bert_hints, options=opts)
    b = load_data(str(tmp_path / "d.jsonl"), hints=bert_hints, options=opts)
    assert a.meta["class_names"] == ["neg", "pos"]  # names not in the model's label2id: sorted
    for split in ("train", "test", "val"):
        for (xa, ya), (xb, yb) in zip(a.batches(split), b.batches(split), strict=True):
            assert torch.equal(ya, yb)
            assert all(torch.equal(xa[k], xb[k]) for k in xa)
    x, _ = a.head("test", 12)
    texts_in = [body[i] for i in split_indices(torch.tensor([i % 2 == 0 for i in
                                                             range(12)]).long(), 0.2, 0)[1]]
    torch.testing.assert_close(x["input_ids"], reference(texts_in, MAX_POS)["input_ids"])


def test_rows_are_read_batch_by_batch(tmp_path, bert_hints, monkeypatch):
    import slimkit.data.text as text

    rows = [{"text": t, "label": i % 2} for i, t in enumerate(texts(40))]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_data(str(path), hints=bert_hints, options=DataOptions(batch_size=4))
    reads: list[int] = []
    real = text.read_rows
    monkeypatch.setattr(text, "read_rows", lambda p, offs: reads.append(len(offs)) or
                        real(p, offs))
    it = data.batches("train")
    assert reads == []  # loading read offsets and labels only
    next(it)
    assert reads == [4]
    next(it)
    assert reads == [4, 4]
    x = data.calibration(6)
    assert x["input_ids"].shape[0] == 6 and reads[2:] == [4, 4]  # reads no further than asked


def test_truncation_is_counted_or_refused(tmp_path, bert_hints):
    rows = [{"text": " ".join(["good"] * n), "label": n % 2} for n in (3, 11, 4, 15, 9, 30)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_data(str(path), hints=bert_hints)
    line = (f"3 of 6 rows of '{path}' are longer than 12 tokens (the model's maximum; the "
            "longest: row 6, 32 tokens), and are truncated to 12; pass --no-truncate to "
            "refuse them")
    assert line in data.meta["warnings"] and data.meta["truncated_rows"] == 3
    x, _ = data.head("test", 6)
    assert x["input_ids"].shape[1] <= 12
    with pytest.raises(DataError) as err:
        load_data(str(path), hints=bert_hints, options=DataOptions(truncate=False))
    assert str(err.value) == (
        f"3 of 6 rows of '{path}' are longer than 12 tokens (the model's maximum; the longest: "
        "row 6, 32 tokens); shorten them, or let slimkit truncate them (drop --no-truncate)")
    short = load_data(str(path), hints=bert_hints, options=DataOptions(max_length=6))
    assert short.meta["truncated_rows"] == 4 and short.meta["max_length"] == 6
    assert "(--max-length;" in short.meta["warnings"][-1]
    with pytest.raises(DataError) as err:
        load_data(str(path), hints=bert_hints, options=DataOptions(max_length=13))
    assert str(err.value) == ("--max-length 13 is more than the model's maximum of 12 tokens; "
                              "give at most 12")


def test_bad_files_get_one_clear_line(tmp_path, bert_hints):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError) as err:
        load_data(str(empty), hints=bert_hints)
    assert str(err.value) == (f"'{empty}' holds no rows; a .jsonl file holds one JSON object "
                              'per line, e.g. {"text": "a sample", "label": 0}')
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    with pytest.raises(DataError, match=r"header.csv' holds no rows; a .csv file holds a "
                                        r"header line"):
        load_data(str(header), hints=bert_hints)
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a cat", "label": 1}] * 3)
    with pytest.raises(DataError) as err:
        load_data(str(path), hints=bert_hints)
    assert str(err.value) == (f"'{path}' has no text column 'text'; its columns are: sentence, "
                              "label. Choose the text column with --text-column")
    with pytest.raises(DataError) as err:
        load_data(str(path), hints=bert_hints,
                  options=DataOptions(text_column="sentence", label_column="stars"))
    assert str(err.value).startswith(f"'{path}' has no label column 'stars'; its columns are")
    later = write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 0}, {"label": 1}])
    with pytest.raises(DataError, match=r"row 2 of '.*l.jsonl' has no 'text' field"):
        load_data(str(later), hints=bert_hints)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "a", "label": 0}\n{"text": "b", \n')
    with pytest.raises(DataError, match=r"row 2 of '.*b.jsonl' is not valid JSON"):
        load_data(str(broken), hints=bert_hints)
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": "x"},
                                               {"text": "b", "label": 3}])
    with pytest.raises(DataError, match=r"mixes class names and numbers \(row 2: 3\)"):
        load_data(str(mixed), hints=bert_hints)
    ragged = tmp_path / "r.csv"
    ragged.write_text("text,label\na cat,1\nthe dog,0,extra\n")
    with pytest.raises(DataError, match="row 2 of .* has 3 fields but the header has 2"):
        load_data(str(ragged), hints=bert_hints)


def test_a_missing_tokenizer_names_the_directory(tmp_path):
    bare = tiny_model(tmp_path / "bare", tokenizer=False, num_labels=2)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a cat", "label": i % 2}
                                              for i in range(4)])
    with pytest.raises(DataError) as err:
        load_data(str(path), hints=hints_of(bare))
    assert str(err.value) == (
        f"the model directory '{bare}' holds no tokenizer (none of tokenizer.json, vocab.txt, "
        "vocab.json, spiece.model, tokenizer.model, sentencepiece.bpe.model), and text data "
        f"'{path}' is tokenized with the model's own tokenizer; save it there with "
        f"tokenizer.save_pretrained('{bare}'), or give token ids (an .npz, or a Hugging Face "
        "dataset with an input_ids column)")
    with pytest.raises(DataError, match=r"hints=model_hints\(model, model_dir\)"):
        load_data(str(path))


def test_the_task_follows_the_model(tmp_path):
    rows = [{"text": t, "label": ["good", "bad"][i % 2]} for i, t in enumerate(texts(10))]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    lm = hints_of(tiny_model(tmp_path / "lm", "GPT2LMHeadModel"))
    data = load_data(str(path), hints=lm)
    assert data.task == "causal_lm" and lm.kind == "causal_lm"
    x, y = next(data.batches("test"))
    assert list(x) == ["input_ids", "attention_mask"] and int(y.abs().sum()) == 0
    with pytest.raises(DataError, match="is a causal language model, which learns from the "
                                        "text itself; drop --label-column"):
        load_data(str(path), hints=lm, options=DataOptions(label_column="label"))
    enc = hints_of(tiny_model(tmp_path / "enc", "BertModel"))
    assert enc.kind == "encoder" and load_data(str(path), hints=enc).task == "embedding"
    # a classifier whose label2id names the classes takes its own order, not the sorted one
    cls = hints_of(tiny_model(tmp_path / "cls", label2id={"good": 0, "bad": 1},
                              id2label={0: "good", 1: "bad"}))
    data = load_data(str(path), hints=cls)
    assert data.meta["class_names"] == ["good", "bad"]
    labels = torch.tensor([i % 2 for i in range(10)])  # good 0, bad 1 (sorted: the reverse)
    _, y = data.head("test", 10)
    assert y.tolist() == labels[split_indices(labels, 0.2, 0)[1]].tolist()
    unlabelled = write_jsonl(tmp_path / "u.jsonl", [{"text": t} for t in texts(6)])
    with pytest.raises(DataError, match=r"is a classifier, but '.*u.jsonl' has no label column "
                                        r"\(label, labels, y; its columns are: text\)"):
        load_data(str(unlabelled), hints=cls)


def test_a_stream_feeds_the_model(tmp_path, bert, bert_hints):
    from slimkit.io.hf import load_hf_dir
    from slimkit.measure import check_fits
    from slimkit.measure.tasks import get_task

    rows = [{"text": t, "label": i % 3} for i, t in enumerate(texts(20))]
    data = load_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), hints=bert_hints)
    model = load_hf_dir(bert)
    check_fits(model, data)
    metrics = get_task(data.task).evaluate(model.module, lambda: data.batches("test"))
    # the reference: the same rows tokenized by hand, in one padded batch
    test = split_indices(torch.tensor([r["label"] for r in rows]), 0.2, 0)[1]
    with torch.inference_mode():
        logits = model.module(**reference([rows[i]["text"] for i in test], MAX_POS)).logits
    top1 = float((logits.argmax(1) == torch.tensor([rows[i]["label"] for i in test])).float()
                 .mean())
    assert metrics["top1"] == pytest.approx(top1)
