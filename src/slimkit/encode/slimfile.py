"""The packed model file ``.slim``: one file, every byte accounted for and checksummed.

Layout (all integers little-endian)::

    offset 0   8 bytes   magic  b"\\x89SLM\\r\\n\\x1a\\n"  (PNG-style: catches text-mode damage)
           8   uint16    format version (1; 2 when the manifest names tied tensors)
          10   uint16    flags: bit 0 = the manifest is zlib-deflated (set by pack); the
                         other bits are reserved and must be 0
          12   uint32    manifest length M (as stored)
          16   32 bytes  sha256 of the manifest as stored
          48   M bytes   manifest: compact UTF-8 JSON, deflated when flag bit 0 is set
        48+M   payloads  one per tensor, in manifest order

The manifest holds what rebuilds the model (``architecture`` and ``input_spec`` as in an
artifact's manifest), the total payload size, and per tensor its encoding (``shared``: codebook
+ Huffman/ANS-coded index and offset streams, see codec.py; ``raw``), offset, size and sha256.
Reading checks the magic, version, sizes and every checksum before decoding, and turns any
damage into a ModelLoadError that names the file and the part that is wrong.

Tied weights (GPT-2's LM head holds its embedding's matrix) are one tensor under two state-dict
names: the file stores it once, and the manifest's ``tied`` maps each other name to the stored
one (``{"lm_head.weight": "transformer.wte.weight"}``), so the matrix is neither paid twice
nor decoded into two different values. Such a file is version 2, so that a reader of version 1
refuses it by its version instead of missing a tensor; files without ties stay version 1.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import torch

from slimkit.core.errors import ModelLoadError, OutputExistsError, SlimkitError
from slimkit.core.files import write_bytes
from slimkit.encode.cluster import apply_clusters_to, plan_layer
from slimkit.encode.codec import decode_tensor, encode_raw, encode_shared
from slimkit.encode.config import EncodeConfig
from slimkit.io.artifact import check_fit
from slimkit.io.model import SlimModel, set_mode

MAGIC = b"\x89SLM\r\n\x1a\n"
FORMAT_VERSION = 1
#: The version of a file whose manifest names tied tensors (``tied``); readable versions.
TIED_VERSION = 2
READ_VERSIONS = (FORMAT_VERSION, TIED_VERSION)
HEADER = struct.Struct("<8sHHI32s")
SUFFIX = ".slim"
FLAG_DEFLATED = 1
#: Most bytes a manifest may inflate to: about 300 bytes per tensor, so some 100k tensors.
MAX_MANIFEST_BYTES = 32 << 20


def _shared_layers(model: SlimModel, cfg: EncodeConfig,
                   ) -> tuple[dict[str, tuple[int, int]], list[dict[str, str]]]:
    """``{"layer.weight": (cluster bits, offset bits)}`` for the selected float32 weights, and
    the selected layers stored raw instead, with the reason.

    Hugging Face Conv1D layers count as Linear (their ``[in, out]`` weight codes like a
    Linear's; the file keeps the layer as it is). A layer whose weight another module also
    holds (a tied LM head) is stored raw unless named exactly in ``include``, as the encode
    stage leaves it unclustered: clustering it here would change the embedding too.
    """
    from slimkit.graph.select import select_layers
    from slimkit.io.linear import conv1d_layers, shared_weights

    types = list(cfg.layer_types)
    if "Linear" in types and conv1d_layers(model.module):
        types.append("Conv1D")
    layers, _ = select_layers(model.module, types, cfg.include, cfg.exclude)
    tied = shared_weights(model.module)
    shared, raw = {}, []
    for n, m in layers.items():
        if getattr(m, "weight", None) is None or m.weight.dtype != torch.float32:
            continue
        if n in tied and n not in cfg.include:
            raw.append({"what": n, "why": f"weight shared with {', '.join(tied[n])} (tied): "
                        "stored as it is, since clustering it would change "
                        f"{tied[n][0]} too (name it in include to cluster both)"})
            continue
        shared[f"{n}.weight"] = cfg.bits_for(type(m).__name__)
    return shared, raw


def _tied_keys(module: torch.nn.Module, keys: list[str]) -> dict[str, str]:
    """State-dict keys naming a tensor already under an earlier key (tied weights):
    ``{later key: first key}``, in state-dict order."""
    order = {k: i for i, k in enumerate(keys)}
    holders: dict[int, list[str]] = {}
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    for key, tensor in named:
        if key in order:
            holders.setdefault(id(tensor), []).append(key)
    out = {}
    for group in holders.values():
        first, *rest = sorted(set(group), key=order.__getitem__)
        out.update(dict.fromkeys(rest, first))
    return out


def _ensure_shared(weight: torch.Tensor, bits: int, cfg: EncodeConfig,
                   ) -> tuple[torch.Tensor, bool]:
    """The weight itself when it has at most ``2^bits`` distinct non-zero values, else
    its k-means clustering (lossy; reported as clustered at pack time)."""
    if torch.unique(weight[weight != 0]).numel() <= 2**bits:
        return weight, False
    out = weight.clone()
    apply_clusters_to(out, plan_layer(weight, bits, cfg.codebook_dtype, cfg.max_iter))
    return out, True


def pack_bytes(model: SlimModel, cfg: EncodeConfig | None = None) -> tuple[bytes, dict]:
    """Encode ``model`` as the bytes of a ``.slim`` file, in memory.

    The selected layers' weights are stored as shared values (a layer with more than
    ``2^bits`` distinct non-zero values is clustered here, without fine-tuning, and listed
    under ``clustered_at_pack``); every other tensor is stored raw. A tied tensor is stored
    once (the report's ``tied`` lists its other names); a tied layer not named in
    ``include`` is stored raw (the report's ``skipped`` says why).

    Args:
        model: the model; its ``arch`` (a zoo or Hugging Face spec) lets :func:`unpack` rebuild
            it alone.
        cfg: bits, offset widths, coder and selectors (default :class:`EncodeConfig`).

    Returns:
        ``(file bytes, report)``: the report gives bytes per tensor, per layer and in total,
        bits per weight beside the empirical entropy bound, and the ratio to float32.
    """
    cfg = cfg or EncodeConfig()
    shared, raw = _shared_layers(model, cfg)
    state = model.module.state_dict()
    tied = _tied_keys(model.module, list(state))
    for alias, first in tied.items():  # a named tied layer: its one matrix is coded shared
        if alias in shared:
            shared.setdefault(first, shared[alias])
    entries, payloads, tensors, late = [], [], {}, []
    offset = 0
    for name, tensor in state.items():
        if name in tied:
            continue
        if name in shared:
            bits, index_bits = shared[name]
            weight, clustered_now = _ensure_shared(tensor.detach().cpu(), bits, cfg)
            late += [name] if clustered_now else []
            data, meta, stats = encode_shared(weight, index_bits, cfg.coder, cfg.codebook_dtype,
                                              cfg.positions)
        else:
            data, meta = encode_raw(tensor)
            stats = {"numel": tensor.numel(), "bytes": len(data)}
        entries.append({"name": name, **meta, "offset": offset, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
        tensors[name] = {"encoding": meta["encoding"], **stats}
        payloads.append(data)
        offset += len(data)
    manifest = {"format": "slimkit-packed", "name": model.name, "architecture": model.arch,
                "input_spec": model.input_spec(), "num_classes": model.num_classes,
                "payload_bytes": offset, "tensors": entries}
    if tied:
        manifest["tied"] = tied
    text = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    header = HEADER.pack(MAGIC, TIED_VERSION if tied else FORMAT_VERSION, FLAG_DEFLATED,
                         len(text), hashlib.sha256(text).digest())
    blob = header + text + b"".join(payloads)
    report = _report(model, tensors, len(header), len(text), late)
    report.update(tied=tied, skipped=raw)
    return blob, report


def _report(model: SlimModel, tensors: dict[str, dict], header: int, manifest: int,
            late: list[str]) -> dict[str, Any]:
    """Sizes per tensor, per layer, per kind of content and in total; bits per weight and
    the entropy bound of the coded streams."""
    layers: dict[str, int] = {}
    for name, t in tensors.items():
        layer = name.rsplit(".", 1)[0] if "." in name else name
        layers[layer] = layers.get(layer, 0) + t["bytes"]
    shared = [t for t in tensors.values() if t["encoding"] == "shared"]
    numel = max(1, sum(t["numel"] for t in shared))
    params = sum(p.numel() for p in model.module.parameters())
    total = header + manifest + sum(t["bytes"] for t in tensors.values())
    breakdown = {"header": header, "manifest": manifest,
                 "raw_tensors": sum(t["bytes"] for t in tensors.values()
                                    if t["encoding"] == "raw"),
                 "codebooks": sum(t["codebook_bytes"] for t in shared),
                 "positions": sum(t["positions_bytes"] for t in shared),
                 "indices": sum(t["index_bytes"] + t["index_max_bytes"] for t in shared)}
    return {"bytes": total, "header_bytes": header, "manifest_bytes": manifest,
            "breakdown": breakdown,
            "payload_bytes": total - header - manifest, "layers": layers, "tensors": tensors,
            "params": params, "float32_bytes": 4 * params, "ratio": 4 * params / total,
            "shared_weights": sum(t["numel"] for t in shared),
            "shared_nonzero": sum(t["nonzero"] for t in shared),
            "bits_per_weight": 8 * sum(t["bytes"] for t in shared) / numel,
            "stream_bits_per_weight": sum(t["stream_bits_per_weight"] * t["numel"]
                                          for t in shared) / numel,
            "entropy_bits_per_weight": sum(t["entropy_bits_per_weight"] * t["numel"]
                                           for t in shared) / numel,
            "clustered_at_pack": late}


def pack(model: SlimModel, path: str | Path, cfg: EncodeConfig | None = None,
         overwrite: bool = False) -> dict[str, Any]:
    """Write ``model`` as a ``.slim`` file, atomically (whole or absent, never half-written).

    Returns:
        The report of :func:`pack_bytes`, with ``path``.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.

    Example:
        >>> report = pack(clustered, "model.slim")  # doctest: +SKIP
        >>> report["bytes"], report["ratio"]  # doctest: +SKIP
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output '{path}' already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_file():  # renaming onto a device would replace it
        raise OutputExistsError(f"output '{path}' is not a regular file (a device, pipe, "
                                "folder or socket?); choose another path")
    blob, report = pack_bytes(model, cfg)
    write_bytes(path, blob)
    return {"path": str(path), **report}


def _fail(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"'{path}' cannot be loaded as a packed model: {what}")


def _inflate(path: Path, text: bytes) -> bytearray:
    """The deflated manifest, inflated 1 MiB at a time up to :data:`MAX_MANIFEST_BYTES`: the
    cap bounds what a crafted stream can make us allocate (deflate reaches about 1000:1)."""
    inflater, raw, pending = zlib.decompressobj(), bytearray(), text
    try:
        while not inflater.eof:
            chunk = inflater.decompress(pending, 1 << 20)
            if not chunk and len(inflater.unconsumed_tail) == len(pending):
                raise _fail(path, "the manifest is malformed (its deflate stream is "
                                  "incomplete)")
            pending = inflater.unconsumed_tail
            raw += chunk
            if len(raw) > MAX_MANIFEST_BYTES:
                raise _fail(path, f"the manifest inflates to more than {MAX_MANIFEST_BYTES} "
                                  "bytes (a decompression bomb?); refused")
    except zlib.error as exc:
        raise _fail(path, f"the manifest is malformed (zlib: {exc})") from None
    return raw


def _count(value: Any, where: str, low: int = 0) -> int:
    if type(value) is not int or value < low:
        raise ValueError(f"{where} must be an integer >= {low}, not {value!r:.40}")
    return value


def _shape(value: Any, where: str, low: int = 0) -> list[int]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of integers, not {value!r:.40}")
    return [_count(s, f"{where}[{i}]", low) for i, s in enumerate(value)]


def _check_inputs(spec: dict[str, Any]) -> None:
    """The optional several-input part of ``input_spec``: ``inputs``, ``style``, ``output``."""
    inputs = spec.get("inputs")
    if inputs is not None:
        if not isinstance(inputs, list) or not inputs:
            raise ValueError("input_spec.inputs must be a non-empty list")
        for i, raw in enumerate(inputs):
            where = f"input_spec.inputs[{i}]"
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) \
                    or not isinstance(raw.get("dtype"), str):
                raise ValueError(f"{where} must be an object with a name and a dtype")
            _shape(raw.get("shape"), f"{where}.shape")
            if not isinstance(raw.get("dynamic", {}), dict):
                raise ValueError(f"{where}.dynamic must be an object")
            if raw.get("high") is not None:
                _count(raw["high"], f"{where}.high")
    if spec.get("style", "tensor") not in ("tensor", "tuple", "dict"):
        raise ValueError(f"input_spec.style must be tensor, tuple or dict, not "
                         f"{spec.get('style')!r:.40}")
    if not isinstance(spec.get("output", ""), str | None):
        raise ValueError("input_spec.output must be a string")


def _check_manifest(manifest: Any) -> None:
    """Types and sizes of everything read before decoding, each error naming its key path.

    The payloads must tile the payload area in order (``offset`` = the bytes before it), so
    every byte is accounted for once and no payload is decoded twice under two names.
    """
    if not isinstance(manifest, dict):
        raise ValueError(f"<root> must be an object, not {type(manifest).__name__}")
    total = _count(manifest.get("payload_bytes"), "payload_bytes")
    spec, arch = manifest.get("input_spec"), manifest.get("architecture")
    if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str):
        raise ValueError("input_spec must be an object with shape and dtype")
    _shape(spec.get("shape"), "input_spec.shape", low=1)
    _check_inputs(spec)
    if not (arch is None or isinstance(arch, dict)):
        raise ValueError(f"architecture must be an object or null, not {arch!r:.40}")
    if manifest.get("num_classes") is not None:
        _count(manifest["num_classes"], "num_classes", low=1)
    if not isinstance(manifest.get("name", ""), str):
        raise ValueError("name must be a string")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, list):
        raise ValueError("tensors must be a list")
    names, offset = set(), 0
    for i, t in enumerate(tensors):
        where = f"tensors[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or t["name"] in names:
            raise ValueError(f"{where} must be an object with a unique name")
        names.add(t["name"])
        if _count(t.get("offset"), f"{where}.offset") != offset:
            raise ValueError(f"{where}.offset is {t['offset']}, but the payloads before it end "
                             f"at {offset}")
        offset += _count(t.get("bytes"), f"{where}.bytes")
        _shape(t.get("shape"), f"{where}.shape")
        if not isinstance(t.get("sha256"), str) or t.get("encoding") not in ("raw", "shared"):
            raise ValueError(f"{where} needs a sha256 and an encoding (raw or shared)")
    if offset != total:
        raise ValueError(f"payload_bytes is {total}, but the tensors take {offset}")
    tied = manifest.get("tied", {})
    if not isinstance(tied, dict):
        raise ValueError("tied must be an object")
    for alias, first in tied.items():
        if alias in names or not isinstance(first, str) or first not in names:
            raise ValueError(f"tied['{alias:.80}'] must name a stored tensor, under a name "
                             "not stored itself")


def _read_manifest(path: Path, blob: bytes) -> tuple[dict[str, Any], int]:
    """Check the header and the manifest; return the manifest and where payloads start."""
    if len(blob) < HEADER.size:
        if MAGIC.startswith(blob[:8]) or blob.startswith(MAGIC):
            raise _fail(path, f"the file is truncated ({len(blob)} bytes, shorter than the "
                              f"{HEADER.size}-byte header)")
        raise _fail(path, "not a .slim file (wrong magic bytes)")
    magic, version, flags, length, digest = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise _fail(path, "not a .slim file (wrong magic bytes)")
    if version not in READ_VERSIONS:
        raise _fail(path, f"format version {version}; this slimkit reads versions "
                          f"{FORMAT_VERSION} and {TIED_VERSION}")
    if flags & ~FLAG_DEFLATED:
        raise _fail(path, f"unknown header flags {flags:#06x} (corrupted header?)")
    end = HEADER.size + length
    if len(blob) < end:
        raise _fail(path, f"the file is truncated or its header corrupted: the manifest needs "
                          f"{length} bytes but {len(blob) - HEADER.size} follow the header")
    text = blob[HEADER.size:end]
    if hashlib.sha256(text).digest() != digest:
        raise _fail(path, "the manifest is corrupted (sha256 mismatch)")
    if not flags & FLAG_DEFLATED and length > MAX_MANIFEST_BYTES:
        raise _fail(path, f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes; refused")
    try:
        manifest = json.loads(_inflate(path, text) if flags & FLAG_DEFLATED else text)
        _check_manifest(manifest)
        if "tied" in manifest and version != TIED_VERSION:
            raise ValueError(f"tied is a version {TIED_VERSION} key, in a version {version} "
                             "file")
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"the manifest is malformed ({exc})") from None
    total = manifest["payload_bytes"]
    if len(blob) != end + total:
        state = "truncated" if len(blob) < end + total else "longer than its manifest says"
        raise _fail(path, f"the file is {state}: {len(blob)} bytes, expected {end + total}")
    return manifest, end


def _load_blob(path: Path) -> tuple[bytes, dict[str, Any], int]:
    if not path.is_file():
        raise ModelLoadError(f"packed model '{path}' does not exist")
    blob = path.read_bytes()
    manifest, start = _read_manifest(path, blob)
    return blob, manifest, start


def _decode_all(path: Path, blob: bytes, manifest: dict[str, Any],
                start: int) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for t in manifest["tensors"]:
        lo, n = start + t["offset"], t["bytes"]
        data = blob[lo:lo + n]
        if hashlib.sha256(data).hexdigest() != t["sha256"]:
            raise _fail(path, f"the payload of tensor '{t['name']}' is corrupted (sha256 "
                              "mismatch)")
        try:
            state[t["name"]] = decode_tensor(data, t)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            raise _fail(path, f"tensor '{t['name']}' does not decode: {exc}") from None
    for alias, first in manifest.get("tied", {}).items():  # one tensor, two names
        state[alias] = state[first]
    return state


def read_packed(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify a ``.slim`` file: the manifest and the decoded state dict.

    Raises:
        ModelLoadError: missing file, wrong magic or version, truncation, a malformed or
            oversized manifest (naming the key path), checksum mismatch, or a payload that
            does not decode -- naming the file and the tensor.
    """
    path = Path(path)
    blob, manifest, start = _load_blob(path)
    return manifest, _decode_all(path, blob, manifest, start)


def _reference(path: Path, arch: dict | None,
               template: torch.nn.Module | None) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of the model the file must fill, known before anything is decoded (the
    zoo architecture is built on the meta device: shapes without memory). None when the
    architecture needs real values to build; loading the state dict checks it then."""
    if template is not None:
        return {k: tuple(v.shape) for k, v in template.state_dict().items()}
    if not (arch and ("zoo" in arch or "hf" in arch)):
        raise _fail(path, "it records no rebuildable architecture; pass a template module "
                          "of the same architecture")
    try:
        with torch.device("meta"):
            module = _build(arch)
    except (SlimkitError, KeyError, TypeError, ValueError) as exc:
        raise _fail(path, f"its architecture {arch} cannot be rebuilt: {exc}") from None
    except Exception:  # an architecture that cannot be built on the meta device
        return None
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _build(arch: dict[str, Any]) -> torch.nn.Module:
    """The zoo model (or the Hugging Face class and config) with the recorded structural
    changes replayed (pruned, factorized, quantized layers), as an artifact rebuilds it."""
    from slimkit.io.transforms import replay_transforms

    if "hf" in arch:
        from slimkit.io.hf import build_hf

        return replay_transforms(build_hf(arch), arch.get("transforms", []))
    from slimkit.zoo import build_model

    module = build_model(arch["zoo"], tuple(arch["input_shape"]), arch["num_classes"],
                         **arch.get("kwargs", {}))
    return replay_transforms(module, arch.get("transforms", []))


def unpack(path: str | Path, template: torch.nn.Module | None = None) -> SlimModel:
    """Load a ``.slim`` file as a SlimModel, after verifying it.

    The tensor shapes in the manifest are compared with the architecture's before any
    payload is decoded, so a forged shape fails without allocating what it claims.

    Args:
        path: the packed file.
        template: a module of the same architecture, needed when the file has no rebuildable
            ``architecture`` (a model that came from user code rather than the zoo).

    Returns:
        The model (eval mode) whose tensors equal the packed ones bit for bit.

    Raises:
        ModelLoadError: see :func:`read_packed`; also no architecture and no template, or
            tensors that do not fit the architecture.
    """
    import copy

    path = Path(path)
    blob, manifest, start = _load_blob(path)
    arch, spec = manifest["architecture"], manifest["input_spec"]
    expected = _reference(path, arch, template)
    if expected is not None:
        shapes = {t["name"]: tuple(t["shape"]) for t in manifest["tensors"]}
        shapes.update({a: shapes[f] for a, f in manifest.get("tied", {}).items()})
        check_fit(expected, shapes,
                  f"'{path}' cannot be loaded as a packed model: its tensors do not fit the "
                  "architecture")
    state = _decode_all(path, blob, manifest, start)
    try:
        module = copy.deepcopy(template) if template is not None else _build(arch)
        module.load_state_dict(state, strict=True)
    except (SlimkitError, KeyError, TypeError, ValueError) as exc:
        raise _fail(path, f"its architecture {arch} cannot be rebuilt: {exc}") from None
    except RuntimeError as exc:
        raise _fail(path, f"its tensors do not fit the architecture: "
                          f"{str(exc).splitlines()[0]}") from None
    set_mode(module, False)
    try:
        fields = SlimModel.spec_fields(spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(path, f"its input_spec.inputs cannot be read: {exc}") from None
    return SlimModel(module=module, **fields, name=manifest.get("name") or str(path), arch=arch,
                     num_classes=manifest.get("num_classes"))
