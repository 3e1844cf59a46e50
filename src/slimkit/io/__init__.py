"""Loading and saving models and artifacts, safely."""

from slimkit.io.artifact import load_artifact, read_manifest, save_artifact
from slimkit.io.loader import load_model, load_zoo
from slimkit.io.model import SlimModel, set_mode
from slimkit.io.onnx_model import OnnxModel, load_onnx
from slimkit.io.weights import load_weights, save_weights

__all__ = [
    "OnnxModel",
    "SlimModel",
    "load_artifact",
    "load_model",
    "load_onnx",
    "load_weights",
    "load_zoo",
    "read_manifest",
    "save_artifact",
    "save_weights",
    "set_mode",
]
