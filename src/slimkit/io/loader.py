"""Resolve a MODEL argument (artifact dir, .pt2, Hugging Face dir, .onnx, zoo:NAME)."""

from __future__ import annotations

from pathlib import Path

import torch

from slimkit.core.errors import DataError, ModelLoadError
from slimkit.data.bundle import DataBundle
from slimkit.io.artifact import load_artifact
from slimkit.io.model import SlimModel
from slimkit.io.model_path import model_format
from slimkit.io.onnx_model import OnnxModel, load_onnx
from slimkit.io.pt2 import load_pt2

DEFAULT_SHAPE = (1, 28, 28)
DEFAULT_CLASSES = 10


def load_zoo(name: str, data: DataBundle | None = None,
             input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
             **kwargs: object) -> SlimModel:
    """Build a zoo model (random weights) that fits ``data`` (or the given shape/classes)."""
    from slimkit.zoo import build_model

    shape = tuple(input_shape or (data.input_shape if data else DEFAULT_SHAPE))
    classes = num_classes or (data.num_classes if data else DEFAULT_CLASSES)
    dtype = str(kwargs.get("input_dtype", "float32"))
    if data is not None and not _first_input(data).is_floating_point():
        dtype = "int64"
        kwargs.setdefault("input_dtype", "int64")
        kwargs.setdefault("vocab_size", _vocab_size(data))
    module = build_model(name, shape, classes, **kwargs)
    return SlimModel(module=module, input_shape=shape, input_dtype=dtype, name=f"zoo:{name}",
                     arch=getattr(module, "slimkit_spec", None), num_classes=classes)


def _first_input(data: DataBundle) -> torch.Tensor:
    """One training sample's (first) input: in memory, or the head of a stream."""
    if getattr(data, "streaming", False):
        from slimkit.io import batch as B

        return B.leaves(data.head("train", 1)[0])[0]
    return data.x_train[:1]


def _vocab_size(data: DataBundle) -> int:
    """Token ids' bound: the data's own (``meta['vocab_size']``), else the largest id + 1 of
    in-memory data. A stream cannot be scanned for it, so it must say."""
    if data.meta.get("vocab_size"):
        return int(data.meta["vocab_size"])
    if getattr(data, "streaming", False):
        raise DataError(f"'{data.name}' streams token ids without saying how many there are; "
                        "give its vocabulary size (StreamData(meta={'vocab_size': N})) or use "
                        "a Hugging Face model directory with its tokenizer")
    return int(max(data.x_train.max(), data.x_test.max())) + 1


def load_model(spec: str, *, data: DataBundle | None = None, trust_pickle: bool = False,
               allow_onnx: bool = False, trust_remote_code: bool = False,
               ) -> SlimModel | OnnxModel:
    """Load the model a user names on the command line.

    Args:
        spec: ``zoo:NAME``, an artifact directory, a ``.pt2`` file, a Hugging Face model
            directory, or (with ``allow_onnx``) an ``.onnx`` file.
        data: used to fit a zoo model's input shape and class count.
        trust_pickle: allow formats that unpickle Python objects (never the default).
        trust_remote_code: allow a Hugging Face directory whose config names custom code
            (``auto_map``); that code runs on load (never the default).

    Raises:
        ModelLoadError: with the path and what to do (the path is checked first, without
            loading anything: :func:`~slimkit.io.model_path.model_format`).
    """
    fmt = model_format(spec, allow_onnx=allow_onnx, trust_pickle=trust_pickle)
    if fmt == "zoo":
        return load_zoo(spec.removeprefix("zoo:"), data)
    path = Path(spec)
    if fmt == "artifact":
        return load_artifact(path, trust_pickle=trust_pickle)
    if fmt == "hf":
        from slimkit.io.hf import load_hf_dir

        return load_hf_dir(path, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code)
    if fmt == "pt2":
        return load_pt2(path, trust_pickle)
    if fmt == "onnx":
        return load_onnx(path)
    return _load_pickled(path, data)


def _load_pickled(path: Path, data: DataBundle | None) -> SlimModel:
    """A pickled module (``model_format`` checked that pickles are trusted)."""
    obj = torch.load(str(path), weights_only=False, map_location="cpu")
    if not isinstance(obj, torch.nn.Module):
        raise ModelLoadError(f"'{path}' holds a {type(obj).__name__}, not a torch.nn.Module "
                             "(a bare state_dict needs its architecture: use zoo:NAME or .pt2)")
    if data is None:
        raise ModelLoadError(f"'{path}' holds a module without an input spec; give --data, or "
                             "save it with torch.export.save(torch.export.export(...)) as .pt2")
    dtype = "float32" if _first_input(data).is_floating_point() else "int64"
    return SlimModel(module=obj, input_shape=data.input_shape, input_dtype=dtype, name=str(path),
                     num_classes=data.num_classes)
