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


# ------------------------------------------------------------- the rewrite on hand-built graphs

_F, _U8, _I8, _I32 = (onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.INT8,
                      onnx.TensorProto.INT32)


def _model(nodes: list, inits: dict, out_shape: list) -> "onnx.ModelProto":
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", _F, ["batch", 2, 6, 6])],
        [helper.make_tensor_value_info("y", _F, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _describe(model: "onnx.ModelProto") -> list[tuple]:
    """Nodes in order, each input named by the node and output index producing it, as the
    graph input, or by a constant's dtype and values: equal descriptions, equal graphs."""
    from onnx import helper, numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    made = {o: (k, j) for k, n in enumerate(model.graph.node) for j, o in enumerate(n.output)}

    def source(name: str) -> tuple:
        if name in inits:
            return ("const", inits[name].dtype.str, inits[name].tolist())
        return ("node", *made[name]) if name in made else ("input", name)

    return [(n.op_type, [source(i) for i in n.input],
             sorted((a.name, helper.get_attribute_value(a)) for a in n.attribute))
            for n in model.graph.node] + [("outputs", [source(o.name) for o in
                                                       model.graph.output])]


def _run(model: "onnx.ModelProto", x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_rewrite_of_a_conv_relu_pool_flatten_graph_gives_the_expected_graph():
    from onnx import helper

    from slimkit.export.qdq import rewrite_qdq

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    s_x, s_w, s_y = np.float32(0.02), np.array([0.01, 0.02, 0.04], np.float32), np.float32(0.05)
    z8, zc = np.uint8(0), np.zeros(3, np.int8)
    q, dq = "QuantizeLinear", "DequantizeLinear"
    nodes = [helper.make_node("Identity", ["s_y"], ["s_y2"]),  # the exporter's shared scale
             helper.make_node(q, ["x", "s_x", "z"], ["xq"]),
             helper.make_node(dq, ["xq", "s_x", "z"], ["xd"]),
             helper.make_node(q, ["w", "s_w", "zc"], ["wq"], axis=0),
             helper.make_node(dq, ["wq", "s_w", "zc"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node(q, ["c", "s_y", "z"], ["cq"]),
             helper.make_node(dq, ["cq", "s_y", "z"], ["cd"]),
             helper.make_node("Relu", ["cd"], ["r"]),  # zero point 0 of uint8: >= 0 already
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node(q, ["p", "s_y2", "z"], ["pq"]),
             helper.make_node(dq, ["pq", "s_y2", "z"], ["pd"]),
             helper.make_node("Flatten", ["pd"], ["f"]),
             helper.make_node(q, ["f", "s_y2", "z"], ["fq"]),
             helper.make_node(dq, ["fq", "s_y2", "z"], ["y"])]
    consts = {"s_x": s_x, "z": z8, "w": w, "s_w": s_w, "zc": zc, "b": b, "s_y": s_y}
    model = _model(nodes, consts, ["batch", 27])
    x = rng.normal(size=(4, 2, 6, 6)).astype(np.float32)
    before = _run(model, x)

    stats = rewrite_qdq(model)

    assert stats == {"identities": 1, "constants_folded": 0, "int8_weights": 1,
                     "int32_biases": 1, "relus_dropped": 1, "pads_into_convs": 0,
                     "clips_dropped": 0, "requantize_dropped": 0, "int8_shape_ops": 2,
                     "float_pools_pinned": 0}
    # Expected: the weight and bias stored as integers (computed here independently), the
    # Relu gone, max pooling and flattening run on the uint8 codes.
    codes = np.clip(np.rint(w / s_w[:, None, None, None]), -128, 127).astype(np.int8)
    bias_scale = (s_x * s_w).astype(np.float32)
    bias = np.rint(b.astype(np.float64) / bias_scale).astype(np.int32)
    expected = _model(
        [helper.make_node(q, ["x", "s_x", "z"], ["xq"]),
         helper.make_node(dq, ["codes", "s_w", "zc"], ["wd"], axis=0),
         helper.make_node(dq, ["bias", "bias_scale", "bias_zero"], ["bd"], axis=0),
         helper.make_node(dq, ["xq", "s_x", "z"], ["xd"]),
         helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node(q, ["c", "s_y", "z"], ["cq"]),
         helper.make_node("MaxPool", ["cq"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node(dq, ["f", "s_y", "z"], ["y"])],
        {"s_x": s_x, "z": z8, "codes": codes, "s_w": s_w, "zc": zc, "bias": bias,
         "bias_scale": bias_scale, "bias_zero": np.zeros(3, np.int32), "s_y": s_y},
        ["batch", 27])
    assert _describe(model) == _describe(expected)
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(_run(model, x), before)  # every rewrite is exact


def test_rewrite_folds_a_computed_zero_pad_into_the_conv_and_keeps_the_output_name():
    from onnx import helper

    from slimkit.export.qdq import rewrite_qdq

    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    s, s_w, z8 = np.float32(0.03), np.float32(0.02), np.uint8(0)
    q, dq = "QuantizeLinear", "DequantizeLinear"
    # TF "SAME" padding as the exporter leaves it: the pads computed by a Concat of constants.
    nodes = [helper.make_node(q, ["x", "s", "z"], ["xq"]),
             helper.make_node(dq, ["xq", "s", "z"], ["xd"]),
             helper.make_node("Concat", ["p0", "p1"], ["pads"], axis=0),
             helper.make_node("Pad", ["xd", "pads"], ["xp"]),
             helper.make_node(q, ["xp", "s", "z"], ["pq"]),
             helper.make_node(dq, ["pq", "s", "z"], ["pd"]),
             helper.make_node(q, ["w", "s_w", "zw"], ["wq"]),
             helper.make_node(dq, ["wq", "s_w", "zw"], ["wd"]),
             helper.make_node("Conv", ["pd", "wd"], ["c"], strides=[2, 2]),
             helper.make_node(q, ["c", "s", "z"], ["cq"]),
             helper.make_node(dq, ["cq", "s", "z"], ["cd"]),
             helper.make_node("Relu", ["cd"], ["y"])]  # a graph output: its name must stay
    consts = {"s": s, "z": z8, "p0": np.array([0, 0, 0, 0], np.int64),
              "p1": np.array([0, 0, 1, 1], np.int64), "w": w, "s_w": s_w, "zw": np.int8(0)}
    model = _model(nodes, consts, ["batch", 3, 3, 3])
    x = rng.normal(size=(4, 2, 6, 6)).astype(np.float32)
    before = _run(model, x)

    stats = rewrite_qdq(model)

    assert {k: v for k, v in stats.items() if v} == {
        "constants_folded": 1, "int8_weights": 1, "relus_dropped": 1, "pads_into_convs": 1,
        "requantize_dropped": 1}  # Q(DQ(xq)) with equal qparams: the codes themselves
    codes = np.clip(np.rint(w / s_w), -128, 127).astype(np.int8)
    expected = _model(
        [helper.make_node(q, ["x", "s", "z"], ["xq"]),
         helper.make_node(dq, ["codes", "s_w", "zw"], ["wd"]),
         helper.make_node(dq, ["xq", "s", "z"], ["xd"]),
         helper.make_node("Conv", ["xd", "wd"], ["c"], strides=[2, 2], pads=[0, 0, 1, 1]),
         helper.make_node(q, ["c", "s", "z"], ["cq"]),
         helper.make_node(dq, ["cq", "s", "z"], ["cd"]),
         helper.make_node("Identity", ["cd"], ["y"])],
        {"s": s, "z": z8, "codes": codes, "s_w": s_w, "zw": np.int8(0)}, ["batch", 3, 3, 3])
    assert _describe(model) == _describe(expected)
    assert [o.name for o in model.graph.output] == ["y"]
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(_run(model, x), before)
