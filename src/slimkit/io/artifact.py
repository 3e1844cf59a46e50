"""The slimkit artifact: a self-describing directory.

    DIR/manifest.json        format, architecture, input spec, recipe, stage history,
                             library versions, and a sha256 + size for every file
    DIR/weights.safetensors  the weights (sparse tensors as bitmask + values)
    DIR/model.pt2            a torch.export archive, when the model has no rebuildable spec
    DIR/tokenizer.json ...   a Hugging Face model's tokenizer / preprocessor files, copied
                             from the directory it was loaded from (``assets`` in the
                             manifest; not model bytes, see :func:`model_bytes`)

Loading validates the manifest (its schema and file names: io/manifest.py) and verifies
every checksum before reading a byte of model data. The checksums catch damage (a flipped bit, a
truncated copy), not tampering: whoever can edit the files can rewrite the manifest too.
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

from slimkit.core.errors import ModelLoadError, SlimkitError
from slimkit.core.files import atomic_dir, sha256_file, write_bytes, write_json
from slimkit.io.manifest import FORMAT, FORMAT_VERSION, validate_manifest
from slimkit.io.model import SlimModel, set_mode
from slimkit.io.model_path import MANIFEST
from slimkit.io.safety import load_exported
from slimkit.io.transforms import replay_transforms
from slimkit.io.weights import load_weights, save_weights

WEIGHTS = "weights.safetensors"
PT2 = "model.pt2"
#: Files of a Hugging Face directory that are not the model but make it usable (its tokenizer,
#: its image preprocessor, its generation defaults): carried into the artifact as they are.
HF_ASSETS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
             "sentencepiece.bpe.model", "preprocessor_config.json", "generation_config.json",
             "chat_template.jinja")


def library_versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    from slimkit import __version__

    return {"slimkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def export_program(model: SlimModel, max_batch: int = 4096) -> torch.export.ExportedProgram:
    """``torch.export`` the model in eval mode with a dynamic batch axis, and the inputs'
    named dynamic axes (a sequence length) dynamic within what the model allows."""
    set_mode(model.module, False)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    example = model.example_inputs(batch=2)
    shapes = [{0: batch, **{a: torch.export.Dim.AUTO for a in spec.dynamic}}
              for spec in model.input_specs]
    if isinstance(example, dict):
        return torch.export.export(model.module, (), example, dynamic_shapes=dict(
            zip(example, shapes, strict=True)))
    return torch.export.export(model.module, example, dynamic_shapes=tuple(shapes))


def save_graph(model: SlimModel, path: Path) -> None:
    """Save the architecture as a ``.pt2`` graph whose tensors are zeroed and deflated.

    The weights live once, in ``weights.safetensors``; storing them again inside the graph
    archive would double the artifact and hide what compression saved on disk.
    """
    hollow = copy.deepcopy(model.module)
    with torch.no_grad():
        # What the weights file restores is zeroed; a non-persistent buffer (HF's
        # position_ids) is kept, since loading the weights would not bring it back.
        for t in hollow.state_dict().values():
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
        assets = _copy_assets(model, tmp)
        arch = model.arch
        if arch is None:
            save_graph(model, tmp / PT2)
            arch = {"pt2": PT2}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "name": model.name, "architecture": arch,
            "input_spec": model.input_spec(),
            "num_classes": model.num_classes, "recipe": model.recipe,
            "history": model.history, "versions": library_versions(),
            "files": {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                      for f in sorted(tmp.iterdir())},
            **({"assets": assets} if assets else {}),
            **(extra or {}),
        }
        write_json(tmp / MANIFEST, manifest)
    return path


def _copy_assets(model: SlimModel, folder: Path) -> list[str]:
    """Copy the tokenizer / preprocessor files of the HF directory ``model`` came from (or of
    the artifact it was loaded from) into ``folder``; the names copied."""
    source = Path(model.source) if model.source else None
    if not (model.arch and "hf" in model.arch and source is not None and source.is_dir()):
        return []
    copied = []
    for name in HF_ASSETS:
        found = source / name
        if found.is_file() and not found.is_symlink():
            write_bytes(folder / name, found.read_bytes())
            copied.append(name)
    return copied


def model_bytes(path: str | Path) -> int:
    """Bytes of an artifact's model files (weights, graph, manifest), not of the tokenizer or
    other assets it carries: what compression changes, so what size ratios compare."""
    path = Path(path)
    assets = set(json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("assets", []))
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name not in assets)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read an artifact's manifest, validate it, and verify the checksums of its files.

    Raises:
        ModelLoadError: a missing, linked or malformed manifest (naming the key path), a file
            name that leaves the artifact folder, a linked, missing or modified file.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if mpath.is_symlink():
        raise ModelLoadError(f"'{mpath}' is a symbolic link; an artifact holds its own files, "
                             "so links are refused")
    if not mpath.is_file():
        raise ModelLoadError(f"'{path}' is not a slimkit artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"'{mpath}' is corrupted: {exc}") from None
    validate_manifest(manifest, mpath, WEIGHTS)
    root = path.resolve()
    for fname, meta in manifest["files"].items():
        fpath = path / fname
        if fpath.is_symlink():
            raise ModelLoadError(f"artifact file '{fpath}' is a symbolic link; an artifact "
                                 "holds its own files, so links are refused")
        if not fpath.is_file():
            raise ModelLoadError(f"artifact file '{fpath}' is missing")
        if fpath.resolve().parent != root:
            raise ModelLoadError(f"artifact file '{fpath}' lies outside '{path}'; refused")
        if fpath.stat().st_size != meta["bytes"] or sha256_file(fpath) != meta["sha256"]:
            raise ModelLoadError(
                f"checksum mismatch for '{fpath}': the file was modified or truncated; "
                "re-create the artifact")
    return manifest


def load_artifact(path: str | Path, trust_pickle: bool = False,
                  template: torch.nn.Module | None = None) -> SlimModel:
    """Load an artifact directory after verifying its manifest and checksums.

    The weights are read first (their sizes are bounded by the bytes on disk), and a zoo
    architecture is built on the ``meta`` device and compared with them before the real
    model is allocated: a forged architecture fails without allocating what it describes.

    Args:
        template: for artifacts without a rebuildable spec, a module of the same architecture
            (the user's own class) to load the weights into instead of the ``.pt2`` graph.

    Raises:
        ModelLoadError: missing files, checksum mismatch, weights that do not fit, or a zoo
            architecture that cannot be built on the meta device to check its size.
    """
    path = Path(path)
    manifest = read_manifest(path)
    arch = manifest["architecture"]
    spec = manifest["input_spec"]
    state = load_weights(path / WEIGHTS)
    if "zoo" in arch or "hf" in arch:
        module = _rebuild_zoo(arch, state, path / WEIGHTS)
    elif template is not None and _fits(template, state):
        module = copy.deepcopy(template)
        arch = None
    else:
        program = load_exported(str(path / arch["pt2"]), trust_pickle)
        _check_graph_input(program, spec, path / MANIFEST)
        module = program.module()
        arch = None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in '{path / WEIGHTS}' do not fit the architecture: "
                             f"{str(exc).splitlines()[0]}") from None
    set_mode(module, False)
    return SlimModel(module=module, **SlimModel.spec_fields(spec),
                     name=manifest.get("name") or str(path), arch=arch,
                     history=manifest.get("history", []), num_classes=manifest.get("num_classes"),
                     recipe=manifest.get("recipe"), source=str(path))


def _build_zoo(arch: dict[str, Any]) -> torch.nn.Module:
    if "hf" in arch:
        from slimkit.io.hf import build_hf

        return replay_transforms(build_hf(arch), arch.get("transforms", []))
    from slimkit.zoo import build_model

    module = build_model(arch["zoo"], tuple(arch["input_shape"]), arch["num_classes"],
                         **arch.get("kwargs", {}))
    return replay_transforms(module, arch.get("transforms", []))


def _rebuild_zoo(arch: dict[str, Any], state: dict[str, torch.Tensor],
                 wpath: Path) -> torch.nn.Module:
    """Build the architecture on the meta device (shapes, no memory), check that the weights
    fit it, then allocate that checked structure for the weights to fill.

    Every zoo build and rebuilder is structure-only, so the meta build always runs; one that
    does not is refused rather than built for real unchecked.

    Raises:
        ModelLoadError: the architecture cannot be built on the meta device, or the weights
            do not fit it.
    """
    try:
        with torch.device("meta"):
            reference = _build_zoo(arch)
    except SlimkitError:
        raise
    except Exception as exc:
        why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        raise ModelLoadError(
            f"cannot check the architecture's size before building it: building it on the "
            f"meta device failed ({why}); refused rather than allocating what "
            f"'{wpath.parent / MANIFEST}' describes") from None
    check_fit({k: tuple(v.shape) for k, v in reference.state_dict().items()},
              {k: tuple(v.shape) for k, v in state.items()},
              f"weights in '{wpath}' do not fit the architecture")
    persistent = reference.state_dict().keys()
    if all(name in persistent for name, _ in reference.named_buffers()):
        # Every tensor is about to be overwritten by the checked weights: allocate the checked
        # structure itself (uninitialized) instead of building the dense original first.
        module = reference.to_empty(device="cpu")
    else:
        module = _build_zoo(arch)  # a buffer the weights do not restore needs its value
    # transformers: a tied LM head is the embedding tensor again (not when a stage replaced
    # the head, e.g. by a quantized layer with its own codes).
    head = getattr(module, "get_output_embeddings", lambda: None)()
    if isinstance(head, torch.nn.Linear) and getattr(
            getattr(module, "config", None), "tie_word_embeddings", False):
        module.tie_weights()
    return module


def check_fit(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
              what: str) -> None:
    """Raise ModelLoadError ``"{what}: ..."`` naming the first tensor that is missing,
    unexpected or of another shape than ``expected``.

    A single value may come with any number of unit dimensions (a per-tensor scale saved as
    ``[]`` or ``[1, 1]``, which a quantizer takes in either shape): it is the same memory,
    and ``load_state_dict`` still refuses it where a module needs the exact shape.
    """
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [k for k in expected if k in found and not _same_shape(found[k], expected[k])]
    if missing:
        raise ModelLoadError(f"{what}: tensor '{missing[0]}' is missing")
    if unexpected:
        raise ModelLoadError(f"{what}: unexpected tensor '{unexpected[0]}'")
    if wrong:
        k = wrong[0]
        raise ModelLoadError(f"{what}: '{k}' has shape {list(found[k])}, the architecture "
                             f"needs {list(expected[k])}")


def _same_shape(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    a, b = tuple(a), tuple(b)
    return a == b or (all(d == 1 for d in a) and all(d == 1 for d in b))


def _graph_input(program: torch.export.ExportedProgram) -> tuple[list[int | None], str]:
    """The first user input of an exported graph: its per-sample shape (None where a
    dimension is dynamic) and dtype name."""
    user_inputs = program.graph_signature.user_inputs
    val = next(n.meta["val"] for n in program.graph.nodes
               if n.op == "placeholder" and n.name == user_inputs[0])
    shape = [d if isinstance(d, int) else None for d in val.shape[1:]]
    return shape, str(val.dtype).removeprefix("torch.")


def _check_graph_input(program: torch.export.ExportedProgram, spec: dict[str, Any],
                       mpath: Path) -> None:
    if spec.get("inputs"):
        n = len(program.graph_signature.user_inputs)
        if n != len(spec["inputs"]):
            raise ModelLoadError(f"'{mpath}' is malformed at input_spec.inputs: it lists "
                                 f"{len(spec['inputs'])} inputs, the graph takes {n}; "
                                 "re-create the artifact")
        return
    shape, dtype = _graph_input(program)
    fits = len(shape) == len(spec["shape"]) and all(
        d is None or d == s for d, s in zip(shape, spec["shape"], strict=True))
    if not fits or dtype != spec["dtype"]:
        raise ModelLoadError(f"'{mpath}' is malformed at input_spec: {spec['dtype']} "
                             f"{spec['shape']} differs from the graph's input {dtype} {shape}; "
                             "re-create the artifact")


def _fits(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = module.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == v.shape for k, v in state.items())
