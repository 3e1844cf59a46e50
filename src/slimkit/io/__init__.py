"""Loading and saving models and artifacts, safely.

Names are imported on first use (see :mod:`slimkit.core.lazy`): a model path is checked
(:func:`model_format`) without torch.
"""

from slimkit.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "slimkit.io.artifact": ("load_artifact", "read_manifest", "save_artifact"),
    "slimkit.io.loader": ("load_model", "load_zoo"),
    "slimkit.io.model": ("SlimModel", "set_mode"),
    "slimkit.io.model_path": ("model_format",),
    "slimkit.io.onnx_model": ("OnnxModel", "load_onnx"),
    "slimkit.io.weights": ("load_weights", "save_weights"),
})
