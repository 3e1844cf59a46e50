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
                 "AutoModelForCausalLM", "AutoModel"):
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
    slim = describe_hf(model.eval(), name=str(path), seq_len=seq_len)
    slim.source = str(path)  # outputs never overwrite it; its tokenizer travels with artifacts
    return slim


def describe_hf(model: nn.Module, name: str = "huggingface", seq_len: int = 128) -> SlimModel:
    """A Hugging Face model as it comes, described by its named inputs and judged output.

    Vision models take ``pixel_values`` ``(channels, image_size, image_size)`` (224 when the
    config names no size); text models
    ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` where the model has token
    types) of a dynamic ``sequence`` length, ``seq_len`` in examples. The judged output is
    ``logits`` for classifiers and language models, ``last_hidden_state`` for bare encoders.
    Key/value caches are turned off (``use_cache``): outputs are tensors.
    """
    import inspect

    from slimkit.io import batch as B
    from slimkit.io.model import TensorSpec

    config = model.config
    if getattr(config, "use_cache", False):
        config.use_cache = False
    params = inspect.signature(model.forward).parameters
    if "pixel_values" in params:
        # ResNet/RegNet/ConvNeXt configs name no image size: they take any; 224 as examples.
        size = getattr(config, "image_size", None) or 224
        size = tuple(size) if isinstance(size, list | tuple) else (size, size)
        inputs: tuple[TensorSpec, ...] = (
            TensorSpec("pixel_values", (config.num_channels, *size), "float32"),)
    else:
        limit = getattr(config, "max_position_embeddings", None) or seq_len
        seq = min(seq_len, limit)
        dyn = {1: "sequence"}
        inputs = (TensorSpec("input_ids", (seq,), "int64", dyn, config.vocab_size),
                  TensorSpec("attention_mask", (seq,), "int64", dyn, 2))
        if "token_type_ids" in params and (getattr(config, "type_vocab_size", 0) or 0) > 1:
            inputs += (TensorSpec("token_type_ids", (seq,), "int64", dyn,
                                  config.type_vocab_size),)
    slim = SlimModel(module=model, input_shape=inputs[0].shape, input_dtype=inputs[0].dtype,
                     name=name, inputs=inputs, input_style="dict", arch=hf_arch(model),
                     history=[{"source": "huggingface", "class": type(model).__name__}])
    with torch.inference_mode():
        flat = B.flatten(B.call(model, slim.example_inputs(1)))
    slim.output = "logits" if "logits" in flat else next(iter(flat))
    if "ForSequenceClassification" in type(model).__name__ or \
            "ForImageClassification" in type(model).__name__:
        slim.num_classes = getattr(config, "num_labels", None)
    return slim


def hf_arch(model: nn.Module) -> dict | None:
    """The rebuildable spec of a transformers model (its class name and config), or None for
    any other module (a directory's custom code included: its artifact stores a graph)."""
    config = getattr(model, "config", None)
    if config is None or build_hf_class(type(model).__name__) is not type(model):
        return None
    return {"hf": type(model).__name__, "config": config.to_dict()}


def build_hf_class(name: str) -> type | None:
    """transformers' own model class ``name`` (never a directory's custom code), or None."""
    try:
        import transformers
    except ImportError:
        return None
    cls = getattr(transformers, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) \
        else None


def build_hf(arch: dict) -> nn.Module:
    """A transformers model of ``arch["hf"]`` (a class name) built from ``arch["config"]``
    with fresh weights, in eval mode: how an artifact rebuilds the user's own class.

    Raises:
        ModelLoadError: transformers is missing, or the name is not one of its model classes.
    """
    cls = build_hf_class(arch["hf"])
    if cls is None:
        raise ModelLoadError(f"architecture '{arch['hf']}' is not a transformers model class "
                             "(install the extra: pip install 'slimkit[hf]')")
    config = cls.config_class.from_dict(dict(arch["config"]))
    return cls(config).eval()
