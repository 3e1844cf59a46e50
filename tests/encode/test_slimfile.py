"""The .slim file: bit-exact round trip, sizes, and clear errors for damaged files."""

import hashlib
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from tests._stages import stage_on

from slimkit.core.errors import ModelLoadError, OutputExistsError
from slimkit.encode import EncodeConfig, cluster_weights, pack, pack_bytes, read_packed, unpack
from slimkit.encode.codec import decode_raw, encode_raw
from slimkit.encode.slimfile import HEADER
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.prune.magnitude import MagnitudePruneConfig, magnitude_prune

CFG = EncodeConfig(conv_bits=6, fc_bits=4, index_bits_conv=4, index_bits_fc=3)


@pytest.fixture(scope="module")
def lenet(digits) -> SlimModel:
    """A small LeNet-5 (8x8 inputs), pruned 80% per layer and clustered."""
    torch.manual_seed(0)
    model = load_zoo("lenet5", digits)
    pruned, _ = stage_on(magnitude_prune, model.module,
                         MagnitudePruneConfig(sparsity=0.8, scope="layer"))
    clustered, _ = cluster_weights(pruned, CFG)
    return model.copy(clustered.eval())


@pytest.fixture(scope="module")
def packed(lenet, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("slim") / "lenet.slim"
    return path, pack(lenet, path, CFG)


def test_round_trip_is_bit_exact_with_equal_outputs(lenet, packed, digits):
    path, report = packed
    loaded = unpack(path)
    state = loaded.module.state_dict()
    for name, tensor in lenet.module.state_dict().items():
        assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name]), name
    x = digits.x_test[:32]
    assert torch.equal(lenet.module(x), loaded.module(x))
    assert loaded.arch == lenet.arch and loaded.input_shape == lenet.input_shape
    assert [p.name for p in path.parent.iterdir()] == ["lenet.slim"]  # no temporary left


def test_a_structurally_pruned_model_round_trips(digits, tmp_path):
    """The .slim architecture replays the recorded transforms (pruned channels), as artifacts
    do: a pruned model packs and unpacks to the same outputs."""
    from slimkit.prune import StructuredPruneConfig, structured_prune

    torch.manual_seed(0)
    dense = load_zoo("lenet5", digits)
    small, _ = structured_prune(dense, StructuredPruneConfig(ratio=0.4))
    clustered, _ = cluster_weights(small.module, CFG)
    model = small.copy(clustered.eval())
    pack(model, tmp_path / "p.slim", CFG)
    loaded = unpack(tmp_path / "p.slim")
    x = digits.x_test[:16]
    assert (loaded.module.conv1.out_channels == model.module.conv1.out_channels
            < dense.module.conv1.out_channels)
    assert torch.equal(loaded.module(x), model.module(x))


def test_report_accounts_for_every_byte(lenet, packed):
    path, report = packed
    assert report["bytes"] == path.stat().st_size == len(pack_bytes(lenet, CFG)[0])
    assert report["bytes"] == (report["header_bytes"] + report["manifest_bytes"]
                               + sum(report["layers"].values()))
    assert set(report["layers"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert sum(report["breakdown"].values()) == report["bytes"]
    assert report["float32_bytes"] == 4 * sum(p.numel() for p in lenet.module.parameters())
    assert report["ratio"] == pytest.approx(report["float32_bytes"] / report["bytes"])
    assert report["clustered_at_pack"] == []
    for name in ("conv1.weight", "fc1.weight"):
        t = report["tensors"][name]
        assert t["encoding"] == "shared"
        assert t["stream_bits_per_weight"] >= t["entropy_bits_per_weight"] - 1e-9
        assert t["stream_bits_per_weight"] < t["entropy_bits_per_weight"] + 1.0
    assert report["tensors"]["fc1.bias"]["encoding"] == "raw"
    with pytest.raises(OutputExistsError):
        pack(lenet, path, CFG)


def test_coders_and_unclustered_layers(lenet, digits, tmp_path):
    blobs = {}
    for coder in ("huffman", "ans", "auto"):
        blobs[coder] = pack(lenet, tmp_path / f"{coder}.slim", CFG.model_copy(
            update={"coder": coder}))
        coders = {c for t in blobs[coder]["tensors"].values() for c in t.get("coders", [])}
        assert coders <= {coder, "none"} or coder == "auto"
        loaded = unpack(tmp_path / f"{coder}.slim")
        assert torch.equal(loaded.module.fc1.weight, lenet.module.fc1.weight)
    assert blobs["auto"]["payload_bytes"] <= min(blobs["huffman"]["payload_bytes"],
                                                 blobs["ans"]["payload_bytes"])
    fresh = load_zoo("lenet5", digits)  # not clustered: pack clusters it, and says so
    report = pack(fresh, tmp_path / "fresh.slim", CFG)
    assert set(report["clustered_at_pack"]) == {"conv1.weight", "conv2.weight", "fc1.weight",
                                                "fc2.weight"}
    w = unpack(tmp_path / "fresh.slim").module.fc1.weight
    assert torch.unique(w).numel() <= 16


@pytest.mark.parametrize("tensor", [torch.arange(6).reshape(2, 3), torch.tensor(2.5),
                                    torch.tensor([True, False]), torch.randn(3).half(),
                                    torch.zeros(0, 4)])
def test_raw_tensors_of_any_dtype_round_trip(tensor):
    data, meta = encode_raw(tensor)
    out = decode_raw(data, meta)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape and torch.equal(out, tensor)


def test_a_model_without_architecture_needs_a_template(mlp, tmp_path):
    path = tmp_path / "mlp.slim"
    pack(mlp, path)
    with pytest.raises(ModelLoadError, match="template"):
        unpack(path)
    loaded = unpack(path, template=mlp.module)
    x = mlp.example_inputs(4)[0]
    assert torch.equal(loaded.module(x), pack_and_cluster_reference(mlp)(x))


def pack_and_cluster_reference(mlp):
    """What pack stores for an unclustered MLP: its layers clustered at pack time."""
    return cluster_weights(mlp.module, EncodeConfig(max_iter=100))[0]


# --- damaged files --------------------------------------------------------------------------

def _damaged(src: Path, tmp_path: Path, edit) -> Path:
    blob = bytearray(src.read_bytes())
    out = tmp_path / "damaged.slim"
    out.write_bytes(bytes(edit(blob)))
    return out


def _layout(path: Path) -> tuple[int, int]:
    """(manifest length, total payload bytes)."""
    length = HEADER.unpack_from(path.read_bytes())[3]
    return length, path.stat().st_size - HEADER.size - length


def _expect(path: Path, pattern: str) -> str:
    with pytest.raises(ModelLoadError) as err:
        unpack(path)
    message = str(err.value)
    assert str(path) in message and pattern in message, message
    return message


@pytest.mark.parametrize("where", ["empty", "magic", "header", "manifest_start",
                                   "manifest_mid", "payload_start", "payload_mid", "last_byte"])
def test_truncated_files_are_refused(packed, tmp_path, where):
    path = packed[0]
    m, p = _layout(path)
    cut = {"empty": 0, "magic": 5, "header": 30, "manifest_start": HEADER.size,
           "manifest_mid": HEADER.size + m // 2, "payload_start": HEADER.size + m,
           "payload_mid": HEADER.size + m + p // 2, "last_byte": HEADER.size + m + p - 1}[where]
    _expect(_damaged(path, tmp_path, lambda b: b[:cut]), "truncated")


@pytest.mark.parametrize(("offset", "pattern"), [
    (0, "wrong magic"), (3, "wrong magic"), (8, "format version"), (11, "flags"),
    (12, "manifest"), (20, "manifest is corrupted"), (47, "manifest is corrupted"),
    (HEADER.size + 1, "manifest is corrupted"), (-60, "manifest is corrupted")])
def test_flipped_bytes_in_header_and_manifest(packed, tmp_path, offset, pattern):
    path = packed[0]
    m, _ = _layout(path)
    at = HEADER.size + m + offset if offset < 0 else offset

    def flip(b: bytearray) -> bytearray:
        b[at] ^= 0x40
        return b

    _expect(_damaged(path, tmp_path, flip), pattern)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 0.999])
def test_flipped_payload_bytes_name_the_tensor(packed, tmp_path, fraction):
    path = packed[0]
    m, p = _layout(path)
    at = HEADER.size + m + int(fraction * (p - 1))

    def flip(b: bytearray) -> bytearray:
        b[at] ^= 0x01
        return b

    message = _expect(_damaged(path, tmp_path, flip), "is corrupted (sha256 mismatch)")
    assert "tensor '" in message


def test_wrong_files_and_trailing_bytes(packed, tmp_path):
    path = packed[0]
    _expect(_damaged(path, tmp_path, lambda b: b + b"\0"), "longer than its manifest")
    json_file = tmp_path / "manifest.json"
    json_file.write_text(json.dumps({"format": "slimkit-artifact"}) * 3)
    _expect(json_file, "wrong magic")
    with pytest.raises(ModelLoadError, match="does not exist"):
        read_packed(tmp_path / "missing.slim")


def test_consistent_checksums_but_wrong_metadata_never_load_silently(lenet, packed, tmp_path):
    """A file re-checksummed after tampering with the manifest still fails to decode."""
    path = packed[0]
    blob = path.read_bytes()
    m, _ = _layout(path)
    manifest = json.loads(zlib.decompress(blob[HEADER.size:HEADER.size + m]))
    target = next(t for t in manifest["tensors"] if t["name"] == "fc1.weight")
    target["nonzero"] -= 1
    text = zlib.compress(json.dumps(manifest).encode())
    header = struct.pack("<8sHHI32s", blob[:8], 1, 1, len(text), hashlib.sha256(text).digest())
    out = tmp_path / "tampered.slim"
    out.write_bytes(header + text + blob[HEADER.size + m:])
    assert "fc1.weight" in _expect(out, "does not decode")
    target["nonzero"] += 1
    manifest["architecture"] = {"zoo": "lenet5", "input_shape": [1, 2, 2], "num_classes": 10}
    text = json.dumps(manifest).encode()  # flags 0: a plain, uncompressed manifest
    header = struct.pack("<8sHHI32s", blob[:8], 1, 0, len(text), hashlib.sha256(text).digest())
    out.write_bytes(header + text + blob[HEADER.size + m:])
    assert torch.equal(read_packed(out)[1]["fc1.weight"], lenet.module.fc1.weight)
    _expect(out, "cannot be rebuilt")
