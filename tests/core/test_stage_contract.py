"""Contract tests over the stage registry: every registered technique × one table of models.

A technique gets these by registering (``core.stages.register_stage``); ``FAST`` only makes a
known kind quick (few training steps), and a new kind without an entry runs with its config's
defaults. For every kind and model:

- the output keeps the input model's output structure (shape, dtype) on sample inputs, and the
  input model is left untouched;
- ``IDENTITY`` configs (ratio 0, 8 bits where meaningful) reproduce the original outputs;
- the config round-trips through YAML (a recipe stage) and validates against the JSON Schema;
- the artifact written from the output loads back and gives the same outputs (bit for bit);
- the ONNX export matches PyTorch.

A kind that cannot handle a model says so with a slimkit error (one clear line), never a raw
exception: ``UNSUPPORTED`` lists those pairs with the message expected, so a pair that starts
working (or starts failing differently) is noticed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.stages import STAGES, StageContext
from slimkit.data.bundle import DataBundle
from slimkit.data.stream import StreamData
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io import batch as B
from slimkit.io.artifact import load_artifact, save_artifact
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel, set_mode
from slimkit.pipeline.recipe import load_recipe, recipe_schema

TRAIN = {"max_steps": 3, "batch_size": 16}

# Per kind: a small, quick config that really changes the model.
FAST: dict[str, dict[str, Any]] = {
    "distill": {"train": TRAIN},
    "encode": {"conv_bits": 4, "fc_bits": 3},
    "gradual_prune": {"final_sparsity": 0.5, "frequency": 1, "train": TRAIN},
    "lowrank": {"rank": "ratio", "ratio": 0.5},
    "magnitude_prune": {"sparsity": 0.5},
    "mixed_precision": {"policy": "size", "size_ratio": 0.3, "calib_samples": 32},
    "nm_prune": {},
    "ptq": {"num_samples": 32},
    "qat": {"finetune": TRAIN, "calib_samples": 32},
    "sparse_train": {"sparsity": 0.5, "update_every": 1, "train": TRAIN},
    "structured_prune": {"ratio": 0.3},
    "weight_only_quant": {"bits": 8},
    "dynamic_quant": {},
}

# Per kind: a config that must leave the outputs as they were (exactly, or to a tolerance for
# quantization at 8 bits).
IDENTITY: dict[str, tuple[dict[str, Any], float]] = {
    "magnitude_prune": ({"sparsity": 0.0}, 0.0),
    "structured_prune": ({"ratio": 0.0}, 0.0),
    "lowrank": ({"rank": "energy", "energy": 1.0}, 0.0),
    "weight_only_quant": ({"bits": 8, "scale_dtype": "float32"}, 0.05),
}


class ResidualCNN(nn.Module):
    """Conv-BN-ReLU with a residual add, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.conv(h))
        return self.head(h.mean((2, 3)))


class ConcatSplit(nn.Module):
    """Two branches concatenated, then split in two and recombined."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mix(torch.cat([self.a(x), self.b(x)], dim=1)))
        left, right = h.chunk(2, dim=1)
        return self.head((left * torch.sigmoid(right)).mean((2, 3)))


class GroupedConv(nn.Module):
    """Depthwise-separable blocks (groups = channels) and a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dw(torch.relu(self.pw1(x))))
        return self.head(torch.relu(self.grouped(h)).mean((2, 3)))


class TwoOutputs(nn.Module):
    """A tuple output (logits, features): the multi-output case of real models."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.relu(self.conv(x)).mean((2, 3))
        return self.head(feats), feats


class TupleInputs(nn.Module):
    """Two positional inputs: an image and a vector of side features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.side = nn.Linear(5, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(image)).mean((2, 3)) + torch.relu(self.side(side))
        return self.head(h)


class MaskedText(nn.Module):
    """Dict inputs (``input_ids``, ``attention_mask``) of variable length, dict outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        h = self.embed(input_ids)
        h = self.norm(h + self.ff(h))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return {"logits": self.head(pooled), "pooled": pooled}


def _custom(cls: type[nn.Module], example: Any = None, **kwargs: Any) -> SlimModel:
    from slimkit.api import wrap

    torch.manual_seed(0)
    module = cls().eval()
    if example is None:
        return SlimModel(module=module, input_shape=(3, 8, 8), name=cls.__name__,
                         num_classes=10)
    return wrap(module, example, name=cls.__name__, num_classes=10, **kwargs)


def _hf_classifier() -> SlimModel:
    """A tiny BERT as Hugging Face builds it: dict inputs, a ``ModelOutput`` out."""
    from transformers import BertConfig, BertForSequenceClassification

    from slimkit.api import wrap

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, num_labels=10,
                        max_position_embeddings=32)
    module = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 50, (2, 12))
    return wrap(module, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                name="hf_bert", output="logits",
                dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}})


def _hf_encoder() -> SlimModel:
    """A tiny BERT encoder as ``AutoModel`` gives it: last_hidden_state judged (embeddings)."""
    from transformers import BertConfig, BertModel

    from slimkit.api import wrap

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    return wrap(BertModel(config).eval(), name="hf_encoder")


def _hf_lm() -> SlimModel:
    """A tiny GPT-2 causal LM as ``AutoModelForCausalLM`` gives it: logits [B, T, V] judged."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from slimkit.api import wrap

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    return wrap(GPT2LMHeadModel(config).eval(), name="hf_lm")


MODELS = {
    "residual_cnn": lambda: _custom(ResidualCNN),
    "concat_split": lambda: _custom(ConcatSplit),
    "grouped_conv": lambda: _custom(GroupedConv),
    "attention": lambda: load_zoo("vit", input_shape=(3, 8, 8), num_classes=10, dim=16,
                                  depth=1, heads=2),
    "text": lambda: load_zoo("text_encoder", input_shape=(12,), num_classes=10, dim=16,
                             depth=1, heads=2, input_dtype="int64", vocab_size=50),
    "two_outputs": lambda: _custom(TwoOutputs),
    "tuple_inputs": lambda: _custom(TupleInputs, (torch.randn(2, 3, 8, 8), torch.randn(2, 5))),
    "dict_inputs": lambda: _custom(
        MaskedText, {"input_ids": torch.randint(0, 50, (2, 12)),
                     "attention_mask": torch.ones(2, 12, dtype=torch.int64)},
        output="logits", dynamic_axes={"input_ids": {1: "sequence"},
                                       "attention_mask": {1: "sequence"}}),
    "hf_bert": _hf_classifier,
    "hf_encoder": _hf_encoder,
    "hf_lm": _hf_lm,
}

# The task each model's data is for (classification when not listed).
TASK = {"hf_encoder": "embedding", "hf_lm": "causal_lm"}

# (kind, model) pairs that must refuse with a slimkit error whose message matches.
UNSUPPORTED: dict[tuple[str, str], str] = {}

# Kinds that select layers by type and so must cover GPT-2's Conv1D layers (hf_lm).
COVERS_CONV1D = {"ptq", "dynamic_quant", "weight_only_quant", "mixed_precision", "qat",
                 "lowrank", "magnitude_prune", "nm_prune", "gradual_prune", "sparse_train",
                 "encode"}

# ONNX parity tolerance per kind (default: the recipe's 1e-4). At 2-4 bits one quantization
# step is large: an activation on a rounding boundary may take the neighbouring code in ONNX
# Runtime (x / scale rounds differently by an ulp), which moves an output by ~1e-4.
PARITY_ATOL = {"mixed_precision": 1e-3}


def _pairs() -> list:
    return [pytest.param(kind, name, id=f"{kind}-{name}")
            for kind in STAGES.names() for name in MODELS]


def _data(model: SlimModel) -> DataBundle:
    gen = torch.Generator().manual_seed(1)

    def one(spec: Any, n: int) -> torch.Tensor:
        shape = (n, *spec.shape)
        if "mask" in spec.name:  # padded sequences: each row keeps a random-length prefix
            keep = torch.randint(3, spec.shape[0] + 1, (n, 1), generator=gen)
            return (torch.arange(spec.shape[0]) < keep).long()
        if spec.dtype.startswith("int"):
            return torch.randint(0, min(50, spec.high or 50), shape, generator=gen)
        return torch.randn(shape, generator=gen)

    def x(n: int) -> Any:
        tensors = [one(spec, n) for spec in model.input_specs]
        if model.input_style == "dict":
            return {spec.name: t for spec, t in zip(model.input_specs, tensors, strict=True)}
        return tuple(tensors) if model.input_style == "tuple" else tensors[0]

    task = TASK.get(model.name, "classification")
    if task != "classification":
        return DataBundle(f"synthetic-{model.name}", x(96), torch.zeros(96, dtype=torch.long),
                          x(32), torch.zeros(32, dtype=torch.long), 0, task=task)
    return DataBundle(f"synthetic-{model.name}", x(96), torch.randint(0, 10, (96,), generator=gen),
                      x(32), torch.randint(0, 10, (32,), generator=gen), 10)


def _outputs(model: nn.Module, x: Any) -> tuple[torch.Tensor, ...]:
    set_mode(model, False)
    with torch.no_grad():
        out = B.call(model, x)
    return tuple(B.flatten(out).values())


def _config(kind: str, overrides: dict[str, Any]) -> Any:
    return STAGES.get(kind).config.model_validate(overrides)


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple[SlimModel, DataBundle]]:
    return {name: (m := build(), _data(m)) for name, build in MODELS.items()}


def test_every_fast_entry_names_a_registered_kind():
    assert set(FAST) <= set(STAGES.names())
    assert set(IDENTITY) <= set(STAGES.names())


@pytest.mark.parametrize("kind", STAGES.names())
def test_config_round_trips_through_yaml_and_the_json_schema(kind: str):
    import jsonschema
    cfg = _config(kind, FAST.get(kind, {}))
    stage = cfg.model_dump(mode="json")
    text = yaml.safe_dump({"version": 1, "stages": [stage]})
    recipe = load_recipe(yaml.safe_load(text))
    assert recipe.stages[0] == cfg
    jsonschema.validate(yaml.safe_load(text), recipe_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "stages": [{**stage, "no_such_key": 1}]},
                            recipe_schema())


@pytest.mark.parametrize(("kind", "model_name"), _pairs())
def test_stage_contract(kind: str, model_name: str, cases: dict, tmp_path: Path):
    base, data = cases[model_name]
    model = base.copy()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    x = B.take(data.x_test, slice(0, 8))
    reference = _outputs(model.module, x)
    cfg = _config(kind, FAST.get(kind, {}))
    ctx = StageContext(data=data, progress=False, workdir=tmp_path / "work")
    expected_refusal = UNSUPPORTED.get((kind, model_name))
    if expected_refusal is not None:
        with pytest.raises(SlimkitError, match=expected_refusal):
            STAGES.get(kind).apply(model, cfg, ctx)
        return
    out, record = STAGES.get(kind).apply(model, cfg, ctx)

    # The input is untouched; the output keeps the output structure.
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    got = _outputs(out.module, x)
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in reference]
    assert all(torch.isfinite(t).all() for t in got)
    assert record.changed or record.skipped, "a stage must say what it did or skipped"
    assert out.history == model.history  # the runner, not the stage, appends history
    if model_name == "hf_lm" and kind in COVERS_CONV1D:
        # GPT-2's matmuls are HF Conv1D layers: converted (recorded) and covered, not just
        # the lm_head (which is tied to the embedding, and left float by quantizers).
        # (lowrank leaves a square 16 x 16 projection whole: at rank 8 it is no smaller.)
        converted = record.details["conv1d_to_linear"]
        assert len(converted) == 4
        assert len(set(converted) & set(record.details["layers"])) >= (
            2 if kind == "lowrank" else 4)

    # Artifact round trip: same outputs bit for bit.
    save_artifact(out, tmp_path / "artifact")
    back = load_artifact(tmp_path / "artifact", template=base.module)
    for a, b in zip(_outputs(back.module, x), got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # ONNX parity.
    onnx_path = export_onnx(out, tmp_path / "model.onnx")
    parity = check_parity(out, onnx_path, x, atol=PARITY_ATOL.get(kind, 1e-4))
    assert parity["ok"], parity


@pytest.mark.parametrize("model_name", ["residual_cnn", "attention"])
@pytest.mark.parametrize("kind", sorted(IDENTITY))
def test_identity_config_keeps_the_outputs(kind: str, model_name: str, cases: dict):
    base, data = cases[model_name]
    overrides, atol = IDENTITY[kind]
    out, _ = STAGES.get(kind).apply(base.copy(), _config(kind, overrides),
                                    StageContext(data=data, progress=False))
    x = B.take(data.x_test, slice(0, 8))
    for a, b in zip(_outputs(out.module, x), _outputs(base.module, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _as_stream(data: DataBundle, batch: int = 16) -> StreamData:
    """The same samples as a stream of dict/tuple batches (a list: re-iterable, sized)."""
    def chunks(x: Any, y: torch.Tensor) -> list:
        return [(B.take(x, slice(i, i + batch)), y[i:i + batch])
                for i in range(0, len(y), batch)]

    return StreamData(f"stream-{data.name}", train=chunks(data.x_train, data.y_train),
                      test=chunks(data.x_test, data.y_test), task=data.task,
                      num_classes=data.num_classes)


@pytest.mark.parametrize("model_name", ["dict_inputs", "hf_lm"])
@pytest.mark.parametrize("kind", STAGES.names())
def test_every_kind_runs_on_a_stream(kind: str, model_name: str, cases: dict, tmp_path: Path):
    """Calibration, fine-tuning and selections read batches from a stream as they come."""
    base, data = cases[model_name]
    x = B.take(data.x_test, slice(0, 8))
    reference = _outputs(base.module, x)
    cfg = _config(kind, FAST.get(kind, {}))
    out, record = STAGES.get(kind).apply(base.copy(), cfg, StageContext(
        data=_as_stream(data), progress=False, workdir=tmp_path / "work"))
    got = _outputs(out.module, x)
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in reference]
    assert all(torch.isfinite(t).all() for t in got)
    assert record.changed or record.skipped
