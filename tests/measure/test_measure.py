import numpy as np
import pytest
import torch
from torch import nn

from slimkit.io.loader import load_zoo
from slimkit.measure import accuracy, count_flops, count_params, fidelity, peak_memory
from slimkit.measure.latency import compare_latency, time_interleaved


def test_param_counts_match_published_figures():
    assert count_params(load_zoo("lenet300").module)["params"] == 266_610
    assert count_params(load_zoo("lenet5").module)["params"] == 431_080
    resnet = load_zoo("resnet20", input_shape=(3, 32, 32), num_classes=10).module
    assert abs(count_params(resnet)["params"] - 270_000) / 270_000 < 0.02
    macs = count_flops(resnet, (torch.randn(1, 3, 32, 32),))["macs"]
    assert abs(macs - 41e6) / 41e6 < 0.03, macs


def test_nonzero_params_and_shared_parameters_counted_once():
    lin = nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight[:5] = 0
    net = nn.Sequential(lin, lin)
    assert count_params(net) == {"params": 110, "nonzero_params": 60}


def test_macs_per_layer_match_the_formula():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 5))
    result = count_flops(net, (torch.randn(2, 3, 16, 16),))
    conv = 2 * 8 * 16 * 16 * 3 * 3 * 3
    lin = 2 * 8 * 16 * 16 * 5
    assert result["per_layer"]["0"]["macs"] == conv
    assert result["per_layer"]["2"]["macs"] == lin
    assert result["macs"] == conv + lin


def test_peak_memory_counts_live_activations():
    net = nn.Sequential(nn.Linear(100, 1000), nn.ReLU(), nn.Linear(1000, 10))
    mem = peak_memory(net, (torch.randn(64, 100),))
    weights = 4 * (100 * 1000 + 1000 + 1000 * 10 + 10)
    assert mem["weights_bytes"] == weights
    # The Linear output and the ReLU output (64 x 1000 floats each) are alive together.
    assert mem["activations_peak_bytes"] == 2 * 64 * 1000 * 4


def test_accuracy_top1_top5_against_numpy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=gen)
    y = torch.randint(0, 10, (200,), generator=gen)
    ref = np.argsort(-logits.numpy(), axis=1)
    acc = accuracy(logits, y)
    assert acc["top1"] == pytest.approx(np.mean(ref[:, 0] == y.numpy()))
    assert acc["top5"] == pytest.approx(np.mean((ref[:, :5] == y.numpy()[:, None]).any(1)))


def test_fidelity_against_float64_reference():
    a = torch.randn(50, 10)
    assert fidelity(a, a) == {"cosine": pytest.approx(1.0), "max_abs_diff": 0.0,
                              "top1_agreement": 1.0}
    b = a + 0.1 * torch.randn(50, 10)
    an, bn = a.double().numpy(), b.double().numpy()
    cos = np.mean(np.sum(an * bn, 1) / np.linalg.norm(an, axis=1) / np.linalg.norm(bn, axis=1))
    f = fidelity(a, b)
    assert f["cosine"] == pytest.approx(cos, abs=1e-9)
    assert f["max_abs_diff"] == pytest.approx(np.abs(an - bn).max())


def test_time_interleaved_alternates_and_reports_stats():
    calls = []
    stats = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                             warmup=1, repeats=4)
    assert calls.count("a") == calls.count("b") == 5
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # order rotates each round
    assert stats["a"]["repeats"] == 4 and stats["a"]["p90_ms"] >= stats["a"]["median_ms"] > 0


def test_compare_latency_in_both_runtimes(tmp_path):
    from slimkit.export.onnx import export_onnx

    model = load_zoo("lenet300", input_shape=(1, 8, 8), num_classes=10)
    path = export_onnx(model, tmp_path / "m.onnx")
    res = compare_latency({"m": (model.module, path)}, model.example_inputs(4), (1, 8),
                          threads=1, warmup=1, repeats=3)
    assert res["threads"] == 1
    for rt in ("torch", "onnxruntime"):
        assert set(res[rt]) == {"1", "8"} and res[rt]["8"]["m"]["median_ms"] > 0


def test_layer_latency_times_each_module_per_forward():
    import time as _time

    from slimkit.measure.latency import layer_latency

    class Sleep(torch.nn.Module):
        def forward(self, x):
            _time.sleep(0.004)
            return x

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.once, self.twice, self.unused = Sleep(), Sleep(), torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.twice(self.twice(self.once(x)))

    got = layer_latency(Net(), (torch.zeros(1),), ["once", "twice", "unused"], repeats=5)
    assert 4.0 <= got["once"] < 8.0
    assert 8.0 <= got["twice"] < 14.0
    assert got["unused"] is None


def test_layer_table_has_shapes_and_latency():
    from slimkit.io.loader import load_zoo
    from slimkit.measure.counts import layer_table

    model = load_zoo("lenet5", input_shape=(1, 28, 28), num_classes=10)
    rows = {r["name"]: r for r in layer_table(model.module, model.example_inputs(1))}
    assert rows["conv2"]["weight_shape"] == [50, 20, 5, 5]
    assert rows["fc1"]["macs"] == 800 * 500
    assert all(r["latency_ms"] > 0 for r in rows.values())
