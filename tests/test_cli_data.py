"""The CLI's data: text files tokenized with the model's own tokenizer, image folders fitted to
the model, the data options, and bad data as one line before anything is written (before
torch where the paths alone tell)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slimkit.cli import main

pytest.importorskip("transformers")
from tests.data.test_text_data import texts, tiny_model, write_jsonl  # noqa: E402

RUN = """
import json, sys
from slimkit.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def cli(*args: str, cwd: Path) -> tuple[int, bool, str]:
    """``(exit code, torch imported, stderr)`` of ``slimkit ARGS`` in a fresh interpreter."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)
    assert proc.stdout.strip(), proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["code"], result["torch"], proc.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    tiny_model(root / "bert", num_labels=2)
    tiny_model(root / "bare", tokenizer=False, num_labels=2)
    rows = [{"text": t, "label": ["neg", "pos"][i % 2]} for i, t in enumerate(texts(40))]
    write_jsonl(root / "reviews.jsonl", rows)
    write_jsonl(root / "other.jsonl", [{"review": "a cat", "label": 0}] * 4)
    (root / "empty.csv").write_text("text,label\n")
    (root / "dq.yaml").write_text("stages: [{kind: dynamic_quant}]\n")
    return root


def test_compress_a_tiny_bert_on_a_jsonl_file(work: Path, capsys):
    out = work / "out"
    code = main(["compress", str(work / "bert"), "--data", str(work / "reviews.jsonl"),
                 "--recipe", str(work / "dq.yaml"), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code in (0, 3), captured.err
    # rows of up to 15 words are longer than the model's 12 positions: counted, truncated
    assert "rows of '" in captured.err and "are truncated to 12" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["task"] == "classification" and report["data"]["streaming"]
    assert (out / "model.onnx").is_file() and (out / "model").is_dir()


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "other.jsonl"],
     "'other.jsonl' has no text column 'text'; its columns are: review, label. Choose the text "
     "column with --text-column"),
    (["--data", "reviews.jsonl", "--text-column", "body"],
     "'reviews.jsonl' has no text column 'body'; its columns are: text, label."),
    (["--data", "empty.csv"],
     "'empty.csv' holds no rows; a .csv file holds a header line naming its columns (e.g. "
     "text,label) and one row per sample"),
    (["--data", "reviews.jsonl", "--image-size", "32"],
     "--image-size applies to an image folder, but 'reviews.jsonl' is a text file; drop the "
     "option"),
    (["--data", "builtin:digits", "--no-truncate"],
     "--no-truncate applies to text data (a .jsonl or .csv file, or a Hugging Face dataset's "
     "text column), but 'builtin:digits' is a built-in dataset; drop the option"),
])
def test_bad_text_data_is_one_line_before_torch(work: Path, args: list[str], message: str):
    code, torch_loaded, err = cli("compress", "bert", *args, "--recipe", "dq.yaml", "--out",
                                  "never", cwd=work)
    assert code == 2 and not torch_loaded
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (work / "never").exists()


def test_a_missing_tokenizer_is_one_line_before_torch(work: Path):
    code, torch_loaded, err = cli("compress", "bare", "--data", "reviews.jsonl", "--recipe",
                                  "dq.yaml", "--out", "never", cwd=work)
    assert code == 2 and not torch_loaded and not (work / "never").exists()
    assert err == (
        "error: the model directory 'bare' holds no tokenizer (none of tokenizer.json, "
        "vocab.txt, vocab.json, spiece.model, tokenizer.model, sentencepiece.bpe.model), and "
        "text data 'reviews.jsonl' is tokenized with the model's own tokenizer; save it there "
        "with tokenizer.save_pretrained('bare'), or give token ids (an .npz, or a Hugging Face "
        "dataset with an input_ids column)\n")
    code, torch_loaded, err = cli("eval", "zoo:lenet5", "--data", "reviews.jsonl", cwd=work)
    assert code == 2 and not torch_loaded
    assert err.startswith("error: text data 'reviews.jsonl' is tokenized with the model's own "
                          "tokenizer, and 'zoo:lenet5' is not a model directory")


def test_rows_over_the_maximum_are_refused_with_no_truncate(work: Path, capsys):
    out = work / "refused"
    code = main(["compress", str(work / "bert"), "--data", str(work / "reviews.jsonl"),
                 "--recipe", str(work / "dq.yaml"), "--out", str(out), "--no-truncate"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and not out.exists()
    assert len(lines) == 1 and lines[0].startswith("error: ") and (
        "rows of '" in lines[0] and "are longer than 12 tokens (the model's maximum; the "
        "longest: row " in lines[0] and "(drop --no-truncate)" in lines[0])
    code = main(["eval", str(work / "bert"), "--data", str(work / "reviews.jsonl"),
                 "--max-length", "40"])
    assert code == 2
    assert "error: --max-length 40 is more than the model's maximum of 12 tokens" in \
        capsys.readouterr().err


def test_eval_streams_text_and_image_folders(work: Path, capsys):
    code = main(["eval", str(work / "bert"), "--data", str(work / "reviews.jsonl"),
                 "--max-length", "8", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["n_test"] == 8 and 0 <= result["top1"] <= 1
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (work / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            size = (20 + i, 16 + 2 * i)  # sizes differ: each is resized and cropped
            image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                work / "imgs" / c / f"{i}.png")
    # a zoo model is fitted to the folder in memory, each image resized and cropped
    code = main(["eval", "zoo:lenet5", "--data", str(work / "imgs"), "--image-size", "28",
                 "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["n_test"] == 2
    # an HF vision model takes the folder streamed, at its own size, as pixel_values
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, num_labels=2)
    transformers.ViTForImageClassification(cfg).save_pretrained(str(work / "vit"))
    code = main(["inspect", str(work / "vit"), "--data", str(work / "imgs"), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["input_shape"] == [3, 8, 8]
    code = main(["eval", str(work / "vit"), "--data", str(work / "imgs"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["n_test"] == 2 and 0 <= result["top1"] <= 1


def test_help_documents_the_data_options(capsys):
    assert main(["compress", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--text-column", "--label-column", "--max-length", "--no-truncate",
                   "--image-size", ".jsonl/.csv"):
        assert option in text
