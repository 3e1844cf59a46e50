"""Hostile sizes: metadata that claims far more than the bytes present is refused before the
claimed memory is allocated.

Each file is forged in the test from a real one, with checksums that agree (an attacker
rewrites them). Peak memory is measured with tracemalloc, which sees Python and numpy
allocations; the model a forged architecture describes is torch memory, so there the test
checks that the architecture is never built anywhere but on the meta device.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import slimkit.io.artifact
import slimkit.zoo
from slimkit.core.errors import ModelLoadError
from slimkit.core.files import sha256_file
from slimkit.core.stages import StageContext
from slimkit.data.bundle import DataBundle
from slimkit.encode import EncodeConfig, pack, unpack
from slimkit.encode.codec import decode_raw, decode_shared, encode_shared
from slimkit.encode.slimfile import HEADER, MAX_MANIFEST_BYTES
from slimkit.encode.streams import decode_stream, encode_stream
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.loader import load_zoo
from slimkit.lowrank import LowRankConfig, lowrank
from slimkit.quant.qat import QatConfig, qat

MB = 1 << 20


def _peak(fn: Callable[[], object]) -> int:
    """Peak bytes traced while ``fn`` runs (it is expected to raise)."""
    tracemalloc.start()
    try:
        fn()
    except (ModelLoadError, ValueError):
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# --- artifacts ----------------------------------------------------------------------------

@pytest.fixture
def sparse_artifact(tmp_path: Path) -> Path:
    """A LeNet-300 artifact whose fc1 is 95% zeros, so it is stored as bitmask + values."""
    torch.manual_seed(0)
    model = load_zoo("lenet300", input_shape=(1, 8, 8), num_classes=10)
    with torch.no_grad():
        w = model.module.state_dict()["fc1.weight"]
        w[torch.rand_like(w) < 0.95] = 0
    return save_artifact(model, tmp_path / "a")


def _rechecksum(path: Path) -> None:
    mpath = path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for name in manifest["files"]:
        f = path / name
        manifest["files"][name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    mpath.write_text(json.dumps(manifest))


def test_a_sparse_shape_beyond_its_mask_is_refused_before_allocation(sparse_artifact: Path):
    wpath = sparse_artifact / "weights.safetensors"
    data = wpath.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    encoding = json.loads(header["__metadata__"]["slimkit_encoding"])
    assert "fc1.weight" in encoding  # the file really holds a bitmask tensor
    encoding["fc1.weight"]["shape"] = [50_000_000]  # 50M values from a 2.4 KB mask
    wpath.write_bytes(st_save(st_load(data), metadata={"slimkit_encoding":
                                                       json.dumps(encoding)}))
    _rechecksum(sparse_artifact)
    with pytest.raises(ModelLoadError) as err:
        load_artifact(sparse_artifact)
    assert str(err.value) == (
        f"'{wpath}': sparse tensor 'fc1.weight' claims shape [50000000] (50000000 values) but "
        "its mask holds 2400 bytes of torch.uint8; re-create the file")
    assert _peak(lambda: load_artifact(sparse_artifact)) < 4 * MB


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, list[int]]]]:
    """Every zoo build as (device, input_shape)."""
    seen: list[tuple[str, list[int]]] = []
    real = slimkit.zoo.build_model

    def spy(name, input_shape, num_classes, **kwargs):  # noqa: ANN001, ANN202
        seen.append((torch.get_default_device().type, list(input_shape)))
        return real(name, input_shape, num_classes, **kwargs)

    monkeypatch.setattr(slimkit.zoo, "build_model", spy)
    yield seen


def test_a_forged_architecture_is_never_allocated(sparse_artifact: Path, builds: list):
    mpath = sparse_artifact / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["architecture"]["input_shape"] = [1, 64, 64]  # fc1 would be 4096 x 300
    manifest["input_spec"]["shape"] = [1, 64, 64]
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError) as err:
        load_artifact(sparse_artifact)
    assert str(err.value) == (
        f"weights in '{sparse_artifact / 'weights.safetensors'}' do not fit the architecture: "
        "'fc1.weight' has shape [300, 64], the architecture needs [300, 4096]")
    assert builds == [("meta", [1, 64, 64])]


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, list[str]]]]:
    """Every transform replay that *succeeded* during artifact loading, as (device, kinds)."""
    seen: list[tuple[str, list[str]]] = []
    real = slimkit.io.artifact.replay_transforms

    def spy(module, transforms):  # noqa: ANN001, ANN202
        out = real(module, transforms)
        seen.append((next(out.parameters()).device.type, [t["kind"] for t in transforms]))
        return out

    monkeypatch.setattr(slimkit.io.artifact, "replay_transforms", spy)
    yield seen


def _lowrank_artifact(path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = load_zoo("lenet5", input_shape=(1, 8, 8), num_classes=10)
    out, rec = lowrank(model, LowRankConfig(rank="ratio", ratio=0.3, n_iter=15))
    assert "fc1" in rec.details["layers"]
    return save_artifact(out, path), out.module.eval()


def _packed_artifact(path: Path, digits: DataBundle, kind: str,
                     granularity: str) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = load_zoo("lenet300", digits)
    cfg = QatConfig(weight_quantizer=kind, weight_granularity=granularity, first_last_bits=8,
                    finetune={"max_steps": 2}, calib_samples=32)
    out, _ = qat(model, cfg, StageContext(data=digits, progress=False))
    assert [t["kind"] for t in out.arch["transforms"]] == ["quant_layers", "packed_quant"]
    return save_artifact(out, path), out.module.eval()


@pytest.mark.parametrize("case", ["lowrank", "binary/channel", "ternary/channel",
                                  "binary/tensor"])
def test_structural_artifacts_are_checked_on_meta_before_the_real_build(
        case: str, tmp_path: Path, digits: DataBundle, builds: list, replays: list):
    """Factorized and bit-packed artifacts rebuild on the meta device (structure only), so
    their sizes are checked against the weights before anything is allocated; the checked
    structure itself is then allocated (never the dense original first)."""
    if case == "lowrank":
        path, original = _lowrank_artifact(tmp_path / "a")
        x, kinds = torch.randn(3, 1, 8, 8), ["lowrank"]
    else:
        kind, granularity = case.split("/")
        path, original = _packed_artifact(tmp_path / "a", digits, kind, granularity)
        x, kinds = digits.x_test[:16], ["quant_layers", "packed_quant"]
    builds.clear()  # only the loading's builds count
    back = load_artifact(path)
    torch.testing.assert_close(back.module(x), original(x), rtol=0, atol=0)
    shape = list(back.input_shape)
    assert builds == [("meta", shape)]
    assert replays == [("meta", kinds)]
    assert all(not t.is_meta for t in back.module.state_dict().values())


def test_a_forged_factorized_architecture_is_never_allocated(tmp_path: Path, builds: list,
                                                             replays: list):
    """A lowrank artifact whose manifest claims a much larger model (input shape and plan
    rewritten to agree with each other) is refused by the shape check on meta."""
    path, _ = _lowrank_artifact(tmp_path / "a")
    mpath = path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    arch = manifest["architecture"]
    arch["input_shape"] = manifest["input_spec"]["shape"] = [1, 256, 256]
    fc1 = arch["transforms"][0]["plan"]["layers"]["fc1"]
    rank = fc1["rank"][0]
    fc1["shape"] = [500, 50 * 61 * 61]  # lenet5 on 256x256 (valid padding): 93M weights
    mpath.write_text(json.dumps(manifest))
    builds.clear()  # only the loading's builds count
    with pytest.raises(ModelLoadError) as err:
        load_artifact(path)
    assert str(err.value) == (
        f"weights in '{path / 'weights.safetensors'}' do not fit the architecture: "
        f"'fc1.0.weight' has shape [{rank}, 200], the architecture needs [{rank}, 186050]")
    assert builds == [("meta", [1, 256, 256])] and replays == [("meta", ["lowrank"])]
    assert _peak(lambda: load_artifact(path)) < 4 * MB


def test_an_architecture_that_cannot_be_checked_on_meta_is_refused(
        sparse_artifact: Path, builds: list, monkeypatch: pytest.MonkeyPatch):
    """A rebuild that needs real values would have to allocate before any size check:
    refused with one clear line instead of built unchecked."""
    def reads_values(module, transforms):  # noqa: ANN001, ANN202
        return module if float(next(module.parameters()).sum()) else module

    monkeypatch.setattr(slimkit.io.artifact, "replay_transforms", reads_values)
    with pytest.raises(ModelLoadError) as err:
        load_artifact(sparse_artifact)
    assert str(err.value).startswith("cannot check the architecture's size before building "
                                     "it: building it on the meta device failed (")
    assert str(err.value).endswith(f"refused rather than allocating what "
                                   f"'{sparse_artifact / 'manifest.json'}' describes")
    assert builds == [("meta", [1, 8, 8])]


# --- .slim files --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = load_zoo("lenet300", input_shape=(1, 8, 8), num_classes=10)
    path = tmp_path_factory.mktemp("slim") / "m.slim"
    pack(model, path, EncodeConfig(fc_bits=2, max_iter=0))
    return path


def _forge(src: Path, dst: Path, edit: Callable[[dict], bytes]) -> Path:
    """Rewrite ``src``'s manifest as ``edit(manifest)`` (deflated bytes) with a good sha256."""
    blob = src.read_bytes()
    magic, version, flags, length, _ = HEADER.unpack_from(blob)
    manifest = json.loads(zlib.decompress(blob[HEADER.size:HEADER.size + length]))
    text = edit(manifest)
    header = struct.pack("<8sHHI32s", magic, version, flags, len(text),
                         hashlib.sha256(text).digest())
    dst.write_bytes(header + text + blob[HEADER.size + length:])
    return dst


def test_a_manifest_bomb_is_refused_while_inflating(slim: Path, tmp_path: Path):
    pad = MAX_MANIFEST_BYTES + 32 * MB  # JSON allows trailing spaces: still a valid manifest
    bomb = _forge(slim, tmp_path / "bomb.slim",
                  lambda m: zlib.compress(json.dumps(m).encode() + b" " * pad, 9))
    assert bomb.stat().st_size < slim.stat().st_size + 64 * 1024
    with pytest.raises(ModelLoadError) as err:
        unpack(bomb)
    assert str(err.value) == (
        f"'{bomb}' cannot be loaded as a packed model: the manifest inflates to more than "
        f"{MAX_MANIFEST_BYTES} bytes (a decompression bomb?); refused")
    assert _peak(lambda: unpack(bomb)) < 1.25 * MAX_MANIFEST_BYTES + 4 * MB


def test_a_forged_tensor_shape_is_refused_before_decoding(slim: Path, tmp_path: Path):
    def grow(m: dict) -> bytes:
        fc1 = next(t for t in m["tensors"] if t["name"] == "fc1.weight")
        fc1["shape"] = [300, 100_000]  # 30M weights claimed for 19,200 coded ones
        return zlib.compress(json.dumps(m).encode())

    forged = _forge(slim, tmp_path / "forged.slim", grow)
    with pytest.raises(ModelLoadError) as err:
        unpack(forged)
    assert str(err.value) == (
        f"'{forged}' cannot be loaded as a packed model: its tensors do not fit the "
        "architecture: 'fc1.weight' has shape [300, 100000], the architecture needs [300, 64]")
    assert _peak(lambda: unpack(forged)) < 4 * MB


def test_manifest_entries_must_tile_the_payloads(slim: Path, tmp_path: Path):
    def overlap(m: dict) -> bytes:
        m["tensors"][1]["offset"] = 0  # decode the first payload a second time
        return zlib.compress(json.dumps(m).encode())

    forged = _forge(slim, tmp_path / "overlap.slim", overlap)
    with pytest.raises(ModelLoadError, match=r"malformed \(tensors\[1\]\.offset is 0, but the "
                                             r"payloads before it end at \d+\)"):
        unpack(forged)


def test_raw_shapes_are_counted_without_overflow():
    # numpy's int64 product of [2**32, 2**32] wraps to 0, which an empty payload "matches"
    with pytest.raises(ValueError, match=r"implausible shape \[4294967296, 4294967296\]"):
        decode_raw(b"", {"encoding": "raw", "shape": [2**32, 2**32], "dtype": "float32"})


def test_shared_counts_beyond_the_tensor_are_refused_before_allocation():
    weight = torch.tensor([[0.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 2.0]])
    payload, meta, _ = encode_shared(weight, 3, coder="huffman", positions_mode="offsets")
    assert torch.equal(decode_shared(payload, meta), weight)
    meta["entries"] = 20_000_000  # for a tensor of 8 values
    with pytest.raises(ValueError, match="counts do not fit a tensor of 8: 4 non-zeros, "
                                         "20000000 entries, 2 clusters"):
        decode_shared(payload, meta)
    assert _peak(lambda: decode_shared(payload, meta)) < MB


def test_a_huffman_count_beyond_its_bits_is_refused_before_allocation():
    coder, data = encode_stream(np.array([0, 1, 1, 0, 2]), "huffman")
    assert coder == "huffman"
    with pytest.raises(ValueError, match="cannot hold 20000000 Huffman codes"):
        decode_stream(data, coder, 20_000_000)
    assert _peak(lambda: decode_stream(data, coder, 20_000_000)) < MB
