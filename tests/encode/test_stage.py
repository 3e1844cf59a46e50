"""The encode stage inside a recipe, and the pack/unpack command functions."""

from pathlib import Path

import pytest
import torch

from slimkit.core.errors import ConfigError, ModelLoadError, OutputExistsError
from slimkit.encode import pack_bytes, read_packed
from slimkit.encode.cli import pack_command, unpack_command
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.loader import load_zoo
from slimkit.pipeline import compress, load_recipe

MEASURE = {"threads": 1, "batch_sizes": [1, 4], "warmup": 1, "repeats": 2}


def test_encode_stage_after_pruning_in_compress(mlp, digits, tmp_path: Path):
    recipe = load_recipe({"stages": [
        {"kind": "magnitude_prune", "sparsity": 0.8, "finetune": {"epochs": 1, "lr": 3e-3}},
        {"kind": "encode", "fc_bits": 3, "index_bits_fc": 4,
         "finetune": {"epochs": 1, "lr": 1e-3}},
    ], "measure": MEASURE})
    report = compress(mlp, digits, recipe, tmp_path / "out", keep_checkpoints=True,
                      progress=False, log=lambda s: None)
    pruned = load_artifact(tmp_path / "out" / ".slimkit-run" / "stage-00", template=mlp.module)
    final = load_artifact(tmp_path / "out" / "model", template=mlp.module)
    stage = report["stages"][1]
    assert stage["kind"] == "encode" and stage["config"]["fc_bits"] == 3
    for name in ("1", "3", "5"):
        w = dict(final.module.named_modules())[name].weight
        w0 = dict(pruned.module.named_modules())[name].weight
        assert torch.equal(w == 0, w0 == 0)  # pruned weights stay exactly zero
        assert torch.unique(w[w != 0]).numel() <= 8
    packed = stage["details"]["packed"]
    assert packed["bytes"] == len(pack_bytes(final, recipe.stages[1])[0])
    assert packed["bytes"] == (packed["header_bytes"] + packed["manifest_bytes"]
                               + sum(packed["layers"].values()))
    assert packed["ratio"] > 15
    assert packed["entropy_bits_per_weight"] <= packed["stream_bits_per_weight"]
    assert stage["details"]["finetune"]["steps"] > 0
    assert stage["changed"][-1].startswith("packed .slim:")
    pruned_top1 = report["stages"][0]["measure"]["accuracy"]["top1"]
    assert report["final"]["accuracy"]["top1"] > pruned_top1 - 0.03 and pruned_top1 > 0.8
    assert report["parity"]["ok"]


def test_encode_config_is_validated_in_recipes():
    with pytest.raises(ConfigError, match="conv_bits"):
        load_recipe({"stages": [{"kind": "encode", "conv_bits": 9}]})
    with pytest.raises(ConfigError, match="Did you mean 'fc_bits'"):
        load_recipe({"stages": [{"kind": "encode", "fc_bit": 4}]})
    with pytest.raises(ConfigError, match="coder"):
        load_recipe({"stages": [{"kind": "encode", "coder": "zip"}]})


def test_pack_and_unpack_commands(digits, tmp_path: Path):
    torch.manual_seed(0)
    model = load_zoo("lenet300", digits)
    art = save_artifact(model, tmp_path / "art")
    report = pack_command(str(art), tmp_path / "m.slim", bits=4, overwrite=False,
                          data=None)
    assert report["bytes"] == (tmp_path / "m.slim").stat().st_size
    assert len(report["clustered_at_pack"]) == 3 and report["ratio"] > 4
    out = unpack_command(tmp_path / "m.slim", tmp_path / "back", overwrite=False)
    back = load_artifact(out["artifact"])
    _, state = read_packed(tmp_path / "m.slim")
    for name, tensor in back.module.state_dict().items():
        assert torch.equal(tensor, state[name])
    assert torch.unique(back.module.fc1.weight).numel() <= 16
    with pytest.raises(OutputExistsError):
        unpack_command(tmp_path / "m.slim", tmp_path / "back", overwrite=False)
    with pytest.raises(ConfigError, match="--bits"):
        pack_command(str(art), tmp_path / "x.slim", bits=9, overwrite=False, data=None)
    with pytest.raises(ModelLoadError, match="not a .slim file"):
        unpack_command(art / "manifest.json", tmp_path / "y", overwrite=False)
