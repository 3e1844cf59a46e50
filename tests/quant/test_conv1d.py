"""GPT-2 as it comes: its Hugging Face Conv1D layers (weight ``[in, out]``) are covered by the
techniques that select layers by type, through one recorded Conv1D -> Linear transform; its
tied LM head is left float (the embedding keeps the float matrix) unless named.

References: the float64 original (conversion is the same math), the float model (cosine of
the compressed logits), the artifact written and read back (bit for bit), and the bytes the
state dict really holds (unique storages, tied tensors once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from slimkit.core.errors import ConfigError
from slimkit.core.stages import STAGES, StageContext
from slimkit.data.bundle import DataBundle
from slimkit.io import batch as B
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.linear import TRANSFORM, conv1d_layers, prepare_layers, shared_weights
from slimkit.io.model import SlimModel

transformers = pytest.importorskip("transformers")

VOCAB = 256
# 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
CONV1D = [f"transformer.h.{i}.{p}" for i in range(2)
          for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def _gpt2() -> SlimModel:
    from slimkit.api import wrap

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return wrap(transformers.GPT2LMHeadModel(config).eval(), name="gpt2_tiny")


def _data() -> DataBundle:
    gen = torch.Generator().manual_seed(1)

    def x(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (n, 16), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return DataBundle("synthetic-lm", x(64), torch.zeros(64, dtype=torch.long), x(16),
                      torch.zeros(16, dtype=torch.long), 0, task="causal_lm")


@pytest.fixture(scope="module")
def gpt2() -> SlimModel:
    return _gpt2()


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return _data()


def _logits(module: torch.nn.Module, x: Any) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return B.call(module, x).logits


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(),
                                                       b.double().flatten(), dim=0))


def _state_bytes(module: torch.nn.Module) -> int:
    """Bytes the state dict holds, each storage once (a tied matrix counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in module.state_dict().values() if t.numel()}
    return sum(storages.values())


def test_gpt2_as_it_comes_has_conv1d_layers_and_a_tied_head(gpt2: SlimModel):
    assert conv1d_layers(gpt2.module) == CONV1D
    assert shared_weights(gpt2.module) == {"transformer.wte": ["lm_head"],
                                           "lm_head": ["transformer.wte"]}


def test_conversion_is_the_same_math_in_float64(gpt2: SlimModel, data: DataBundle):
    from slimkit.quant.config import WeightOnlyConfig

    model, cfg, prep = prepare_layers(gpt2, WeightOnlyConfig(bits=4), "weight_only_quant")
    assert prep.converted == CONV1D
    assert conv1d_layers(model.module) == []
    assert conv1d_layers(gpt2.module) == CONV1D  # the input is left as it was
    for name in CONV1D:
        lin = model.module.get_submodule(name)
        assert type(lin) is torch.nn.Linear
        torch.testing.assert_close(lin.weight, gpt2.module.get_submodule(name).weight.t(),
                                   rtol=0, atol=0)
    # The tied head (and its embedding) are left out, with nothing else excluded.
    assert cfg.exclude == ["transformer.wte", "lm_head"]
    x = B.take(data.x_test, slice(0, 4))
    import copy

    ref = _logits(copy.deepcopy(gpt2.module).double(), x)
    got = _logits(copy.deepcopy(model.module).double(), x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


# kind, config, min cosine of the logits against float, whether the tied head is skipped
CASES = {
    "ptq": ("ptq", {"num_samples": 32}, 0.99, True),
    "dynamic_quant": ("dynamic_quant", {}, 0.99, True),
    "weight_only_int4_rtn": ("weight_only_quant", {"bits": 4, "group_size": 32}, 0.95, True),
    "weight_only_int4_gptq": ("weight_only_quant", {"bits": 4, "group_size": 32,
                                                    "method": "gptq", "calib_samples": 32},
                              0.95, True),
    "lowrank": ("lowrank", {"rank": "ratio", "ratio": 0.5}, 0.9, True),
    "mixed_precision": ("mixed_precision", {"policy": "size", "size_ratio": 0.3,
                                            "calib_samples": 32}, 0.95, True),
    "qat": ("qat", {"finetune": {"max_steps": 2, "batch_size": 16}, "calib_samples": 32},
            0.9, True),  # trained two steps on random tokens: drifts more
    "magnitude_prune": ("magnitude_prune", {"sparsity": 0.3}, 0.9, True),
    "nm_prune": ("nm_prune", {}, 0.8, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_stage_covers_conv1d_layers(case: str, gpt2: SlimModel, data: DataBundle,
                                    tmp_path: Path):
    kind, overrides, min_cos, tied_skipped = CASES[case]
    spec = STAGES.get(kind)
    out, record = spec.apply(gpt2.copy(), spec.config.model_validate(overrides),
                             StageContext(data=data, progress=False))
    # Every Conv1D layer converted (recorded, and first among the transforms) and covered.
    assert record.details[TRANSFORM] == CONV1D
    assert record.changed[0] == ("converted 8 Conv1D layers to Linear (same math: weight "
                                 "transposed)")
    transforms = out.arch["transforms"]
    assert transforms[0] == {"kind": TRANSFORM, "version": 1, "plan": {"layers": CONV1D}}
    # Pruning zeroes weights in place; the others add their own structure after it.
    assert len(transforms) == (1 if kind.endswith("prune") else 2)
    covered = set(record.details["layers"])
    assert set(CONV1D) <= covered, sorted(set(CONV1D) - covered)
    # The tied head: skipped with the reason naming the embedding (quantizers, lowrank).
    why = {s["what"]: s["why"] for s in record.skipped}
    if tied_skipped:
        assert "lm_head" not in covered
        assert why["lm_head"].startswith("weight shared with transformer.wte (tied)")
        assert out.module.lm_head.weight is out.module.transformer.wte.weight
    x = B.take(data.x_test, slice(0, 8))
    ref, got = _logits(gpt2.module, x), _logits(out.module, x)
    assert torch.isfinite(got).all()
    assert _cosine(got, ref) > min_cos
    assert not torch.equal(got, ref)  # the stage did change the model
    # The artifact rebuilds GPT-2, replays the conversion then the stage: bit for bit.
    save_artifact(out, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    assert conv1d_layers(back.module) == []
    torch.testing.assert_close(_logits(back.module, x), got, rtol=0, atol=0)


def test_weight_only_shrinks_the_state_and_counts_honestly(gpt2: SlimModel, data: DataBundle):
    spec = STAGES.get("weight_only_quant")
    ctx = StageContext(data=data, progress=False)
    cfg = spec.config.model_validate({"bits": 4, "group_size": 32})
    out, rec = spec.apply(gpt2.copy(), cfg, ctx)
    before, after = _state_bytes(gpt2.module), _state_bytes(out.module)
    totals = rec.details["totals"]
    assert totals["layers"] == len(CONV1D)
    # The claimed saving is the real one: the packed layers' float bytes left the state.
    assert before - after == totals["bytes_before"] - totals["bytes_after"]
    assert after < before

    # Named in include, the tied head is packed, and its float matrix stays for wte: the
    # record counts no float bytes freed for it, and the state grows by its packed bytes.
    named = cfg.model_copy(update={"include": ["lm_head", "re:transformer\\.h\\..*"]})
    out2, rec2 = spec.apply(gpt2.copy(), named, ctx)
    head = rec2.details["layers"]["lm_head"]
    assert head["bytes_before"] == 0 and head["shared_with"] == ["transformer.wte"]
    assert "lm_head" not in {s["what"] for s in rec2.skipped}
    assert _state_bytes(out2.module) - after == head["bytes_after"]
    totals2 = rec2.details["totals"]
    assert before - _state_bytes(out2.module) == totals2["bytes_before"] - totals2["bytes_after"]
    assert any(c.startswith("lm_head: weight shared with transformer.wte (tied) and named")
               for c in rec2.changed)


def test_dynamic_quant_counts_a_named_tied_head_honestly(gpt2: SlimModel, data: DataBundle):
    spec = STAGES.get("dynamic_quant")
    cfg = spec.config.model_validate({"include": ["lm_head"]})
    out, rec = spec.apply(gpt2.copy(), cfg, StageContext(data=data, progress=False))
    assert list(rec.details["layers"]) == ["lm_head"]
    e = rec.details["layers"]["lm_head"]
    assert e["bytes_before"] == 0 and e["shared_with"] == ["transformer.wte"]
    # The state grows by exactly the quantized copy (GPT-2's head has no bias to free).
    assert _state_bytes(out.module) - _state_bytes(gpt2.module) == e["bytes_after"]


def test_selectors_keep_their_meaning(gpt2: SlimModel):
    spec = STAGES.get("dynamic_quant")
    ctx = StageContext(progress=False)
    # By name: the converted layer keeps its name.
    cfg = spec.config.model_validate({"exclude": ["transformer.h.0.attn.c_attn"]})
    _, rec = spec.apply(gpt2.copy(), cfg, ctx)
    assert set(rec.details["layers"]) == set(CONV1D) - {"transformer.h.0.attn.c_attn"}
    assert {"what": "transformer.h.0.attn.c_attn", "why": "excluded by the recipe"} \
        in rec.skipped
    # By type: type:Conv1D still selects the layers that were Conv1D.
    cfg = spec.config.model_validate({"include": ["type:Conv1D"]})
    _, rec = spec.apply(gpt2.copy(), cfg, ctx)
    assert list(rec.details["layers"]) == CONV1D
    # A stage not selecting Linear layers converts nothing.
    spec = STAGES.get("magnitude_prune")
    _, rec = spec.apply(gpt2.copy(), spec.config.model_validate({"layer_types": ["Embedding"],
                                                                 "sparsity": 0.5}), ctx)
    assert TRANSFORM not in rec.details and "transformer.wpe" in rec.details["layers"]
    # Pruning the tied embedding would prune the head too: left out unless named.
    assert "transformer.wte" not in rec.details["layers"]


def test_replaying_the_conversion_on_a_wrong_layer_is_refused(gpt2: SlimModel):
    from slimkit.core.errors import ModelLoadError
    from slimkit.io.transforms import replay_transforms

    with pytest.raises(ModelLoadError, match="artifact transform 'conv1d_to_linear' does not "
                       "fit the architecture: layer 'lm_head' is not a transformers Conv1D"):
        replay_transforms(gpt2.module, [{"kind": TRANSFORM, "version": 1,
                                         "plan": {"layers": ["lm_head"]}}])
    assert conv1d_layers(gpt2.module) == CONV1D
    spec = STAGES.get("dynamic_quant")
    with pytest.raises(ConfigError, match="layer selector 'nope' matches no layer"):
        spec.apply(gpt2.copy(), spec.config.model_validate({"exclude": ["nope"]}))
