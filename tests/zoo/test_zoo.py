"""Contract and reference tests for the model zoo.

Every registered model is run over the dataset input conventions (MNIST (1, 28, 28), sklearn
digits (1, 8, 8), MNIST-1D (40,)): shapes, finiteness, batch independence, ONNX Runtime parity,
torch.export with a dynamic batch, deterministic builds and spec round-trips. Published sizes
(LeNet-300-100, LeNet-5, ResNet-20/56) are checked exactly, and MACs against a second count.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimkit.core.errors import ConfigError, DataError
from slimkit.zoo import ZOO, build_from_spec, build_model, zoo_names
from slimkit.zoo.resnet import PadShortcut
from slimkit.zoo.transformer import MultiHeadSelfAttention
from slimkit.zoo.vit import default_patch_size

MNIST, DIGITS, MNIST1D = (1, 28, 28), (1, 8, 8), (40,)

# Which dataset shapes each model takes; every other combination must raise DataError.
SUPPORTED: dict[str, tuple[tuple[int, ...], ...]] = {
    "lenet300": (MNIST, DIGITS, MNIST1D),
    "lenet5": (MNIST, DIGITS, MNIST1D),
    "resnet20": (MNIST, DIGITS, MNIST1D),
    "resnet56": (MNIST, DIGITS, MNIST1D),
    "mobilenetv2": (MNIST, DIGITS, MNIST1D),
    "vit": (MNIST, DIGITS),
    "text_encoder": (MNIST, DIGITS, MNIST1D),
}
# Narrow settings that keep the suite fast; the architecture code paths are the same.
SMALL: dict[str, dict] = {
    "resnet56": {"width": 4},
    "mobilenetv2": {"width_mult": 0.25},
    "vit": {"dim": 32, "depth": 2},
    "text_encoder": {"dim": 32, "depth": 2},
}
CASES = [(name, shape) for name, shapes in SUPPORTED.items() for shape in shapes]
UNSUPPORTED = [
    (name, shape)
    for name in SUPPORTED
    for shape in (MNIST, DIGITS, MNIST1D)
    if shape not in SUPPORTED[name]
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run these small models on one thread: on a shared 2-core machine, thread pools only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _case_id(case: tuple[str, tuple[int, ...]]) -> str:
    return f"{case[0]}-{'x'.join(map(str, case[1]))}"


def _build(name: str, shape: tuple[int, ...], classes: int = 10, seed: int = 0) -> nn.Module:
    """A small model in eval mode whose BatchNorm statistics come from one batch of data.

    Fresh BatchNorm layers (mean 0, variance 1) let activations grow through deep ResNets in
    eval mode (ResNet-56 logits reach ~1e4), which would hide real errors behind float noise.
    """
    torch.manual_seed(seed)
    model = build_model(name, shape, classes, **SMALL.get(name, {}))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for bn in bns:
            bn.momentum = None  # cumulative average: one batch sets the statistics exactly
        with torch.no_grad():
            model.train()(_inputs(shape, 8, seed=99))
    return model.eval()


def _inputs(shape: tuple[int, ...], batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_registered_model_is_covered() -> None:
    assert zoo_names() == sorted(SUPPORTED)
    assert set(ZOO.names()) == set(SUPPORTED)


@pytest.mark.parametrize(
    ("name", "shape", "kwargs", "expected"),
    [
        ("lenet300", (784,), {}, 266_610),
        ("lenet300", MNIST, {}, 266_610),
        ("lenet5", MNIST, {}, 431_080),
        ("resnet20", (3, 32, 32), {}, 269_722),  # option A: the paper's 0.27M
        ("resnet20", (3, 32, 32), {"shortcut": "B"}, 272_474),
        ("resnet56", (3, 32, 32), {}, 853_018),  # the paper's 0.85M
    ],
)
def test_published_parameter_counts(name, shape, kwargs, expected) -> None:
    assert _num_params(build_model(name, shape, 10, **kwargs)) == expected


def test_resnet20_is_027m_params() -> None:
    assert _num_params(build_model("resnet20", (3, 32, 32), 10)) == pytest.approx(0.27e6, rel=0.01)


def _macs_by_hooks(model: nn.Module, x: torch.Tensor) -> int:
    """Count conv/linear MACs from output sizes: a second implementation next to FlopCounterMode."""
    total = 0

    def hook(module: nn.Module, _inp, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += out.numel() * module.in_features
        else:
            fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += out.numel() * fan_in

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def test_resnet20_macs_match_paper_and_hook_count() -> None:
    model = build_model("resnet20", (3, 32, 32), 10).eval()
    x = torch.randn(1, 3, 32, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    macs = counter.get_total_flops() / 2
    assert macs == pytest.approx(41e6, rel=0.03)
    assert macs == _macs_by_hooks(model, x)


@pytest.mark.parametrize(("name", "shape"), CASES, ids=map(_case_id, CASES))
def test_logits_shape_and_finite(name: str, shape: tuple[int, ...]) -> None:
    model = _build(name, shape, classes=7)
    with torch.no_grad():
        logits = model(_inputs(shape, 3))
    assert logits.shape == (3, 7)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("name", "shape"), CASES, ids=map(_case_id, CASES))
def test_batch_independence(name: str, shape: tuple[int, ...]) -> None:
    model = _build(name, shape)
    x = _inputs(shape, 3)
    with torch.no_grad():
        batched, alone = model(x)[:1], model(x[:1])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "shape"), UNSUPPORTED, ids=map(_case_id, UNSUPPORTED))
def test_unsupported_dataset_shapes_raise_data_error(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(DataError, match=r"\(C, H, W\)"):
        build_model(name, shape, 10)


def _onnx_cases() -> list[tuple[str, tuple[int, ...]]]:
    # One image case per model plus the 1-D conv variants; 8x8 shares their code paths.
    cases = [(name, MNIST) for name in SUPPORTED]
    return cases + [(name, MNIST1D) for name in ("lenet5", "resnet20", "mobilenetv2")]


ONNX_CASES = _onnx_cases()


def _onnx_roundtrip(model: nn.Module, x_export: torch.Tensor, x_run: torch.Tensor, path) -> None:
    import onnxruntime as ort

    torch.onnx.export(
        model,
        (x_export,),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the suite runs on 2 cores; no spinning thread pools
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x_run.numpy()})
    with torch.no_grad():
        want = model(x_run).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "shape"), ONNX_CASES, ids=map(_case_id, ONNX_CASES))
def test_onnx_export_matches_torch_with_dynamic_batch(name, shape, tmp_path) -> None:
    # Exported at batch 2, run at batch 5: the batch axis must really be dynamic.
    _onnx_roundtrip(_build(name, shape), _inputs(shape, 2), _inputs(shape, 5), tmp_path / "m.onnx")


def test_text_encoder_token_ids_onnx_matches_torch(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("text_encoder", (12,), 3, input_dtype="int64", vocab_size=50, dim=32)
    model.eval()
    ids = torch.randint(0, 50, (5, 12), generator=torch.Generator().manual_seed(2))
    _onnx_roundtrip(model, ids[:2], ids, tmp_path / "t.onnx")


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_torch_export_with_dynamic_batch(name: str) -> None:
    model = _build(name, MNIST)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (_inputs(MNIST, 2),), dynamic_shapes=({0: batch},))
    x = _inputs(MNIST, 3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_unknown_model_name_suggests_closest() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'resnet20'"):
        build_model("resnet2O", MNIST, 10)


def test_unknown_kwarg_names_model_and_valid_kwargs() -> None:
    with pytest.raises(ConfigError, match="resnet20") as info:
        build_model("resnet20", MNIST, 10, widht=8)
    assert "'widht'" in str(info.value)
    assert "Valid kwargs: shortcut, width" in str(info.value)
    with pytest.raises(ConfigError, match="'lenet300'.*Valid kwargs: none"):
        build_model("lenet300", MNIST, 10, width=8)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("resnet20", {"width": 0}, "'width' must be an int >= 1"),
        ("resnet20", {"shortcut": "C"}, "'shortcut' must be 'A'"),
        ("lenet5", {"padding": "full"}, "'padding' must be one of"),
        ("mobilenetv2", {"width_mult": -1.0}, "'width_mult' must be a number > 0"),
        ("mobilenetv2", {"dropout": 1.0}, r"'dropout' must be in \[0, 1\)"),
        ("vit", {"dim": 30, "heads": 4}, "dim=30 must be divisible by heads=4"),
        ("text_encoder", {"input_dtype": "float16"}, "'input_dtype' must be one of"),
        ("vit", {"depth": np.int64(2)}, "plain JSON value"),
    ],
)
def test_bad_kwarg_values_raise_config_error(name, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(name, MNIST, 10, **kwargs)


def test_bad_num_classes_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("lenet300", MNIST, 0)


@pytest.mark.parametrize(
    ("name", "shape", "kwargs", "message"),
    [
        ("vit", MNIST, {"patch_size": 5}, "not divisible by patch_size=5"),
        ("vit", (1, 4, 4, 4), {}, r"needs images shaped \(C, H, W\)"),
        ("lenet5", (1, 3, 3), {}, "needs every spatial size >= 4"),
        ("lenet5", DIGITS, {"padding": "valid"}, "needs every spatial size >= 16"),
        ("resnet20", (1, 1, 8, 8), {}, r"takes images \(C, H, W\)"),
        ("text_encoder", MNIST, {"input_dtype": "int64"}, r"token ids shaped \(L,\)"),
        ("lenet300", (), {}, "non-empty"),
        ("mobilenetv2", (1, 0, 8), {}, "positive sizes"),
    ],
)
def test_shapes_the_architecture_cannot_take_raise_data_error(name, shape, kwargs, message):
    with pytest.raises(DataError, match=message):
        build_model(name, shape, 10, **kwargs)


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_build_is_deterministic_under_seed(name: str) -> None:
    first, second, other = (_build(name, DIGITS, seed=s).state_dict() for s in (0, 0, 1))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_spec_round_trips_through_json(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, DIGITS, 4, **SMALL.get(name, {})).eval()
    spec = json.loads(json.dumps(model.slimkit_spec))
    assert spec["zoo"] == name
    assert spec["input_shape"] == list(DIGITS)
    assert spec["num_classes"] == 4
    assert spec["kwargs"].items() >= SMALL.get(name, {}).items()
    torch.manual_seed(0)
    rebuilt = build_from_spec(spec).eval()
    x = _inputs(DIGITS, 2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_build_from_spec_rejects_incomplete_spec() -> None:
    with pytest.raises(ConfigError, match="missing key"):
        build_from_spec({"zoo": "lenet5"})


def test_lenet5_padding_choice() -> None:
    # Caffe's valid convolutions at 28x28 (4x4 maps), same padding at 8x8 (2x2 maps).
    assert build_model("lenet5", MNIST, 10).fc1.in_features == 50 * 4 * 4
    small = build_model("lenet5", DIGITS, 10)
    assert small.conv1.padding == (2, 2)
    assert small.fc1.in_features == 50 * 2 * 2
    signal = build_model("lenet5", MNIST1D, 10)
    assert isinstance(signal.conv1, nn.Conv1d)
    assert signal.fc1.in_features == 50 * 7  # 40 -> 36 -> 18 -> 14 -> 7


def test_pad_shortcut_matches_zero_channel_concat() -> None:
    x = torch.randn(2, 16, 7, 7)
    got = PadShortcut(2, 16, 32, ndim=2)(x)
    zeros = torch.zeros(2, 8, 4, 4)
    torch.testing.assert_close(got, torch.cat([zeros, x[:, :, ::2, ::2], zeros], dim=1))
    # The subsampled identity has the same size as the stride-2 conv branch.
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    assert got.shape == conv(x).shape


def test_attention_matches_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    ours = MultiHeadSelfAttention(dim=16, num_heads=4).double()
    ref = nn.MultiheadAttention(16, 4, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.k.weight, ours.v.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.k.bias, ours.v.bias]))
        ref.out_proj.weight.copy_(ours.out.weight)
        ref.out_proj.bias.copy_(ours.out.bias)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    want, _ = ref(x, x, x, need_weights=False)
    torch.testing.assert_close(ours(x), want, rtol=1e-10, atol=1e-10)


def test_transformers_expose_heads_as_linears() -> None:
    for model in (build_model("vit", MNIST, 10), build_model("text_encoder", MNIST1D, 10)):
        assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        attn = [m for m in model.modules() if isinstance(m, MultiHeadSelfAttention)]
        assert len(attn) == 4
        assert all(a.num_heads == 4 and a.q.out_features == 64 for a in attn)


@pytest.mark.parametrize(("h", "w", "patch"), [(28, 28, 7), (8, 8, 4), (32, 32, 4), (224, 224, 14)])
def test_default_patch_size(h: int, w: int, patch: int) -> None:
    assert default_patch_size(h, w) == patch


def test_vit_grid_and_text_token_layout() -> None:
    model = build_model("vit", MNIST, 10)
    assert model.pos_embed.shape == (1, 1 + 16, 64)  # cls + 4x4 patches of 7x7
    rows = build_model("text_encoder", (3, 8, 5), 10)
    assert rows.pos_embed.shape == (1, 8, 64)  # one token per row ...
    assert rows.embed[1].in_features == 15  # ... of C * W features


def test_text_encoder_token_ids() -> None:
    model = build_model("text_encoder", (12,), 3, input_dtype="int64", vocab_size=50).eval()
    assert isinstance(model.embed, nn.Embedding) and model.embed.num_embeddings == 50
    ids = torch.randint(0, 50, (4, 12))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()


def test_mobilenetv2_widths_are_multiples_of_eight() -> None:
    model = build_model("mobilenetv2", MNIST, 10, width_mult=0.35)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert convs[-1].out_channels == 1280
    depthwise = [c for c in convs if c.groups > 1]
    assert depthwise and all(c.groups == c.in_channels == c.out_channels for c in depthwise)


def test_models_train_mode_backward() -> None:
    # BatchNorm/Dropout in train mode and gradients reach the first layer.
    for name in sorted(SUPPORTED):
        model = _build(name, DIGITS).train()
        loss = F.cross_entropy(model(_inputs(DIGITS, 4)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        first = next(p for p in model.parameters() if p.requires_grad)
        assert first.grad is not None and torch.isfinite(first.grad).all(), name
