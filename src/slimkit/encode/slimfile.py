"""The packed model file ``.slim``: one file, every byte accounted for and checksummed.

Layout (all integers little-endian)::

    offset 0   8 bytes   magic  b"\\x89SLM\\r\\n\\x1a\\n"  (PNG-style: catches text-mode damage)
           8   uint16    format version (1)
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
from slimkit.io.model import SlimModel, set_mode

MAGIC = b"\x89SLM\r\n\x1a\n"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHI32s")
SUFFIX = ".slim"
FLAG_DEFLATED = 1


def _shared_layers(model: SlimModel, cfg: EncodeConfig) -> dict[str, tuple[int, int]]:
    """``{"layer.weight": (cluster bits, offset bits)}`` for the selected float32 weights."""
    from slimkit.graph.select import select_layers

    layers, _ = select_layers(model.module, cfg.layer_types, cfg.include, cfg.exclude)
    return {f"{n}.weight": cfg.bits_for(type(m).__name__) for n, m in layers.items()
            if getattr(m, "weight", None) is not None and m.weight.dtype == torch.float32}


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
    under ``clustered_at_pack``); every other tensor is stored raw.

    Args:
        model: the model; its ``arch`` (a zoo spec) lets :func:`unpack` rebuild it alone.
        cfg: bits, offset widths, coder and selectors (default :class:`EncodeConfig`).

    Returns:
        ``(file bytes, report)``: the report gives bytes per tensor, per layer and in total,
        bits per weight beside the empirical entropy bound, and the ratio to float32.
    """
    cfg = cfg or EncodeConfig()
    shared = _shared_layers(model, cfg)
    entries, payloads, tensors, late = [], [], {}, []
    offset = 0
    for name, tensor in model.module.state_dict().items():
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
                "input_spec": {"shape": list(model.input_shape), "dtype": model.input_dtype},
                "num_classes": model.num_classes, "payload_bytes": offset, "tensors": entries}
    text = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, FLAG_DEFLATED, len(text),
                         hashlib.sha256(text).digest())
    blob = header + text + b"".join(payloads)
    return blob, _report(model, tensors, len(header), len(text), late)


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
    blob, report = pack_bytes(model, cfg)
    write_bytes(path, blob)
    return {"path": str(path), **report}


def _fail(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"'{path}' cannot be loaded as a packed model: {what}")


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
    if version != FORMAT_VERSION:
        raise _fail(path, f"format version {version}; this slimkit reads version "
                          f"{FORMAT_VERSION}")
    if flags & ~FLAG_DEFLATED:
        raise _fail(path, f"unknown header flags {flags:#06x} (corrupted header?)")
    end = HEADER.size + length
    if len(blob) < end:
        raise _fail(path, f"the file is truncated or its header corrupted: the manifest needs "
                          f"{length} bytes but {len(blob) - HEADER.size} follow the header")
    text = blob[HEADER.size:end]
    if hashlib.sha256(text).digest() != digest:
        raise _fail(path, "the manifest is corrupted (sha256 mismatch)")
    try:
        manifest = json.loads(zlib.decompress(text) if flags & FLAG_DEFLATED else text)
        total = int(manifest["payload_bytes"])
        for t in manifest["tensors"]:
            _ = (t["name"], int(t["offset"]), int(t["bytes"]), t["sha256"], t["shape"])
        arch, spec = manifest["architecture"], manifest["input_spec"]
        _ = (list(spec["shape"]), str(spec["dtype"]))
        if not (arch is None or isinstance(arch, dict)):
            raise TypeError(f"architecture must be an object or null, not {arch!r}")
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise _fail(path, f"the manifest is malformed ({type(exc).__name__}: {exc})") from None
    if len(blob) != end + total:
        state = "truncated" if len(blob) < end + total else "longer than its manifest says"
        raise _fail(path, f"the file is {state}: {len(blob)} bytes, expected {end + total}")
    return manifest, end


def read_packed(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify a ``.slim`` file: the manifest and the decoded state dict.

    Raises:
        ModelLoadError: missing file, wrong magic or version, truncation, checksum mismatch,
            or a payload that does not decode -- naming the file and the tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"packed model '{path}' does not exist")
    blob = path.read_bytes()
    manifest, start = _read_manifest(path, blob)
    state: dict[str, torch.Tensor] = {}
    for t in manifest["tensors"]:
        lo, n = start + int(t["offset"]), int(t["bytes"])
        if int(t["offset"]) < 0 or n < 0 or lo + n > len(blob):
            raise _fail(path, f"tensor '{t['name']}' lies outside the file")
        data = blob[lo:lo + n]
        if hashlib.sha256(data).hexdigest() != t["sha256"]:
            raise _fail(path, f"the payload of tensor '{t['name']}' is corrupted (sha256 "
                              "mismatch)")
        try:
            state[t["name"]] = decode_tensor(data, t)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            raise _fail(path, f"tensor '{t['name']}' does not decode: {exc}") from None
    return manifest, state


def unpack(path: str | Path, template: torch.nn.Module | None = None) -> SlimModel:
    """Load a ``.slim`` file as a SlimModel, after verifying it.

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
    manifest, state = read_packed(path)
    arch, spec = manifest["architecture"], manifest["input_spec"]
    if template is not None:
        module = copy.deepcopy(template)
    elif arch and "zoo" in arch:
        from slimkit.zoo import build_model

        try:
            module = build_model(arch["zoo"], tuple(arch["input_shape"]), arch["num_classes"],
                                 **arch.get("kwargs", {}))
        except (SlimkitError, KeyError, TypeError, ValueError) as exc:
            raise _fail(path, f"its architecture {arch} cannot be rebuilt: {exc}") from None
    else:
        raise _fail(path, "it records no rebuildable architecture; pass a template module "
                          "of the same architecture")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise _fail(path, f"its tensors do not fit the architecture: "
                          f"{str(exc).splitlines()[0]}") from None
    set_mode(module, False)
    return SlimModel(module=module, input_shape=tuple(spec["shape"]), input_dtype=spec["dtype"],
                     name=manifest.get("name", str(path)), arch=arch,
                     num_classes=manifest.get("num_classes"))
