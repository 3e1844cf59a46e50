"""Hugging Face model directories, loaded offline (needs the ``hf`` extra)."""

from __future__ import annotations

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


def load_hf_dir(path: Path, trust_pickle: bool = False, seq_len: int = 128) -> SlimModel:
    """Load a local Hugging Face model directory with no network access.

    Safetensors weights load as they are; ``pytorch_model.bin`` is a pickle and needs
    ``trust_pickle``. Text models take ``int64`` token ids of length ``seq_len``; vision
    models take ``(channels, image_size, image_size)`` pixel values.
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
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    model = None
    # The class the checkpoint was saved from first, so a base model gets no random head.
    named = [a for a in (config.architectures or []) if hasattr(transformers, a)]
    for auto in (*named, "AutoModelForSequenceClassification", "AutoModelForImageClassification",
                 "AutoModel"):
        cls = getattr(transformers, auto)
        try:
            model = cls.from_pretrained(path, local_files_only=True,
                                        use_safetensors=has_safetensors)
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
