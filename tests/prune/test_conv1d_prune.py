"""GPT-2 as it comes in the stages that edit weights in place (gradual_prune, sparse_train,
encode) and in the ``.slim`` file; its tied LM head in the pruners and in mixed_precision/qat.

The Conv1D layers are converted to Linear (one recorded transform, replayed on loading); the
tied head is left as it is by default, because pruning or clustering it would change the
embedding too (one matrix); named exactly, it is changed and the record says the embedding
changed with it. Quantizers that keep the float matrix for the embedding count no bytes freed.

References: the float64 original (conversion is the same math), the original embedding bit for
bit (the skip really skipped it), an independent magnitude mask, artifacts and ``.slim`` files
read back bit for bit, and the bytes the state dict really holds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from slimkit.core.errors import ModelLoadError
from slimkit.core.stages import STAGES, StageContext
from slimkit.data.bundle import DataBundle
from slimkit.io import batch as B
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.linear import TRANSFORM, conv1d_layers, prepare_layers

transformers = pytest.importorskip("transformers")

from tests.quant.test_conv1d import CONV1D, _data, _gpt2  # noqa: E402

TRAIN = {"max_steps": 4, "batch_size": 16}
CONVERTED = "converted 8 Conv1D layers to Linear (same math: weight transposed)"


@pytest.fixture(scope="module")
def gpt2() -> Any:
    return _gpt2()


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return _data()


def _ctx(data: DataBundle) -> StageContext:
    return StageContext(data=data, progress=False)


def _apply(kind: str, model: Any, overrides: dict, data: DataBundle) -> tuple[Any, Any]:
    spec = STAGES.get(kind)
    return spec.apply(model.copy(), spec.config.model_validate(overrides), _ctx(data))


def _logits(module: torch.nn.Module, x: Any) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return B.call(module, x).logits


def _state_bytes(module: torch.nn.Module) -> int:
    """Bytes the state dict holds, each storage once (a tied matrix counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in module.state_dict().values() if t.numel()}
    return sum(storages.values())


def _zeros(w: torch.Tensor) -> int:
    return int((w == 0).sum())


STAGE_CASES = {
    "gradual_prune": {"final_sparsity": 0.5, "frequency": 1, "scope": "layer", "train": TRAIN},
    "sparse_train": {"sparsity": 0.5, "update_every": 2, "distribution": "uniform",
                     "train": TRAIN},
    "encode": {"fc_bits": 4},
}


@pytest.mark.parametrize("kind", sorted(STAGE_CASES))
def test_conversion_is_the_same_math_and_leaves_the_tied_pair_out(kind: str, gpt2: Any,
                                                                   data: DataBundle):
    spec = STAGES.get(kind)
    cfg = spec.config.model_validate(STAGE_CASES[kind])
    model, cfg2, prep = prepare_layers(gpt2, cfg, kind, in_place="pruned")
    assert prep.converted == CONV1D and conv1d_layers(model.module) == []
    assert conv1d_layers(gpt2.module) == CONV1D  # the input is left as it was
    assert cfg2.exclude == ["transformer.wte", "lm_head"]
    x = B.take(data.x_test, slice(0, 4))
    ref = _logits(copy.deepcopy(gpt2.module).double(), x)
    got = _logits(copy.deepcopy(model.module).double(), x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def _check_stage_effect(kind: str, out: Any, record: Any) -> None:
    """What the stage did to each converted layer, from the weights themselves."""
    for name in CONV1D:
        w = out.module.get_submodule(name).weight
        if kind == "gradual_prune":  # scope=layer: each layer at the final ratio
            assert _zeros(w) == round(0.5 * w.numel()), name
            assert record.details["layers"][name]["sparsity_after"] == _zeros(w) / w.numel()
        elif kind == "sparse_train":  # uniform: each layer at half density, mask applied
            assert record.details["layers"][name]["active"] == round(0.5 * w.numel())
            assert _zeros(w) >= w.numel() - record.details["layers"][name]["active"]
        else:  # 4-bit clustering: at most 16 distinct non-zero values
            assert torch.unique(w[w != 0]).numel() <= 16, name


@pytest.mark.parametrize("kind", sorted(STAGE_CASES))
def test_stage_covers_conv1d_and_round_trips(kind: str, gpt2: Any, data: DataBundle,
                                             tmp_path: Path):
    out, record = _apply(kind, gpt2, STAGE_CASES[kind], data)
    assert record.details[TRANSFORM] == CONV1D and record.changed[0] == CONVERTED
    # Weights change in place: the conversion is the one structural transform.
    assert out.arch["transforms"] == [{"kind": TRANSFORM, "version": 1,
                                       "plan": {"layers": CONV1D}}]
    assert sorted(record.details["layers"]) == sorted(CONV1D)
    _check_stage_effect(kind, out, record)
    # The tied head was left out, with the reason, and the embedding is not pruned (the
    # training stages train it, encode leaves it bit for bit).
    why = {s["what"]: s["why"] for s in record.skipped}
    verb = "clustered" if kind == "encode" else "pruned"
    assert why["lm_head"] == (f"weight shared with transformer.wte (tied): {kind} would change "
                              "transformer.wte too (one matrix); left unchanged (name the "
                              f"layer in include to have both {verb})")
    assert out.module.lm_head.weight is out.module.transformer.wte.weight
    assert _zeros(out.module.transformer.wte.weight) == 0
    if kind == "encode":
        torch.testing.assert_close(out.module.transformer.wte.weight,
                                   gpt2.module.transformer.wte.weight, rtol=0, atol=0)
    # The artifact rebuilds GPT-2, replays the conversion, loads the weights: bit for bit.
    save_artifact(out, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    assert conv1d_layers(back.module) == []
    assert back.module.lm_head.weight is back.module.transformer.wte.weight
    x = B.take(data.x_test, slice(0, 8))
    torch.testing.assert_close(_logits(back.module, x), _logits(out.module, x), rtol=0, atol=0)


def _header_version(blob: bytes) -> int:
    from slimkit.encode.slimfile import HEADER

    return HEADER.unpack_from(blob)[1]


def test_encoded_gpt2_packs_losslessly_and_unpacks_bit_exactly(gpt2: Any, data: DataBundle,
                                                               tmp_path: Path):
    from slimkit.encode.slimfile import pack, unpack

    out, record = _apply("encode", gpt2, STAGE_CASES["encode"], data)
    report = pack(out, tmp_path / "g.slim")
    # Every clustered layer is stored exactly; the measured size is the file's.
    assert report["clustered_at_pack"] == []
    assert report["bytes"] == record.details["packed"]["bytes"]
    assert report["bytes"] == (tmp_path / "g.slim").stat().st_size
    assert report["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    back = unpack(tmp_path / "g.slim")
    assert conv1d_layers(back.module) == []
    assert back.module.lm_head.weight is back.module.transformer.wte.weight
    want = out.module.state_dict()
    got = back.module.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_gpt2_as_it_comes_packs_once_per_matrix_and_unpacks_bit_exactly(gpt2: Any,
                                                                        tmp_path: Path):
    from slimkit.encode.config import EncodeConfig
    from slimkit.encode.slimfile import pack, read_packed, unpack

    cfg = EncodeConfig(fc_bits=4)
    report = pack(gpt2, tmp_path / "raw.slim", cfg)
    # Conv1D layers count as Linear (clustered here, lossy and said so); the tied head is
    # stored raw with the reason, and the tied matrix once, under its first name.
    assert report["clustered_at_pack"] == [f"{n}.weight" for n in CONV1D]
    assert [s["what"] for s in report["skipped"]] == ["lm_head"]
    assert report["skipped"][0]["why"].startswith("weight shared with transformer.wte (tied)")
    assert report["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    state = gpt2.module.state_dict()
    assert "lm_head.weight" not in report["tensors"] and len(report["tensors"]) == len(state) - 1
    assert report["ratio"] > 1.5  # the embedding stored twice made the file larger than float
    blob = (tmp_path / "raw.slim").read_bytes()
    assert _header_version(blob) == 2
    from slimkit.encode.cli import pack_summary

    lines = pack_summary(report)
    assert "tied: lm_head.weight is transformer.wte.weight (one matrix, stored once)" in lines
    assert f"stored raw: lm_head: {report['skipped'][0]['why']}" in lines
    back = unpack(tmp_path / "raw.slim")
    assert conv1d_layers(back.module) == CONV1D  # the file keeps the layers as they were
    assert back.module.lm_head.weight is back.module.transformer.wte.weight
    _, decoded = read_packed(tmp_path / "raw.slim")
    got = back.module.state_dict()
    assert set(decoded) == set(got)  # the tied name is filled in from the stored one
    for key, value in state.items():
        # What the file holds is what loads; raw tensors are the original bit for bit.
        torch.testing.assert_close(got[key], decoded[key], rtol=0, atol=0, msg=key)
        if key.removesuffix(".weight") not in CONV1D:
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
        else:
            assert torch.unique(got[key][got[key] != 0]).numel() <= 16, key
    # Packing what was read back clusters nothing more and writes the same bytes.
    again = pack(back, tmp_path / "again.slim", cfg)
    assert again["clustered_at_pack"] == []
    assert (tmp_path / "again.slim").read_bytes() == blob


def _rewrite(blob: bytes, edit: Any, version: int | None = None) -> bytes:
    """The file with its manifest edited (and its header made consistent again)."""
    from slimkit.encode.slimfile import FLAG_DEFLATED, HEADER, MAGIC

    _, old_version, _, length, _ = HEADER.unpack_from(blob)
    manifest = json.loads(zlib.decompress(blob[HEADER.size:HEADER.size + length]))
    edit(manifest)
    text = zlib.compress(json.dumps(manifest).encode(), 9)
    header = HEADER.pack(MAGIC, old_version if version is None else version, FLAG_DEFLATED,
                         len(text), hashlib.sha256(text).digest())
    return header + text + blob[HEADER.size + length:]


@pytest.mark.parametrize(("edit", "version", "message"), [
    (lambda m: m["tied"].update({"lm_head.weight": "nope.weight"}), None,
     "tied['lm_head.weight'] must name a stored tensor, under a name not stored itself"),
    (lambda m: m["tied"].update({"transformer.wpe.weight": "transformer.wte.weight"}), None,
     "tied['transformer.wpe.weight'] must name a stored tensor"),
    (lambda m: None, 1, "tied is a version 2 key, in a version 1 file"),
    (lambda m: m.pop("tied"), None, "do not fit the architecture"),
])
def test_a_damaged_tied_map_is_refused(gpt2: Any, tmp_path: Path, edit: Any,
                                       version: int | None, message: str):
    from slimkit.encode.config import EncodeConfig
    from slimkit.encode.slimfile import pack_bytes, unpack

    blob, _ = pack_bytes(gpt2, EncodeConfig(layer_types=["Conv1d"]))  # nothing clustered
    path = tmp_path / "bad.slim"
    path.write_bytes(_rewrite(blob, edit, version))
    with pytest.raises(ModelLoadError, match="cannot be loaded as a packed model") as err:
        unpack(path)
    assert message in str(err.value), str(err.value)


def test_a_model_without_ties_still_writes_version_1(data: DataBundle):
    from slimkit.api import wrap
    from slimkit.encode.slimfile import pack_bytes

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    blob, report = pack_bytes(wrap(net, torch.zeros(1, 4)))
    assert _header_version(blob) == 1 and report["tied"] == {}


# ---- the tied head in the pruners -------------------------------------------------------

PRUNERS = {"magnitude_prune": {"sparsity": 0.3}, "nm_prune": {}}


@pytest.mark.parametrize("kind", sorted(PRUNERS))
def test_pruners_leave_the_tied_head_by_default(kind: str, gpt2: Any, data: DataBundle):
    out, record = _apply(kind, gpt2, PRUNERS[kind], data)
    assert sorted(record.details["layers"]) == sorted(CONV1D)
    why = {s["what"]: s["why"] for s in record.skipped}
    assert why["lm_head"].startswith(f"weight shared with transformer.wte (tied): {kind} would "
                                     "change transformer.wte too (one matrix)")
    torch.testing.assert_close(out.module.transformer.wte.weight,
                               gpt2.module.transformer.wte.weight, rtol=0, atol=0)


def _magnitude_reference(w: torch.Tensor, n_zero: int) -> torch.Tensor:
    """``w`` with its ``n_zero`` smallest magnitudes zeroed, in float64 (ties by position)."""
    flat = w.detach().double().flatten().clone()
    flat[torch.sort(flat.abs(), stable=True).indices[:n_zero]] = 0
    return flat.view_as(w)


def _nm_reference(w: torch.Tensor) -> torch.Tensor:
    """2:4 along the input dimension, group by group, in float64."""
    out = w.detach().double().clone()
    for row in out:
        for g in range(0, row.numel(), 4):
            group = row[g:g + 4]
            drop = torch.sort(group.abs(), descending=True, stable=True).indices[2:]
            group[drop] = 0
    return out


@pytest.mark.parametrize("kind", sorted(PRUNERS))
def test_a_named_tied_head_is_pruned_with_its_embedding_and_says_so(kind: str, gpt2: Any,
                                                                     data: DataBundle):
    out, record = _apply(kind, gpt2, {**PRUNERS[kind], "include": ["lm_head"]}, data)
    assert list(record.details["layers"]) == ["lm_head"]
    assert ("lm_head: weight shared with transformer.wte (tied) and named in include: "
            "transformer.wte is pruned with it (one matrix)") in record.changed
    w0 = gpt2.module.lm_head.weight
    ref = (_magnitude_reference(w0, round(0.3 * w0.numel())) if kind == "magnitude_prune"
           else _nm_reference(w0))
    head, emb = out.module.lm_head.weight, out.module.transformer.wte.weight
    assert head is emb  # still one matrix: the embedding is pruned too
    torch.testing.assert_close(emb.double(), ref, rtol=0, atol=0)


def test_both_names_of_the_tied_matrix_prune_it_once(gpt2: Any, data: DataBundle):
    cfg = {"sparsity": 0.3, "scope": "global", "layer_types": ["Linear", "Embedding"],
           "include": ["transformer.wte", "lm_head"]}
    out, record = _apply("magnitude_prune", gpt2, cfg, data)
    assert list(record.details["layers"]) == ["transformer.wte"]
    assert {"what": "lm_head", "why": "the same matrix as transformer.wte (tied), also named in "
            "include: pruned once, through transformer.wte"} in record.skipped
    assert ("transformer.wte: weight shared with lm_head (tied) and named in include: lm_head "
            "is pruned with it (one matrix)") in record.changed
    w = out.module.transformer.wte.weight
    assert _zeros(w) == round(0.3 * w.numel())


# ---- honest bytes of a named tied head in mixed_precision and qat ------------------------

NAMED = ["lm_head", "re:transformer\\.h\\..*"]
CONV1D_FLOAT_BYTES = 4 * (2 * 32 * 96 + 2 * 32 * 32 + 2 * 32 * 128 + 2 * 128 * 32)


def test_mixed_precision_counts_no_float_bytes_for_a_named_tied_head(gpt2: Any,
                                                                     data: DataBundle):
    base = {"policy": "fallback", "max_accuracy_drop": 1e9, "bits": [8], "calib_samples": 32}
    out, rec = _apply("mixed_precision", gpt2, {**base, "include": NAMED}, data)
    head = rec.details["layers"]["lm_head"]
    assert head["bits"] == 8 and head["float_bytes"] == 0
    assert head["shared_with"] == ["transformer.wte"]
    assert head["bytes"] == 256 * 32 + 4 * 256  # int8 codes + a float32 scale per row
    ach = rec.details["achieved"]
    assert ach["float_weight_bytes"] == CONV1D_FLOAT_BYTES
    assert ach["weight_bytes"] == sum(r["bytes"] for r in rec.details["layers"].values())
    # The quantized head adds its codes to the model and frees nothing.
    plain, _ = _apply("mixed_precision", gpt2, base, data)
    assert _state_bytes(out.module) > _state_bytes(plain.module)
    assert out.module.transformer.wte.weight.dtype == torch.float32
    # Under a size budget the allocator keeps it float: quantizing it would only add bytes.
    sized, rec2 = _apply("mixed_precision", gpt2, {"policy": "size", "size_ratio": 0.5,
                                                   "bits": [8, 4], "calib_samples": 32,
                                                   "include": NAMED}, data)
    assert rec2.details["layers"]["lm_head"]["bits"] is None
    why = {s["what"]: s["why"] for s in rec2.skipped}
    assert why["lm_head"].endswith("(weight shared with transformer.wte: quantizing it would "
                                   "add 5,120 bytes and free none)"), why["lm_head"]
    assert not any(c.startswith("lm_head: weight shared with transformer.wte (tied) and named")
                   for c in rec2.changed)


def test_qat_counts_no_float_bytes_for_a_named_tied_head(gpt2: Any, data: DataBundle):
    base = {"finetune": {"max_steps": 1, "batch_size": 16}, "calib_samples": 32}
    out, rec = _apply("qat", gpt2, {**base, "include": NAMED}, data)
    head = rec.details["layers"]["lm_head"]
    assert head["float_bytes"] == 0 and head["shared_with"] == ["transformer.wte"]
    assert any(c.startswith("lm_head:") and c.endswith(
        f"0 -> {head['bytes']:,} bytes [weight shared with transformer.wte: its float matrix "
        "stays]") for c in rec.changed)
    # The other layers free their float weights; the head frees none and adds its codes.
    rows = {n: r for n, r in rec.details["layers"].items() if n != "lm_head"}
    assert sum(r["float_bytes"] for r in rows.values()) == CONV1D_FLOAT_BYTES
    plain, _ = _apply("qat", gpt2, base, data)
    assert _state_bytes(out.module) - _state_bytes(plain.module) >= head["bytes"]
