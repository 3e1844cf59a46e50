"""QDQ export: int8 initializers, integer kernels in ONNX Runtime, parity with PyTorch."""

import numpy as np
import pytest
import torch
from tests._stages import stage_on
from torch import nn

from slimkit.data.bundle import DataBundle
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.export.qdq import int8_ops
from slimkit.io.model import SlimModel
from slimkit.quant.modules import FakeQuant, QuantLayer
from slimkit.quant.ptq import PtqConfig, ptq
from slimkit.train.loop import TrainConfig, fit

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx.numpy_helper")
ort = pytest.importorskip("onnxruntime")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))


@pytest.fixture(scope="module")
def quantized(digits: DataBundle) -> tuple[SlimModel, SlimModel]:
    net = _net()
    fit(net, digits, TrainConfig(epochs=1, lr=5e-3), progress=False)
    net.eval()
    q, _ = stage_on(ptq, net, PtqConfig(num_samples=256, min_conv_reduction=0), digits)
    spec = {"input_shape": (1, 8, 8), "name": "convnet", "num_classes": 10}
    return SlimModel(module=net, **spec), SlimModel(module=q, **spec)


def test_onnx_holds_int8_weights_and_is_about_4x_smaller(quantized, tmp_path):
    fp, q = quantized
    f32 = export_onnx(fp, tmp_path / "fp.onnx")
    i8 = export_onnx(q, tmp_path / "q.onnx")
    graph = onnx.load(str(i8)).graph
    numel = {}
    for t in graph.initializer:
        numel[t.data_type] = numel.get(t.data_type, 0) + int(np.prod(t.dims))
    # Weights are int8 codes, biases int32; only scales (one per channel) stay float.
    assert numel[onnx.TensorProto.INT8] > 40_000
    assert numel[onnx.TensorProto.FLOAT] < 0.05 * numel[onnx.TensorProto.INT8]
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    for node in (n for n in graph.node if n.op_type in ("Conv", "Gemm")):
        dq = producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
        assert inits[producer[node.input[2]].input[0]].data_type == onnx.TensorProto.INT32
    assert f32.stat().st_size / i8.stat().st_size >= 3.0  # small net: scales + graph overhead
    ops = [n.op_type for n in graph.node]
    assert "Relu" not in ops and ops.count("QuantizeLinear") >= 4


def test_ort_runs_every_layer_as_an_integer_kernel(quantized, tmp_path):
    _, q = quantized
    info = int8_ops(export_onnx(q, tmp_path / "q.onnx"))
    assert info["all_int8"] and not info["float_fallbacks"], info
    assert info["op_counts"].get("QLinearConv") == 2 and info["op_counts"].get("QGemm") == 2


def test_parity_with_pytorch_simulation(quantized, digits, tmp_path):
    _, q = quantized
    path = export_onnx(q, tmp_path / "q.onnx")
    par = check_parity(q, path, (digits.x_test,))
    assert par["ok"] and par["exact_fraction"] >= 0.95, par
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": digits.x_test.numpy()})[0].argmax(1)
    with torch.no_grad():
        ref = q.module(digits.x_test).argmax(1).numpy()
    assert (got == ref).mean() >= 0.99


def test_float_fallback_is_flagged(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3)
    fq = FakeQuant(8, symmetric=False, signed=False)
    fq.set_range(torch.tensor(0.0), torch.tensor(1.0))
    # Input quantized but the weight left float: ORT cannot fuse, the Conv runs in float.
    net = nn.Sequential(QuantLayer(conv, input=fq), nn.ReLU())
    m = SlimModel(module=net.eval(), input_shape=(1, 6, 6), name="f", num_classes=4)
    info = int8_ops(export_onnx(m, tmp_path / "f.onnx"))
    assert info["float_fallbacks"] and not info["all_int8"]


def test_unfrozen_quant_layers_export_the_same_codes(quantized, digits, tmp_path):
    # Float weights behind weight fake-quant (before freeze) give the same int8 file.
    import copy

    _, q = quantized
    net = copy.deepcopy(q.module)
    for m in net.modules():
        if isinstance(m, QuantLayer):
            w = m.weight().detach().clone()
            del m.layer.weight, m.weight_q
            m.layer.weight = nn.Parameter(w)
            m.frozen = False
    a = export_onnx(q, tmp_path / "a.onnx")
    b = export_onnx(q.copy(net), tmp_path / "b.onnx")
    codes = [{t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer
              if t.data_type == onnx.TensorProto.INT8} for p in (a, b)]
    assert codes[0].keys() == codes[1].keys() and codes[0]
    for k in codes[0]:
        np.testing.assert_array_equal(codes[0][k], codes[1][k])


def test_float_first_conv_keeps_its_pool_in_float(digits, tmp_path):
    # conv1 stays float (reduction 9): its MaxPool feeds the first quantizer. ORT would pool
    # uint8 codes in NCHW (slow); an exact Clip keeps the quantizer after the float pool.
    net = _net().eval()
    q, rec = stage_on(ptq, net, PtqConfig(num_samples=64), digits)
    assert isinstance(q[0], nn.Conv2d)
    m = SlimModel(module=q, input_shape=(1, 8, 8), name="c", num_classes=10)
    path = export_onnx(m, tmp_path / "c.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Clip") == 1 and ops.count("MaxPool") == 2
    info = int8_ops(path)
    assert info["op_counts"].get("QLinearConv") == 1 and not info["float_fallbacks"]
    assert info["op_counts"].get("Clip") == 1  # the float pool was not moved after Q
    par = check_parity(m, path, (digits.x_test,))
    assert par["ok"] and par["exact_fraction"] >= 0.95, par


def test_layers_sharing_an_equal_bias_export_and_match(digits, tmp_path):
    """The exporter merges equal biases (all zeros after BN folding): each consumer keeps its own
    int32 bias and scale."""
    torch.manual_seed(0)
    # fresh BatchNorms after bias-free convs fold into two equal all-zero biases
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 64, 10))
    net.eval()
    q, _ = stage_on(ptq, net, PtqConfig(calibration="minmax", min_conv_reduction=1), digits)
    model = SlimModel(module=q, input_shape=(1, 8, 8), name="shared-bias")
    path = export_onnx(model, tmp_path / "q.onnx")
    assert check_parity(model, path, (digits.x_test[:16],))["ok"]
