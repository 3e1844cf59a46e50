"""Structural coverage: prune ~40% of many architectures, run them, export to ONNX, compare.

Each case checks: output shape unchanged, finite outputs, parameters really went down (the
tensors are physically smaller), and ONNX Runtime agrees with PyTorch on the pruned model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests._stages import stage_on
from tests.prune._structured_models import (
    ConcatNet,
    ConvNet,
    GroupedNet,
    MHANet,
    SEDecoderNet,
    SplitNet,
    init_bn,
)
from torch import nn

from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.model import SlimModel
from slimkit.prune.structured import StructuredPruneConfig, structured_prune
from slimkit.zoo import build_model

Case = tuple[Callable[[], nn.Module], tuple[int, ...], str]


def _zoo(name: str, shape: tuple[int, ...], **kw: object) -> Callable[[], nn.Module]:
    return lambda: build_model(name, shape, 10, **kw)


def _hf(kind: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        from slimkit.io.hf import HFLogits

        t = transformers
        tiny_tf = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "intermediate_size": 64, "num_labels": 5}
        models = {
            "resnet": lambda: (t.ResNetForImageClassification(t.ResNetConfig(
                embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)),
                "pixel_values"),
            "mobilenetv2": lambda: (t.MobileNetV2ForImageClassification(t.MobileNetV2Config(
                image_size=32, depth_multiplier=0.35, num_labels=5)), "pixel_values"),
            "convnext": lambda: (t.ConvNextForImageClassification(t.ConvNextConfig(
                num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5,
                image_size=32)), "pixel_values"),
            "vit": lambda: (t.ViTForImageClassification(t.ViTConfig(
                image_size=16, patch_size=4, **tiny_tf)), "pixel_values"),
            "bert": lambda: (t.BertForSequenceClassification(t.BertConfig(
                vocab_size=100, max_position_embeddings=32, **tiny_tf)), "input_ids"),
        }
        torch.manual_seed(0)
        model, name = models[kind]()
        return HFLogits(model.eval(), name)

    return make


CASES: dict[str, Case] = {
    "lenet300": (_zoo("lenet300", (1, 8, 8)), (1, 8, 8), "float32"),
    "lenet5": (_zoo("lenet5", (1, 28, 28)), (1, 28, 28), "float32"),
    "resnet20": (_zoo("resnet20", (3, 16, 16)), (3, 16, 16), "float32"),
    "mobilenetv2": (_zoo("mobilenetv2", (3, 16, 16), width_mult=0.5), (3, 16, 16), "float32"),
    "vit": (_zoo("vit", (3, 16, 16), dim=32, depth=2), (3, 16, 16), "float32"),
    "text_encoder": (_zoo("text_encoder", (12,), input_dtype="int64", dim=32, depth=2,
                          vocab_size=50), (12,), "int64"),
    "convnet": (ConvNet, (3, 8, 8), "float32"),
    "concat": (ConcatNet, (3, 8, 8), "float32"),
    "split_chunk": (SplitNet, (3, 8, 8), "float32"),
    "grouped_depthwise": (GroupedNet, (3, 8, 8), "float32"),
    "multihead_attention": (MHANet, (5, 6), "float32"),
    "squeeze_excite_transposed": (SEDecoderNet, (3, 8, 8), "float32"),
    "hf_resnet": (_hf("resnet"), (3, 32, 32), "float32"),
    "hf_mobilenetv2": (_hf("mobilenetv2"), (3, 32, 32), "float32"),
    "hf_convnext": (_hf("convnext"), (3, 32, 32), "float32"),
    "hf_vit": (_hf("vit"), (3, 16, 16), "float32"),
    "hf_bert": (_hf("bert"), (16,), "int64"),
}
SLOW = {"mobilenetv2", "hf_resnet", "hf_mobilenetv2", "hf_convnext", "hf_vit", "hf_bert"}


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in CASES])
def test_prune_run_export(name: str, tmp_path: Path):
    make, shape, dtype = CASES[name]
    torch.manual_seed(0)
    model = init_bn(make())
    slim = SlimModel(module=model, input_shape=shape, input_dtype=dtype, name=name,
                     arch={"kwargs": {"vocab_size": 50}} if dtype == "int64" else None)
    example = slim.example_inputs(2, seed=1)
    with torch.no_grad():
        ref = model(*example)
    pruned, rec = stage_on(structured_prune, model, StructuredPruneConfig(ratio=0.4),
                           example_inputs=example)
    with torch.no_grad():
        out = pruned(*example)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert _params(pruned) < 0.9 * _params(model), rec.skipped
    assert rec.details["params"]["after"] == _params(pruned)
    assert rec.details["flops"]["after"] < rec.details["flops"]["before"]
    slim_pruned = slim.copy(pruned)
    path = export_onnx(slim_pruned, tmp_path / "p.onnx")
    parity = check_parity(slim_pruned, path, slim.example_inputs(3, seed=2), atol=1e-4)
    assert parity["ok"], parity
