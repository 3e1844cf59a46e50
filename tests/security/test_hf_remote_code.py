"""A Hugging Face directory whose config maps to its own Python code (``auto_map``) is refused
without the opt-in, transformers always gets an explicit ``trust_remote_code``, and nothing
ever stops to ask on a terminal. The directories are built in the test (no network); the
custom code, if it ever ran, would create a marker directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimkit.core.errors import ModelLoadError
from slimkit.io.loader import load_model

transformers = pytest.importorskip("transformers")

EVIL = "import os\nos.mkdir({marker!r})\n"


def _bert_dir(tmp_path: Path, auto_map: dict | None, model_type: str = "bert") -> Path:
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    path = tmp_path / "bert"
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    if auto_map is not None:
        cfg["auto_map"] = auto_map
        for module in {v.split(".")[0] for v in auto_map.values()}:
            (path / f"{module}.py").write_text(EVIL.format(marker=str(tmp_path / "ran")))
    cfg["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture
def no_prompt(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every prompt that reached the terminal."""
    prompts: list[str] = []

    def record(prompt: str = "") -> str:
        prompts.append(prompt)
        raise EOFError

    monkeypatch.setattr("builtins.input", record)
    return prompts


AUTO_MAP = {"AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}


def test_custom_code_is_refused_without_the_opt_in(tmp_path: Path, no_prompt: list[str]):
    path = _bert_dir(tmp_path, AUTO_MAP)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    assert str(err.value) == (
        f"'{path}' needs its own Python code (config.json auto_map: AutoConfig, "
        "AutoModelForSequenceClassification); slimkit runs a model's custom code only with an "
        "explicit opt-in (--trust-remote-code, trust_remote_code=True), so pass it only if "
        "you trust the directory's author")
    assert not (tmp_path / "ran").exists() and no_prompt == []


def test_the_cli_refuses_custom_code_in_one_line_and_takes_the_flag(tmp_path: Path, capsys):
    from slimkit.cli import main

    path = _bert_dir(tmp_path, AUTO_MAP)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "needs its own Python code" in err and "--trust-remote-code" in err
    assert not (tmp_path / "ran").exists()
    assert main(["inspect", "--help"]) == 0
    assert "--trust-remote-code" in capsys.readouterr().out


def test_an_unknown_model_type_never_prompts(tmp_path: Path, no_prompt: list[str]):
    # transformers asks on the terminal when trust_remote_code is left unset and it has no
    # built-in class for the model type
    path = _bert_dir(tmp_path, AUTO_MAP, model_type="evil-bert")
    with pytest.raises(ModelLoadError, match="needs its own Python code"):
        load_model(str(path))
    assert not (tmp_path / "ran").exists() and no_prompt == []
    cfg = json.loads((path / "config.json").read_text())
    del cfg["auto_map"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="transformers cannot read its config.json: "):
        load_model(str(path))
    assert no_prompt == []


def test_transformers_always_gets_an_explicit_false(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    path = _bert_dir(tmp_path, None)
    seen: list[object] = []
    for cls in (transformers.AutoConfig, transformers.BertForSequenceClassification):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):  # noqa: ANN001, ANN202
            seen.append(kwargs.get("trust_remote_code", "unset"))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    assert load_model(str(path)).num_classes == 2
    assert seen == [False, False]


def test_the_opt_in_lets_a_mapped_directory_through(tmp_path: Path):
    # auto_map names only a model class: the checkpoint's own built-in class still loads it
    path = _bert_dir(tmp_path, {"AutoModel": "modeling_evil.EvilModel"})
    with pytest.raises(ModelLoadError, match="auto_map: AutoModel"):
        load_model(str(path))
    model = load_model(str(path), trust_remote_code=True)
    assert model.num_classes == 2 and not (tmp_path / "ran").exists()
