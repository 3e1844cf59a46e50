"""The slimkit artifact: a self-describing directory.

    DIR/manifest.json        format, architecture, input spec, recipe, stage history,
                             library versions, and a sha256 + size for every file
    DIR/weights.safetensors  the weights (sparse tensors as bitmask + values)
    DIR/model.pt2            a torch.export archive, when the model has no rebuildable spec

Loading verifies every checksum before reading a byte of model data.
"""

from __future__ import annotations

import copy
import io
import json
import platform
import zipfile
from pathlib import Path
from typing import Any

import torch

from slimkit.core.errors import ModelLoadError
from slimkit.core.files import atomic_dir, sha256_file, write_bytes, write_json
from slimkit.io.model import SlimModel, set_mode
from slimkit.io.safety import load_exported
from slimkit.io.transforms import replay_transforms
from slimkit.io.weights import load_weights, save_weights

FORMAT = "slimkit-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
PT2 = "model.pt2"


def library_versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    from slimkit import __version__

    return {"slimkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def export_program(model: SlimModel, max_batch: int = 4096) -> torch.export.ExportedProgram:
    """``torch.export`` the model in eval mode with a dynamic batch dimension."""
    set_mode(model.module, False)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    example = model.example_inputs(batch=2)
    return torch.export.export(model.module, example, dynamic_shapes=({0: batch},))


def save_graph(model: SlimModel, path: Path) -> None:
    """Save the architecture as a ``.pt2`` graph whose tensors are zeroed and deflated.

    The weights live once, in ``weights.safetensors``; storing them again inside the graph
    archive would double the artifact and hide what compression saved on disk.
    """
    hollow = copy.deepcopy(model.module)
    with torch.no_grad():
        for t in [*hollow.parameters(), *hollow.buffers()]:
            t.zero_()
    raw = io.BytesIO()
    torch.export.save(export_program(model.copy(hollow)), raw)
    packed = io.BytesIO()
    with zipfile.ZipFile(raw) as src, \
            zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    write_bytes(path, packed.getvalue())


def save_artifact(model: SlimModel, path: str | Path, overwrite: bool = False,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as an artifact directory, atomically.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_weights(model.module.state_dict(), tmp / WEIGHTS)
        arch = model.arch
        if arch is None:
            save_graph(model, tmp / PT2)
            arch = {"pt2": PT2}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "name": model.name, "architecture": arch,
            "input_spec": {"shape": list(model.input_shape), "dtype": model.input_dtype},
            "num_classes": model.num_classes, "recipe": model.recipe,
            "history": model.history, "versions": library_versions(),
            "files": {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                      for f in sorted(tmp.iterdir())},
            **(extra or {}),
        }
        write_json(tmp / MANIFEST, manifest)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and verify an artifact's manifest and the checksums of its files."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ModelLoadError(f"'{path}' is not a slimkit artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"'{mpath}' is corrupted: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"'{mpath}' is not a slimkit artifact of format version {FORMAT_VERSION}")
    missing = [k for k in ("architecture", "input_spec", "files") if k not in manifest]
    arch = manifest.get("architecture") or {}
    required = [WEIGHTS] + ([arch["pt2"]] if isinstance(arch, dict) and "pt2" in arch else [])
    missing += [f"files.{f}" for f in required if f not in manifest.get("files", {})]
    if missing:
        raise ModelLoadError(f"'{mpath}' lacks {', '.join(missing)}; re-create the artifact")
    for fname, meta in manifest["files"].items():
        fpath = path / fname
        if not fpath.is_file():
            raise ModelLoadError(f"artifact file '{fpath}' is missing")
        if fpath.stat().st_size != meta["bytes"] or sha256_file(fpath) != meta["sha256"]:
            raise ModelLoadError(
                f"checksum mismatch for '{fpath}': the file was modified or truncated; "
                "re-create the artifact")
    return manifest


def load_artifact(path: str | Path, trust_pickle: bool = False,
                  template: torch.nn.Module | None = None) -> SlimModel:
    """Load an artifact directory after verifying its checksums.

    Args:
        template: for artifacts without a rebuildable spec, a module of the same architecture
            (the user's own class) to load the weights into instead of the ``.pt2`` graph.

    Raises:
        ModelLoadError: missing files, checksum mismatch, or weights that do not fit.
    """
    path = Path(path)
    manifest = read_manifest(path)
    arch = manifest["architecture"]
    spec = manifest["input_spec"]
    state = load_weights(path / WEIGHTS)
    if "zoo" in arch:
        from slimkit.zoo import build_model

        module = build_model(arch["zoo"], tuple(arch["input_shape"]), arch["num_classes"],
                             **arch.get("kwargs", {}))
        module = replay_transforms(module, arch.get("transforms", []))
    elif "pt2" in arch and template is not None and _fits(template, state):
        module = copy.deepcopy(template)
        arch = None
    elif "pt2" in arch:
        module = load_exported(str(path / arch["pt2"]), trust_pickle).module()
        arch = None
    else:
        raise ModelLoadError(f"'{path / MANIFEST}' has an unknown architecture entry {arch}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in '{path / WEIGHTS}' do not fit the architecture: "
                             f"{str(exc).splitlines()[0]}") from None
    set_mode(module, False)
    return SlimModel(module=module, input_shape=tuple(spec["shape"]), input_dtype=spec["dtype"],
                     name=manifest.get("name", str(path)), arch=arch,
                     history=manifest.get("history", []), num_classes=manifest.get("num_classes"),
                     recipe=manifest.get("recipe"), source=str(path))


def _fits(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = module.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == v.shape for k, v in state.items())
