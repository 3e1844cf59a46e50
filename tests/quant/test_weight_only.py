"""Weight-only packed quantization: codes vs references, packing, padding, ONNX, artifacts."""

from pathlib import Path

import onnx
import pytest
import torch
from pydantic import ValidationError
from tests._stages import stage_on
from torch import nn

from slimkit.core.errors import ConfigError, DataError
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.quant.packed import PackedLinear
from slimkit.quant.primitives import fake_quantize, rtn_quantize
from slimkit.quant.weight_only import WeightOnlyConfig, _weight_only_quant, weight_only_quant


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (3, False),
                                                 (2, True)])
def test_packed_weight_equals_group_fake_quantization(bits: int, symmetric: bool):
    torch.manual_seed(0)
    lin = nn.Linear(100, 12)
    codes, scales, zeros = rtn_quantize(lin.weight, bits, 32, symmetric, "float32")
    packed = PackedLinear.from_codes(lin, codes, scales, zeros, bits, 32, symmetric, "float32")
    padded = torch.nn.functional.pad(lin.weight.detach(), (0, 28))
    ref = fake_quantize(padded, bits, symmetric, signed=symmetric, granularity="group:32")
    torch.testing.assert_close(packed.weight(), ref[:, :100], rtol=0, atol=1e-6)
    assert torch.equal(packed.codes(), codes) and torch.equal(packed.zeros().int(), zeros)
    x = torch.randn(5, 100)
    torch.testing.assert_close(packed(x), x @ ref[:, :100].T + lin.bias, rtol=1e-5, atol=1e-5)
    # the state holds packed integers, scales, zero points and the bias: nothing float-sized
    state = packed.state_dict()
    assert state["weight_packed"].dtype == torch.uint8
    assert state["weight_packed"].numel() == 12 * 128 * {2: 2, 3: 4, 4: 4, 8: 8}[bits] // 8
    assert packed.nbytes() < 12 * 100 * 4 * (0.35 if bits <= 4 else 0.45)


def test_fp16_scales_stay_finite_and_tiny_weights_quantize():
    lin = nn.Linear(32, 4)
    with torch.no_grad():
        lin.weight.mul_(1e-9)
    codes, scales, zeros = rtn_quantize(lin.weight, 4, 32, True, "float16")
    packed = PackedLinear.from_codes(lin, codes, scales, zeros, 4, 32, True, "float16")
    assert packed.scales.dtype == torch.float16 and torch.isfinite(packed.weight()).all()
    assert float((packed.weight() - lin.weight.detach()).abs().max()) < 1e-4


@pytest.mark.parametrize(("bits", "symmetric", "group"), [(4, True, 32), (4, False, 16),
                                                          (8, False, 64), (3, True, 0)])
def test_onnx_export_uses_matmulnbits_with_parity(bits: int, symmetric: bool, group: int,
                                                 tmp_path: Path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(72, 96), nn.GELU(), nn.Linear(96, 10))
    model = SlimModel(net, (72,), name="tiny")
    cfg = WeightOnlyConfig(bits=bits, symmetric=symmetric, group_size=group)
    small, rec = stage_on(weight_only_quant, net, cfg, example_inputs=model.example_inputs(2))
    q = model.copy(small)
    q.arch = None
    path = export_onnx(q, tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == 2 and "Gemm" not in ops
    for batch in (1, 7):
        parity = check_parity(q, path, q.example_inputs(batch), atol=1e-4)
        assert parity["ok"], parity
    fp32 = export_onnx(model, tmp_path / "f.onnx")
    assert path.stat().st_size < fp32.stat().st_size * (0.4 if bits <= 4 else 0.6)
    assert rec.details["plan"]["layers"]["0"]["padded_columns"] == (-72) % (group or 128)


def test_stage_records_padding_skips_and_leaves_input_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 40), nn.ReLU(),
                        nn.Linear(40, 2), nn.Linear(2, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small, rec = stage_on(weight_only_quant, net, WeightOnlyConfig(bits=4, group_size=32),
                          example_inputs=(torch.randn(2, 1, 8, 8),))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert isinstance(small[2], PackedLinear) and isinstance(small[4], PackedLinear)
    why = {s["what"]: s["why"] for s in rec.skipped}
    assert "not in layer_types" in why["0"] and "would not be smaller" in why["5"]
    assert "padded by 16" in next(c for c in rec.changed if c.startswith("2:"))
    assert rec.details["totals"]["ratio"] > 4


def test_artifact_round_trip_of_zoo_models(tmp_path: Path):
    from slimkit.io import load_artifact, save_artifact

    cases = [("lenet300", {}), ("vit", {"dim": 32, "depth": 1, "heads": 2}),
             ("text_encoder", {"dim": 32, "depth": 1, "heads": 2})]
    for name, kwargs in cases:
        torch.manual_seed(0)
        model = load_zoo(name, input_shape=(1, 8, 8), num_classes=10, **kwargs)
        out, rec = weight_only_quant(model, WeightOnlyConfig(bits=4, group_size=16))
        small = out.module
        save_artifact(model, tmp_path / f"{name}-fp32")
        save_artifact(out, tmp_path / name)
        back = load_artifact(tmp_path / name)
        x = model.example_inputs(3)
        torch.testing.assert_close(back.module(*x), small.eval()(*x), rtol=0, atol=0)
        size = (tmp_path / name / "weights.safetensors").stat().st_size
        assert size < 0.45 * (tmp_path / f"{name}-fp32" / "weights.safetensors").stat().st_size


def test_bad_configs_and_bad_calibration(mlp):
    with pytest.raises(ValidationError):
        WeightOnlyConfig(bits=9)
    with pytest.raises(ValidationError, match="power of two"):
        WeightOnlyConfig(group_size=24)
    with pytest.raises(ConfigError, match="no Linear layer"):
        stage_on(weight_only_quant, nn.Sequential(nn.Conv2d(1, 2, 3)),
                 WeightOnlyConfig(layer_types=["Linear"]))
    with pytest.raises(ValidationError):
        WeightOnlyConfig(layer_types=["LSTM"])
    with pytest.raises(ConfigError, match="needs calibration data"):
        stage_on(weight_only_quant, mlp.module, WeightOnlyConfig(method="gptq"))
    for bad, msg in [(torch.zeros(8, 1, 8, 8), "constant"), (torch.full((8, 1, 8, 8), 3.0),
                                                           "constant"),
                     (torch.randn(8, 1, 8, 8).index_fill_(0, torch.tensor([2]), float("nan")),
                      "NaN/Inf")]:
        with pytest.raises(DataError, match=msg):
            _weight_only_quant(mlp.module, WeightOnlyConfig(), calib_x=bad)


def test_gptq_beats_rtn_on_a_trained_mlp(mlp, digits):
    from slimkit.measure.quality import accuracy

    cfg = WeightOnlyConfig(bits=3, group_size=16, calib_samples=256)
    rtn, rec_rtn = stage_on(weight_only_quant, mlp.module, cfg, digits)
    gptq, rec = stage_on(weight_only_quant, mlp.module,
                         cfg.model_copy(update={"method": "gptq"}), digits)
    for name, e in rec.details["layers"].items():
        assert e["fallback"] is None
        assert e["output_rel_error"] < e["output_rel_error_rtn"], name
        assert e["output_rel_error_rtn"] == pytest.approx(
            rec_rtn.details["layers"][name]["output_rel_error"], rel=1e-6)
    x, y = digits.x_test, digits.y_test
    with torch.no_grad():
        acc_ref = accuracy(mlp.module(x), y)["top1"]
        acc_gptq = accuracy(gptq(x), y)["top1"]
    assert acc_gptq > acc_ref - 0.05


def test_weight_only_stage_in_a_recipe(digits, tmp_path: Path):
    from slimkit.pipeline import STAGES, compress, load_recipe
    from slimkit.train import TrainConfig, fit

    torch.manual_seed(0)
    model = load_zoo("lenet300", digits)  # a zoo model: the artifact replays the plan
    fit(model.module, digits, TrainConfig(epochs=2, lr=3e-3), progress=False)

    assert "weight_only_quant" in STAGES
    stage = {"kind": "weight_only_quant", "bits": 4, "group_size": 16, "method": "gptq",
             "calib_samples": 128}
    recipe = load_recipe({"stages": [stage], "target": {"max_accuracy_drop": 50.0},
                          "measure": {"threads": 1, "batch_sizes": [1], "warmup": 1,
                                      "repeats": 2}})
    report = compress(model, digits, recipe, tmp_path / "out", progress=False,
                      log=lambda s: None)
    entry = report["stages"][0]
    assert entry["kind"] == "weight_only_quant" and len(entry["details"]["layers"]) == 3
    assert report["parity"]["ok"]
    assert report["comparison"]["size_ratio"] > 2.0
    assert report["comparison"]["onnx_size_ratio"] > 3.0
    assert report["final"]["accuracy"]["top1"] > report["baseline"]["accuracy"]["top1"] - 0.05


@pytest.mark.parametrize(("bits", "symmetric", "stored"), [(4, True, False), (8, True, False),
                                                           (3, True, True), (4, False, True)])
def test_state_bytes_match_the_estimate(bits: int, symmetric: bool, stored: bool):
    from slimkit.quant.packed import packed_nbytes

    lin = nn.Linear(100, 12)
    packed = PackedLinear.from_codes(lin, *rtn_quantize(lin.weight, bits, 32, symmetric),
                                     bits, 32, symmetric, "float16")
    assert ("zero_points" in packed.state_dict()) == stored
    assert packed.nbytes() == packed_nbytes(100, 12, bits, 32, "float16", True, symmetric)


def test_zoo_vit_onnx_keeps_a_dynamic_batch(tmp_path: Path):
    torch.manual_seed(0)
    model = load_zoo("vit", input_shape=(1, 8, 8), num_classes=10, dim=32, depth=2, heads=2)
    small, _ = stage_on(weight_only_quant, model.module, WeightOnlyConfig(group_size=16),
                        example_inputs=model.example_inputs(2))
    q = model.copy(small)
    q.arch = None
    path = export_onnx(q, tmp_path / "v.onnx")
    for batch in (1, 3):
        assert check_parity(q, path, q.example_inputs(batch), atol=1e-4)["ok"]


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (2, True)])
def test_convs_and_embeddings_pack_and_unpack_in_onnx_runtime(bits: int, symmetric: bool,
                                                             tmp_path: Path):
    """Packed conv / embedding weights equal group fake-quantization of the matrix view; the
    ONNX file keeps the packed bytes and ONNX Runtime (which unpacks them at load) agrees."""
    from slimkit.quant.packed import PackedConv, PackedEmbedding

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 40, padding_idx=0)
            self.conv = nn.Conv1d(40, 24, 3, padding=1, groups=2)
            self.dw = nn.Conv1d(24, 24, 5, padding="same", groups=24, bias=False)
            self.head = nn.Linear(24, 5)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.dw(torch.relu(self.conv(self.emb(ids).transpose(1, 2))))
            return self.head(h.mean(2))

    torch.manual_seed(0)
    net = Net().eval()
    model = SlimModel(net, (12,), name="ids", input_dtype="int64")
    cfg = WeightOnlyConfig(bits=bits, symmetric=symmetric, group_size=16, scale_dtype="float32",
                           layer_types=["Linear", "Conv", "Embedding"])
    small, rec = stage_on(weight_only_quant, net,
                          cfg, example_inputs=(torch.randint(0, 50, (2, 12)),))
    assert isinstance(small.emb, PackedEmbedding) and isinstance(small.conv, PackedConv)
    assert isinstance(small.head, PackedLinear)
    packed_dw = bits < 8  # 8-bit codes of 5-wide rows padded to 16 would not be smaller
    assert isinstance(small.dw, PackedConv) == packed_dw
    assert packed_dw or "would not be smaller" in {s["what"]: s["why"] for s in rec.skipped}["dw"]
    for name in ("emb", "conv", "dw")[:3 if packed_dw else 2]:
        w = getattr(net, name).weight.detach()
        flat = w.reshape(w.shape[0], -1)
        padded = torch.nn.functional.pad(flat, (0, (-flat.shape[1]) % 16))
        ref = fake_quantize(padded, bits, symmetric, signed=symmetric, granularity="group:16")
        got = getattr(small, name).weight()
        torch.testing.assert_close(got, ref[:, :flat.shape[1]], rtol=0, atol=1e-6, msg=name)
        assert getattr(small, name).weight_packed.dtype == torch.uint8
    assert rec.details["layers"]["conv"]["method"] == "rtn"
    ids = torch.randint(0, 50, (3, 12))
    path = export_onnx(model.copy(small), tmp_path / "ids.onnx")
    inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    assert inits["emb.weight_packed"].data_type == onnx.TensorProto.UINT8
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                   and i.dims[0] * i.dims[1] >= 50 * 40 for i in inits.values())
    parity = check_parity(model.copy(small), path, (ids,), atol=1e-5)
    assert parity["ok"], parity
    with torch.no_grad():
        assert float((small(ids) - net(ids)).abs().max()) < (0.05 if bits >= 4 else 1.0)


def test_gptq_covers_linears_and_rounds_convs_to_nearest(digits):
    model = load_zoo("lenet5", digits)
    cfg = WeightOnlyConfig(method="gptq", group_size=16, layer_types=["Conv", "Linear"])
    small, rec = stage_on(weight_only_quant, model.module, cfg, digits)
    layers = rec.details["layers"]
    conv = next(n for n, e in layers.items() if e["type"] == "Conv2d")
    lin = next(n for n, e in layers.items() if e["type"] == "Linear")
    assert layers[conv]["method"] == "rtn" and "gptq covers Linear" in layers[conv]["method_note"]
    assert layers[lin]["method"] == "gptq" and "output_rel_error_rtn" in layers[lin]
    assert any("gptq covers Linear" in c for c in rec.changed)


def test_fp16_biases_keep_their_sign_in_torch_and_onnx(tmp_path: Path):
    """Issue 15, item 6: fp16 storage clamped every bias like a scale (negative -> +6.1e-05)."""
    from slimkit.quant.packed import PackedConv

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 24, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24 * 14, 32),
                        nn.GELU(), nn.Linear(32, 6)).eval()
    with torch.no_grad():
        for i in (0, 3, 5):
            net[i].bias.sub_(0.5)
    model = SlimModel(net, (4, 16), name="neg-bias")
    cfg = WeightOnlyConfig(bits=8, group_size=16, layer_types=["Linear", "Conv"])
    small, rec = stage_on(weight_only_quant, net, cfg, example_inputs=model.example_inputs(2))
    assert isinstance(small[0], PackedConv) and isinstance(small[5], PackedLinear)
    for i in (0, 3, 5):
        ref = net[i].bias.detach()
        assert small[i].bias.dtype == torch.float16 and bool((ref < 0).any())
        torch.testing.assert_close(small[i].bias, ref.half(), rtol=0, atol=0)
        assert rec.details["plan"]["layers"][str(i)]["bias_dtype"] == "float16"
    x = model.example_inputs(64)[0]
    with torch.no_grad():
        err = (small(x) - net(x)).double().pow(2).mean() / net(x).double().pow(2).mean()
    assert float(err) < 1e-3  # int8: ~1e-5 (the clamped biases gave ~0.3)
    q = model.copy(small)
    q.arch = None
    path = export_onnx(q, tmp_path / "q.onnx")
    parity = check_parity(q, path, q.example_inputs(5), atol=1e-4)
    assert parity["ok"], parity


def test_a_bias_beyond_float16_stays_float32_and_round_trips(tmp_path: Path):
    from slimkit.io import load_artifact, save_artifact
    from slimkit.quant.packed import packed_nbytes
    from slimkit.quant.primitives import bias_dtype

    assert bias_dtype(torch.tensor([-0.5, 7e4]), "float16") == "float32"
    assert bias_dtype(torch.tensor([-0.5, 6e4]), "float16") == "float16"
    assert bias_dtype(torch.tensor([7e4]), "float32") == "float32"
    torch.manual_seed(0)
    model = load_zoo("lenet300", input_shape=(1, 8, 8), num_classes=10)
    fc = [m for m in model.module.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        fc[0].bias[0] = -7e4  # a dead unit fp16 cannot hold (-inf)
        fc[1].bias.sub_(0.5)
    out, rec = weight_only_quant(model, WeightOnlyConfig(bits=4, group_size=16))
    layers = rec.details["plan"]["layers"]
    first, second = [n for n, m in model.module.named_modules() if isinstance(m, nn.Linear)][:2]
    assert layers[first]["bias_dtype"] == "float32" and layers[second]["bias_dtype"] == "float16"
    packed = out.module.get_submodule(first)
    assert packed.bias.dtype == torch.float32 and float(packed.bias[0]) == -7e4
    assert packed.nbytes() == layers[first]["bytes_after"] == packed_nbytes(
        64, 300, 4, 16, "float16", True, True, "float32")
    save_artifact(out, tmp_path / "q")
    back = load_artifact(tmp_path / "q")
    assert back.module.get_submodule(first).bias.dtype == torch.float32
    x = model.example_inputs(3)
    torch.testing.assert_close(back.module(*x), out.module.eval()(*x), rtol=0, atol=0)
