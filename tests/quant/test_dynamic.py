"""Dynamic INT8: the PyTorch forward is what ONNX Runtime computes, in integers."""

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from tests._stages import stage_on
from torch import nn

from slimkit.core.errors import ConfigError, DataError
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.io.loader import load_zoo
from slimkit.io.model import SlimModel
from slimkit.quant.dynamic import DynamicQuantConfig, _dynamic_quant, dynamic_quant
from slimkit.quant.dynamic_linear import DynamicQuantLinear


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, per_row: bool,
              top: int = 127) -> np.ndarray:
    """float64 numpy: int8 per-channel weights, uint8 DynamicQuantizeLinear-style inputs."""
    s_w = np.maximum(np.abs(w).max(axis=1) / top, 1e-12)
    w_q = np.clip(np.round(w / s_w[:, None]), -top, top)
    x2 = x.reshape(-1, x.shape[-1])
    axis = 1 if per_row else None
    lo = np.minimum(x2.min(axis=axis, keepdims=True), 0)
    hi = np.maximum(x2.max(axis=axis, keepdims=True), 0)
    s_x = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    z_x = np.clip(np.round(-lo / s_x), 0, 255)
    q = np.clip(np.round(x2 / s_x) + z_x, 0, 255)
    y = ((q - z_x) @ w_q.T) * s_x * s_w + b
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize(("activations", "reduce_range"), [("token", False), ("tensor", False),
                                                          ("tensor", True)])
def test_forward_matches_the_integer_reference(activations: str, reduce_range: bool):
    torch.manual_seed(0)
    lin = nn.Linear(48, 20)
    q = DynamicQuantLinear.from_linear(lin, activations, reduce_range)
    x = torch.randn(3, 5, 48) * torch.linspace(0.1, 3.0, 5)[:, None]
    x[0, 0] = 0.0  # an all-zero row keeps a finite scale
    ref = reference(x.double().numpy(), lin.weight.detach().double().numpy(),
                    lin.bias.detach().double().numpy(), activations == "token",
                    63 if reduce_range else 127)
    np.testing.assert_allclose(q(x).detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert q.weight_q.dtype == torch.int8
    assert int(q.weight_q.abs().max()) == (63 if reduce_range else 127)
    assert torch.isfinite(q(torch.zeros(2, 48))).all()


def test_per_token_is_closer_than_per_tensor_when_tokens_differ():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(64, 64) * torch.logspace(-2, 1, 64)[:, None]
    with torch.no_grad():
        ref = lin(x)
        # mean relative error per token: small tokens are what one shared scale crushes
        errs = {a: float(((DynamicQuantLinear.from_linear(lin, a)(x) - ref).norm(dim=1)
                          / ref.norm(dim=1)).mean()) for a in ("token", "tensor")}
    assert errs["token"] < 0.3 * errs["tensor"]


@pytest.mark.parametrize(("activations", "reduce_range"), [("token", False), ("tensor", False),
                                                          ("tensor", True)])
def test_onnx_runs_in_integers_with_parity(activations: str, reduce_range: bool,
                                           tmp_path: Path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 10))
    model = SlimModel(net, (6, 128), name="tiny")
    cfg = DynamicQuantConfig(activations=activations, reduce_range=reduce_range)
    small, rec = stage_on(dynamic_quant, net, cfg, example_inputs=model.example_inputs(2))
    q = model.copy(small)
    path = export_onnx(q, tmp_path / "q.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops and "Gemm" not in ops
    if activations == "tensor":
        assert ops.count("DynamicQuantizeLinear") == 2
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        fused = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
        assert fused.count("DynamicQuantizeMatMul") == 2  # ONNX Runtime fused the chain
    assert {i.data_type for i in graph.initializer if len(i.dims) == 2} == {
        onnx.TensorProto.INT8 if reduce_range else onnx.TensorProto.UINT8}
    for batch in (1, 7):
        parity = check_parity(q, path, q.example_inputs(batch), atol=1e-5)
        assert parity["ok"], parity
    fp32 = export_onnx(model, tmp_path / "f.onnx")
    assert path.stat().st_size < 0.45 * fp32.stat().st_size
    assert rec.details["totals"]["ratio"] > 3


def test_sensitive_layers_stay_float_and_are_reported(mlp, digits):
    _, rec = stage_on(dynamic_quant, mlp.module, DynamicQuantConfig(), digits)
    errors = {n: e["output_rel_error"] for n, e in rec.details["layers"].items()}
    assert set(errors) == {"1", "3", "5"} and all(0 < e < 0.05 for e in errors.values())
    worst = max(errors, key=errors.get)
    q, rec = stage_on(dynamic_quant, mlp.module, DynamicQuantConfig(keep_worst=1), digits)
    assert worst not in rec.details["layers"] and isinstance(q.get_submodule(worst), nn.Linear)
    assert "most sensitive" in {s["what"]: s["why"] for s in rec.skipped}[worst]
    limit = sorted(errors.values())[0] * 1.0001
    _, rec = stage_on(dynamic_quant, mlp.module, DynamicQuantConfig(max_layer_error=limit), digits)
    assert len(rec.details["layers"]) == 1
    with pytest.raises(ConfigError, match="need calibration data"):
        stage_on(dynamic_quant, mlp.module, DynamicQuantConfig(keep_worst=1))
    with pytest.raises(ConfigError, match="no Linear layer"):
        stage_on(dynamic_quant, nn.Sequential(nn.Conv2d(1, 2, 3)), DynamicQuantConfig())
    with pytest.raises(DataError, match="constant"):
        _dynamic_quant(mlp.module, DynamicQuantConfig(), calib_x=torch.zeros(4, 1, 8, 8))


def test_artifact_round_trip_and_stage(digits, tmp_path: Path):
    from slimkit.io import load_artifact, save_artifact
    from slimkit.pipeline import STAGES, compress, load_recipe
    from slimkit.train import TrainConfig, fit

    torch.manual_seed(0)
    model = load_zoo("vit", input_shape=(1, 8, 8), num_classes=10, dim=32, depth=1, heads=2)
    out, rec = dynamic_quant(model, DynamicQuantConfig(exclude=["head"]))
    small = out.module
    save_artifact(out, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    x = model.example_inputs(3)
    torch.testing.assert_close(back.module(*x), small.eval()(*x), rtol=0, atol=0)
    assert isinstance(back.module.head, nn.Linear)

    assert "dynamic_quant" in STAGES
    recipe = load_recipe({"stages": [{"kind": "dynamic_quant", "activations": "token"}],
                          "target": {"max_accuracy_drop": 50.0},
                          "measure": {"threads": 1, "batch_sizes": [1], "warmup": 1,
                                      "repeats": 2}})
    torch.manual_seed(0)
    lenet = load_zoo("lenet300", digits)  # a zoo model: the artifact replays the plan
    fit(lenet.module, digits, TrainConfig(epochs=2, lr=3e-3), progress=False)
    report = compress(lenet, digits, recipe, tmp_path / "out", progress=False,
                      log=lambda s: None)
    assert report["parity"]["ok"] and report["comparison"]["onnx_size_ratio"] > 2.0
    assert report["final"]["accuracy"]["top1"] > report["baseline"]["accuracy"]["top1"] - 0.02


@pytest.mark.parametrize("activations", ["token", "tensor"])
def test_zoo_vit_onnx_keeps_a_dynamic_batch(activations: str, tmp_path: Path):
    torch.manual_seed(0)
    model = load_zoo("vit", input_shape=(1, 8, 8), num_classes=10, dim=32, depth=2, heads=2)
    small, _ = stage_on(dynamic_quant, model.module, DynamicQuantConfig(activations=activations),
                        example_inputs=model.example_inputs(2))
    q = model.copy(small)
    q.arch = None
    path = export_onnx(q, tmp_path / "v.onnx")
    for batch in (1, 3):
        assert check_parity(q, path, q.example_inputs(batch), atol=1e-4)["ok"]


class _Siblings(nn.Module):
    """q/k/v-style linears reading one tensor (one without bias), plus one reading another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 24)
        self.nb1, self.nb2 = nn.Linear(32, 8, bias=False), nn.Linear(32, 8, bias=False)
        self.other = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return torch.cat([att, self.nb1(h) * self.nb2(h), self.other(q)], dim=-1)


@pytest.mark.parametrize("reduce_range", [False, True])
def test_siblings_share_one_integer_matmul_bit_exactly(reduce_range: bool, tmp_path: Path):
    import onnxruntime as ort

    from slimkit.export.fuse import fuse_sibling_matmul_integer

    torch.manual_seed(0)
    model = SlimModel(_Siblings(), (5, 32), name="siblings")
    cfg = DynamicQuantConfig(activations="tensor", reduce_range=reduce_range)
    small, _ = stage_on(dynamic_quant, model.module, cfg, example_inputs=model.example_inputs(2))
    q = model.copy(small)
    path = export_onnx(q, tmp_path / "q.onnx")  # export fuses
    fused = onnx.load(str(path))
    ops = [n.op_type for n in fused.graph.node]
    # q/k/v and nb1/nb2 (no bias) -> one; other (reads q) alone
    assert ops.count("MatMulInteger") == 2 and ops.count("DynamicQuantizeLinear") == 2
    assert ops.count("Split") == 1
    for batch in (1, 4):
        parity = check_parity(q, path, q.example_inputs(batch), atol=1e-5)
        assert parity["ok"], parity
    # the unfused export gives exactly the same numbers in ONNX Runtime
    plain = tmp_path / "plain.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("slimkit.export.onnx.fuse_file", lambda p: [])
        export_onnx(q, plain)
    assert [n.op_type for n in onnx.load(str(plain)).graph.node].count("MatMulInteger") == 6
    x = {"input": q.example_inputs(3)[0].numpy()}
    a = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(a, b)
    assert fuse_sibling_matmul_integer(ir.from_proto(fused)) == []  # nothing left to merge
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert optimized.count("DynamicQuantizeMatMul") == 2  # one fused kernel per group
    assert "MatMulInteger" not in optimized and "DynamicQuantizeLinear" not in optimized


def test_parity_of_a_dynamic_model_is_relative_and_still_catches_a_wrong_export(
        tmp_path: Path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = SlimModel(net, (16,), name="mlp")
    small, _ = stage_on(dynamic_quant, net, DynamicQuantConfig(activations="token"),
                        example_inputs=model.example_inputs(2))
    q = model.copy(small)
    path = export_onnx(q, tmp_path / "q.onnx")
    x = q.example_inputs(8, seed=1)
    parity = check_parity(q, path, x, atol=1e-6)
    with torch.no_grad():
        top = float(q.module(*x).abs().max())
    assert parity["ok"] and parity["exact_fraction"] == 1.0
    assert parity["rtol"] == 0.01 and parity["atol"] == pytest.approx(0.01 * top)
    with torch.no_grad():  # the file no longer matches the model: 3% of the output range off
        q.module[2].bias += 0.03 * top
    wrong = check_parity(q, path, x, atol=1e-6)
    assert not wrong["ok"] and wrong["max_abs_diff"] == pytest.approx(0.03 * top, rel=1e-3)
