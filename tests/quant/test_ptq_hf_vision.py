"""PTQ of a Hugging Face vision model: conv hyperparameters read through QuantLayer (TF "SAME"
padding), BatchNorm folded through a torch.export graph (float64 reference), outputs shared
through ReLU6 and zero padding, and an ONNX graph that runs every conv as an integer kernel."""

import pytest
import torch
import torch.nn.functional as F
from tests._stages import as_model
from torch import nn

from slimkit.core.stages import StageContext
from slimkit.export.onnx import check_parity, export_onnx
from slimkit.graph.chains import bn_analysis, output_links
from slimkit.quant.fold import fold_batchnorms
from slimkit.quant.modules import LAYER_ATTRS, FakeQuant, QuantLayer
from slimkit.quant.ptq import PtqConfig, ptq

transformers = pytest.importorskip("transformers")


def tiny_mobilenetv2(tf_padding: bool = True) -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    cfg = MobileNetV2Config(num_labels=10, image_size=32, depth_multiplier=0.35,
                            tf_padding=tf_padding)
    net = MobileNetV2ForImageClassification(cfg).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def test_quant_layer_reads_the_conv_hyperparameters_through():
    conv = nn.Conv2d(4, 8, (3, 5), stride=(2, 1), dilation=(1, 2), groups=2)
    ql = QuantLayer(conv, FakeQuant(8, granularity="channel"))
    for name in ("stride", "kernel_size", "dilation", "groups", "padding", "in_channels"):
        assert getattr(ql, name) == getattr(conv, name)
    assert QuantLayer(nn.Linear(3, 5)).out_features == 5
    assert "weight_q" not in LAYER_ATTRS
    with pytest.raises(AttributeError):
        _ = ql.not_an_attribute
    with pytest.raises(AttributeError):  # a Linear has no stride: not invented
        _ = QuantLayer(nn.Linear(3, 5)).stride


def test_hf_batchnorm_folds_through_torch_export_against_float64():
    net = tiny_mobilenetv2().double()
    x = {"pixel_values": torch.randn(2, 3, 32, 32, dtype=torch.float64)}
    ref = net(**x).logits
    bns = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn_analysis(net)[0] is None  # torch.fx cannot trace it: the reason is recorded
    assert "no example batch" in bn_analysis(net)[1][0]["why"]
    pairs, skipped = fold_batchnorms(net, x)
    assert skipped == [] and sorted(bn for _, bn in pairs) == sorted(bns)
    assert all(isinstance(net.get_submodule(bn), nn.Identity) for bn in bns)
    torch.testing.assert_close(net(**x).logits, ref, rtol=1e-10, atol=1e-10)


def test_hf_outputs_are_shared_through_relu6_and_zero_padding():
    net = tiny_mobilenetv2()
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    fold_batchnorms(net, x)
    convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    links = output_links(net, convs, x)
    stem = links["mobilenet_v2.conv_stem.first_conv.convolution"]
    assert stem["consumer"] == "mobilenet_v2.conv_stem.conv_3x3.convolution"
    assert stem["relu"] and stem["clip_max"] == 6.0
    assert stem["relu_module"] == "mobilenet_v2.conv_stem.first_conv.activation"
    # a projection conv feeding a residual add is not linked (the add changes values)
    proj = links["mobilenet_v2.layer.1.reduce_1x1.convolution"]
    assert proj["consumer"] is None and not proj["relu"]


@pytest.mark.parametrize("tf_padding", [True, False])
def test_hf_mobilenetv2_ptq_runs_every_conv_as_an_integer_kernel(tf_padding):
    net = tiny_mobilenetv2(tf_padding)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = net(pixel_values=x).logits
    import slimkit

    model = slimkit.wrap(net)
    q, rec = ptq(model, PtqConfig(num_samples=8, batch_size=8, min_conv_reduction=0,
                                   calibration="minmax"),
                 StageContext(data={"pixel_values": x}, progress=False))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert len(rec.details["bn_pairs"]) == n_bn
    assert not [s for s in rec.skipped if "folded" in s["why"] or "traced" in s["why"]]
    with torch.no_grad():
        out = q.module(pixel_values=x).logits
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.95
    ops = rec.details["ort_int8"]
    assert ops["float_compute"] == [] and ops["float_fallbacks"] == []
    n_conv = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert ops["op_counts"]["QLinearConv"] == n_conv
    assert not {"Pad", "Clip", "BatchNormalization", "Add"} & set(ops["op_counts"])
    # every residual add (10 in MobileNetV2) runs as an integer add
    assert len(rec.details["residual_outputs"]) == ops["op_counts"]["QLinearAdd"] == 10


def test_hf_mobilenetv2_ptq_artifact_round_trip_gives_equal_outputs(tmp_path):
    import slimkit
    from slimkit.io.artifact import load_artifact, save_artifact

    net = tiny_mobilenetv2()
    x = torch.randn(4, 3, 32, 32)
    q, rec = ptq(slimkit.wrap(net), PtqConfig(num_samples=4, batch_size=4, min_conv_reduction=0,
                                             calibration="minmax"),
                 StageContext(data={"pixel_values": x}, progress=False))
    assert rec.details["residual_outputs"]
    save_artifact(q, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(back.module(pixel_values=x).logits,
                                   q.module(pixel_values=x).logits, rtol=0, atol=0)


def test_zero_pad_and_relu6_between_quantized_convs_export_exactly(tmp_path):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(8, 16, 1)
            self.b = nn.Conv2d(16, 16, 3, stride=2)
            self.c = nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.pad(F.relu6(self.a(x)), (0, 1, 0, 1))  # TF "SAME" padding, asymmetric
            return self.c(F.relu6(self.b(y)))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(16, 8, 9, 9) * 2
    model = as_model(net, example_inputs=(x,))
    q, rec = ptq(model, PtqConfig(num_samples=16, calibration="minmax", min_conv_reduction=0),
                 StageContext(data=x, progress=False))
    assert rec.details["layers"]["a"]["output_shared_with"] == "b"
    ops = rec.details["ort_int8"]["op_counts"]
    assert ops["QLinearConv"] == 3 and not {"Pad", "Clip", "Conv"} & set(ops)
    parity = check_parity(q, export_onnx(q, tmp_path / "q.onnx"), (x,))
    assert parity["ok"] and parity["exact_fraction"] > 0.99, parity


def test_parity_bound_covers_float32_rounding_of_two_steps_only():
    from slimkit.export.onnx import _grid_rounding

    step = torch.tensor(0.0371, dtype=torch.float32)
    codes = torch.arange(-3000, 3000, dtype=torch.float32)
    ref, got = codes * step, (codes + 2) * step  # two codes apart, as float32 writes them
    diff = (got - ref).abs()
    bound = 2 * float(step) + _grid_rounding(ref)
    assert float(diff.max()) > 2 * float(step)  # the edge the bare 2-step rule failed on
    assert float(diff.max()) <= bound
    assert 2.5 * float(step) > bound  # a third code apart still fails


def test_unfoldable_batchnorms_are_recorded_with_the_reason():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y + x) + self.bn2(self.conv2(x))  # bn follows an add: not foldable

    net = Net().eval()
    x = torch.randn(2, 4, 5, 5)
    ref = net(x)
    pairs, skipped = fold_batchnorms(net, x)
    assert pairs == [("conv2", "bn2")]
    assert skipped == [{"what": "bn", "why": "not folded: its input is not the output of a "
                                             "Conv/Linear"}]
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("scale", "dropped"), [(6.0 / 255, True), (0.05, False)])
def test_clip_between_dequantize_and_quantize_is_dropped_only_when_exact(scale, dropped):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slimkit.export.qdq import rewrite_qdq

    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "z"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"]),
             helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),  # a ReLU6
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", TensorProto.UINT8,
                                                                          [256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    codes = {"q": np.arange(256, dtype=np.uint8)}

    def run(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, codes)[0]

    before = run(model)
    stats = rewrite_qdq(model)
    assert stats["clips_dropped"] == int(dropped)
    assert ("Clip" in {n.op_type for n in model.graph.node}) != dropped
    np.testing.assert_array_equal(run(model), before)  # the rewrite never changes a value


def test_zoo_mobilenetv2_residual_adds_found_through_torch_fx():
    from slimkit.graph.chains import residual_outputs, shared_consumers
    from slimkit.io.loader import load_zoo

    net = load_zoo("mobilenetv2", input_shape=(3, 32, 32), num_classes=10).module.eval()
    fold_batchnorms(net)  # fx-traceable: no example needed
    convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    residual = residual_outputs(net, convs)
    blocks = [n for n, m in net.named_modules() if getattr(m, "use_res", None) is True
              or getattr(m, "use_res_connect", None) is True]
    assert len(residual) == 10 and (not blocks or set(residual) == set(blocks))
    for block, r in residual.items():  # the consumer is the next block's first conv
        assert r["consumer"].startswith("features.") and r["consumer"] in convs
        assert not r["consumer"].startswith(block + ".")
    # the projection convs of non-residual blocks feed the next block's add and first conv
    assert len(shared_consumers(net, convs)) == 5
