"""Hugging Face model directories, loaded offline (needs the ``hf`` extra)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimkit.core.errors import ModelLoadError, UntrustedPickleError
from slimkit.io.model import SlimModel


class HFLogits(nn.Module):
    """Wraps a transformers model so that forward takes one tensor and returns one tensor."""

    def __init__(self, model: nn.Module, input_name: str) -> None:
        super().__init__()
        self.model = model
        self.input_name = input_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(**{self.input_name: x})
        return out.logits if getattr(out, "logits", None) is not None else out[0]


def custom_code(path: Path) -> list[str]:
    """The custom classes a model directory's ``config.json`` maps to its own Python files
    (``auto_map``); empty when it uses transformers' built-in classes only.

    Raises:
        ModelLoadError: ``config.json`` is not a JSON object.
    """
    cpath = path / "config.json"
    try:
        config = json.loads(cpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"'{cpath}' is not a valid config.json: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"'{cpath}' holds a JSON {type(config).__name__}, not an object")
    auto_map = config.get("auto_map")
    if not auto_map:
        return []
    return sorted(auto_map) if isinstance(auto_map, dict) else [str(auto_map)]


def load_hf_dir(path: Path, trust_pickle: bool = False, seq_len: int = 128,
                trust_remote_code: bool = False) -> SlimModel:
    """Load a local Hugging Face model directory with no network access.

    Safetensors weights load as they are; ``pytorch_model.bin`` is a pickle and needs
    ``trust_pickle``. A config whose ``auto_map`` names the directory's own Python code is
    refused unless ``trust_remote_code``; transformers is always given an explicit
    ``trust_remote_code``, so it never stops to ask on a terminal. Text models take ``int64``
    token ids of length ``seq_len``; vision models take ``(channels, image_size,
    image_size)`` pixel values.

    Raises:
        ModelLoadError: custom code without ``trust_remote_code``, a config transformers
            cannot read, or no auto class that builds the model.
        UntrustedPickleError: pickled ``.bin`` weights without ``trust_pickle``.
    """
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(f"'{path}' is a Hugging Face model; install the extra: "
                             "pip install 'slimkit[hf]'") from None
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and any(path.glob("*.bin")) and not trust_pickle:
        raise UntrustedPickleError(f"'{path}' stores its weights as pickled .bin files; pass "
                                   "--trust-pickle if you trust them, or convert to safetensors")
    mapped = custom_code(path)
    if mapped and not trust_remote_code:
        raise ModelLoadError(
            f"'{path}' needs its own Python code (config.json auto_map: {', '.join(mapped)}); "
            "slimkit runs a model's custom code only with an explicit opt-in "
            "(--trust-remote-code, trust_remote_code=True), so pass it only if you trust the "
            "directory's author")
    try:
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"'{path}': transformers cannot read its config.json: "
                             f"{first}") from None
    model = None
    # The class the checkpoint was saved from first, so a base model gets no random head.
    named = [a for a in (config.architectures or []) if isinstance(a, str)
             and hasattr(getattr(transformers, a, None), "from_pretrained")]
    for auto in (*named, "AutoModelForSequenceClassification", "AutoModelForImageClassification",
                 "AutoModel"):
        cls = getattr(transformers, auto)
        try:
            model = cls.from_pretrained(path, local_files_only=True,
                                        use_safetensors=has_safetensors,
                                        trust_remote_code=trust_remote_code)
            break
        except (ValueError, KeyError):
            continue
    if model is None:
        raise ModelLoadError(f"'{path}': no transformers auto class can build {config.model_type}")
    model.eval()
    if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
        size = config.image_size
        shape, dtype, name = (config.num_channels, size, size), "float32", "pixel_values"
    else:
        shape, dtype, name = (seq_len,), "int64", "input_ids"
    arch = {"hf_vocab": getattr(config, "vocab_size", None)}
    return SlimModel(module=HFLogits(model, name).eval(), input_shape=shape, input_dtype=dtype,
                     name=str(path), arch=None, num_classes=getattr(config, "num_labels", None),
                     recipe=None, history=[{"source": "huggingface", **arch}])
