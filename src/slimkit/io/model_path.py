"""What a MODEL argument names, decided from the path alone: nothing is loaded, no torch.

The CLI checks its model argument with :func:`model_format` before it imports torch, so a wrong
path is reported at once; :func:`~slimkit.io.loader.load_model` dispatches on the same answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from slimkit.core.errors import ModelLoadError, UntrustedPickleError

MANIFEST = "manifest.json"  # in a slimkit artifact directory
HF_CONFIG = "config.json"  # in a Hugging Face model directory
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

ModelFormat = Literal["zoo", "artifact", "hf", "pt2", "onnx", "pickle"]


def model_format(spec: str, allow_onnx: bool = False, trust_pickle: bool = False,
                 ) -> ModelFormat:
    """The format of the model ``spec`` names, checked without reading it.

    Args:
        spec: ``zoo:NAME``, an artifact directory, a ``.pt2`` file, a Hugging Face model
            directory, an ``.onnx`` file, or a pickled module (``.pt``, ``.pth``, ...).
        allow_onnx: whether the caller can use an ONNX file.
        trust_pickle: whether a pickled module may be loaded.

    Returns:
        "zoo", "artifact", "hf", "pt2", "onnx" or "pickle".

    Raises:
        ModelLoadError: the path does not exist or names no format slimkit loads (naming the
            path and the accepted forms); UntrustedPickleError for a pickled file without
            ``trust_pickle``.

    Example:
        >>> model_format("zoo:lenet5")
        'zoo'
    """
    if spec.startswith("zoo:"):
        return "zoo"
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(f"model '{spec}' not found: give an artifact directory, a .pt2 "
                             "file, a Hugging Face directory, an .onnx file or zoo:NAME")
    if path.is_dir():
        if (path / MANIFEST).exists():
            return "artifact"
        if (path / HF_CONFIG).exists():
            return "hf"
        raise ModelLoadError(f"directory '{path}' holds neither {MANIFEST} (slimkit artifact) "
                             f"nor {HF_CONFIG} (Hugging Face model)")
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return "pt2"
    if suffix == ".onnx":
        if not allow_onnx:
            raise ModelLoadError(f"'{path}' is an ONNX file: it can be inspected, benchmarked "
                                 "and evaluated, but compression needs a PyTorch model")
        return "onnx"
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise UntrustedPickleError(
                f"'{path}' is a pickled PyTorch file; loading it could run arbitrary code. Save "
                "the model with torch.export.save (.pt2) instead, or pass --trust-pickle if you "
                "trust it")
        return "pickle"
    raise ModelLoadError(f"'{path}': unknown model format '{suffix}'; expected a directory, "
                         ".pt2, .onnx or zoo:NAME")
