"""Hugging Face models (built from small configs, no download) through the early_exit stage:
ResNet and MobileNetV2 (exits after their stages), ViT and BERT (exits on the CLS token).

References: the transformers model itself (the final logits, and each exit block's output
caught by a forward hook, fed to the head apart), each sample alone (batch of one), and the
ONNX chain in ONNX Runtime, exit by exit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from slimkit.core.stages import StageContext
from slimkit.data.bundle import DataBundle
from slimkit.exit.config import EarlyExitConfig
from slimkit.exit.model import EarlyExitModel, confidence, exit_index
from slimkit.exit.onnx import check_exit_parity, export_exit_onnx
from slimkit.exit.stage import early_exit
from slimkit.io import batch as B
from slimkit.io.artifact import load_artifact, save_artifact

transformers = pytest.importorskip("transformers")
T = transformers
N_TRAIN, N_TEST = 64, 24


def _images(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 1, 16, 16, generator=gen)}


def _tokens(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 50, (n, 12), generator=gen)
    lengths = torch.randint(4, 13, (n,), generator=gen)
    mask = (torch.arange(12) < lengths[:, None]).long()  # padded at the end, row by row
    return {"input_ids": ids * mask, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids)}


# name: (model, inputs, the default exits, the heads' pooling)
CASES: dict[str, tuple[Any, Any, list[str], str]] = {
    "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 1, 1],
        num_labels=4)), _images, ["resnet.encoder.stages.0", "resnet.encoder.stages.1"],
        "grid"),
    "mobilenetv2": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        num_channels=1, image_size=16, depth_multiplier=0.25, num_labels=4)), _images,
        ["mobilenet_v2.layer.1", "mobilenet_v2.layer.4"], "grid"),
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(
        num_channels=1, image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=32, num_labels=4)), _images,
        ["vit.layers.0", "vit.layers.1"], "cls"),
    "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=4)), _tokens,
        ["bert.encoder.layer.0", "bert.encoder.layer.1"], "cls"),
}


def _model_and_data(name: str) -> tuple[Any, DataBundle]:
    import slimkit

    make, inputs, _, _ = CASES[name]
    torch.manual_seed(0)
    module = make().eval()
    for m in module.modules():  # transformers' MobileNetV2 init (std 0.02) fades to ~1e-28
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    gen = torch.Generator().manual_seed(1)
    x, xt = inputs(N_TRAIN, gen), inputs(N_TEST, gen)
    y, yt = (torch.randint(0, 4, (n,), generator=gen) for n in (N_TRAIN, N_TEST))
    dyn = {k: {1: "sequence"} for k in x} if name == "bert" else None
    model = slimkit.wrap(module, B.take(x, slice(0, 2)), output="logits", dynamic_axes=dyn)
    return model, DataBundle(name, x, y, xt, yt, 4)


def _blocks(name: str) -> list[str]:
    exits = CASES[name][2]
    return exits[:2] if name != "mobilenetv2" else exits


@pytest.fixture(scope="module", params=sorted(CASES))
def staged(request) -> tuple[str, Any, Any, DataBundle]:
    """The stage run on the model (heads trained one epoch, every exit kept open)."""
    name = request.param
    model, data = _model_and_data(name)
    cfg = EarlyExitConfig.model_validate({
        "exits": _blocks(name), "max_drop": 100.0, "margin": "none", "min_exit_fraction": 0.0,
        "latency_samples": 0, "train": {"epochs": 1, "batch_size": 32}})
    out, record = early_exit(model, cfg, StageContext(data=data, progress=False))
    return name, model, out, record


def test_default_exits_go_after_the_stages_or_blocks():
    from slimkit.exit.plan import default_exits

    for name, (_, _, expected, _) in CASES.items():
        model, data = _model_and_data(name)
        got, why = default_exits(model.module, B.take(data.x_train, slice(0, 2)))
        if name == "mobilenetv2":  # every resolution change of its 17 inverted residuals
            assert got[:2] == expected and why is None, got
        else:
            assert got == expected and why is None, (name, got)


def _hooked(module: torch.nn.Module, blocks: list[str], x: dict) -> list[torch.Tensor]:
    acts: dict[str, torch.Tensor] = {}
    hooks = [module.get_submodule(b).register_forward_hook(
        lambda _m, _i, out, b=b: acts.__setitem__(b, out[0] if isinstance(out, tuple)
                                                  else out)) for b in blocks]
    try:
        with torch.no_grad():
            module(**x)
    finally:
        for h in hooks:
            h.remove()
    return [acts[b] for b in blocks]


def _between(values: torch.Tensor, q: float) -> float:
    v = values.double().sort().values
    i = min(max(int(q * len(v)), 1), len(v) - 1)
    return float((v[i - 1] + v[i]) / 2)


def _mix(ee: EarlyExitModel, x: dict) -> None:
    """Thresholds between two samples' confidences so that the batch takes every path."""
    with torch.no_grad():
        exits, _ = ee.exit_outputs(**x)
    c0, c1 = (confidence(e, "max_softmax") for e in exits)
    t0 = _between(c0, 0.6)
    ee.set_thresholds([t0, _between(c1[c0 < t0], 0.5)])


def test_exits_read_the_blocks_and_the_final_head_is_the_models(staged):
    name, model, out, record = staged
    ee = out.module
    assert isinstance(ee, EarlyExitModel) and ee.blocks == _blocks(name)
    assert [e["pool"] for e in record.details["exits"]] == [CASES[name][3]] * len(ee.blocks)
    _, data = _model_and_data(name)
    x = data.x_test
    with torch.no_grad():
        exits, final = ee.exit_outputs(**x)
        torch.testing.assert_close(final, model.module(**x).logits, rtol=0, atol=1e-6)
        for head, act, got in zip(ee.heads, _hooked(model.module, ee.blocks, x), exits,
                                  strict=True):
            torch.testing.assert_close(got, head(act), rtol=0, atol=1e-6)


def test_the_stopping_forward_gives_each_sample_its_exit_alone_or_in_a_batch(staged):
    name, model, out, _ = staged
    ee = out.module
    _, data = _model_and_data(name)
    x = data.x_test
    _mix(ee, x)
    with torch.no_grad():
        exits, final = ee.exit_outputs(**x)
        where = exit_index(ee, **x)
        got = ee(**x)
        alone = torch.cat([ee(**B.take(x, slice(i, i + 1))) for i in range(N_TEST)])
    assert set(where.tolist()) == {0, 1, 2}, "the batch must hold every kind of exit"
    reference = torch.stack([exits[k][i] if k < len(exits) else final[i]
                             for i, k in enumerate(where.tolist())])
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(alone, reference, rtol=0, atol=1e-5)


def test_the_onnx_chain_matches_pytorch_at_every_exit(staged, tmp_path: Path):
    name, _, out, _ = staged
    _, data = _model_and_data(name)
    x = data.x_test
    _mix(out.module, x)
    export_exit_onnx(out, tmp_path / "chain")
    parity = check_exit_parity(out, tmp_path / "chain", x, atol=1e-4)
    assert parity["ok"] and parity["same_exits"], parity
    assert len(parity["exit_max_abs_diff"]) == 3


def test_the_artifact_rebuilds_the_transformers_model_with_its_exits(tmp_path: Path):
    model, data = _model_and_data("bert")
    cfg = EarlyExitConfig.model_validate({
        "exits": _blocks("bert"), "max_drop": 100.0, "margin": "none",
        "min_exit_fraction": 0.0, "latency_samples": 0, "train": {"epochs": 1}})
    out, _ = early_exit(model, cfg, StageContext(data=data, progress=False))
    save_artifact(out, tmp_path / "artifact")
    back = load_artifact(tmp_path / "artifact")
    assert isinstance(back.module, EarlyExitModel) and back.module.plan == out.module.plan
    x = data.x_test
    with torch.no_grad():
        torch.testing.assert_close(back.module(**x), out.module(**x), rtol=0, atol=0)
        for got, want in zip(back.module.exit_outputs(**x)[0], out.module.exit_outputs(**x)[0],
                             strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
