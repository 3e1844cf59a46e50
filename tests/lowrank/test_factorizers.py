"""Each factorizer against direct numpy float64 computations."""

import copy

import numpy as np
import pytest
import torch
from tests._stages import stage_on
from torch import nn

from slimkit.lowrank import FACTORIZERS, LowRankConfig, lowrank, plan_lowrank
from slimkit.lowrank.plan import apply_in_place, build_plan


def _w64(layer: nn.Module) -> np.ndarray:
    return layer.weight.detach().double().numpy()


def _conv64(layer: nn.Module, x: torch.Tensor, w: np.ndarray) -> torch.Tensor:
    """The original conv (stride, padding, dilation, bias) with weight ``w``, in float64."""
    ref = copy.deepcopy(layer).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
    return ref(x.double())


def _factorized_entry(layer: nn.Module, cfg: LowRankConfig) -> tuple[nn.Module, dict]:
    net = nn.Sequential(layer)
    plan, factors = build_plan(net, cfg)
    apply_in_place(net, plan, factors)
    return net[0], plan["layers"]["0"]


def test_svd_error_is_the_discarded_energy_and_full_rank_is_exact():
    torch.manual_seed(0)
    layer = nn.Linear(40, 24)
    w = _w64(layer)
    s = np.linalg.svd(w, compute_uv=False)
    mod, entry = _factorized_entry(layer, LowRankConfig(ranks={"0": [7]}, margin=0.0))
    expected = np.sqrt(np.sum(s[7:] ** 2)) / np.sqrt(np.sum(s**2))
    assert entry["rel_error"] == pytest.approx(expected, rel=1e-10)
    # Recompose the two Linear layers in numpy: the same error (float32 weights).
    w_hat = mod[1].weight.detach().double().numpy() @ mod[0].weight.detach().double().numpy()
    assert np.linalg.norm(w - w_hat) / np.linalg.norm(w) == pytest.approx(expected, rel=1e-5)
    assert mod[0].bias is None and torch.equal(mod[1].bias, layer.bias)
    assert sum(p.numel() for p in mod.parameters()) == 7 * (40 + 24) + 24
    assert entry["params_after"] == 7 * (40 + 24) + 24 and entry["params_before"] == 40 * 24 + 24
    # Full rank reproduces the layer.
    full, _ = _factorized_entry(copy.deepcopy(layer), LowRankConfig(ranks={"0": [24]}, margin=0))
    x = torch.randn(5, 3, 40)
    torch.testing.assert_close(full(x), layer(x), rtol=0, atol=1e-5)


def test_full_rank_svd_of_a_full_layer_is_skipped_as_larger():
    layer = nn.Linear(40, 24)
    _, entry = _factorized_entry(layer, LowRankConfig(ranks={"0": [24]}))
    assert "would not be smaller" in entry["reason"] and entry["params_after"] == 984


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "spatial"])
def test_module_output_equals_conv_with_reconstructed_weight(method: str):
    torch.manual_seed(1)
    layer = nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    fac = FACTORIZERS.get(method)
    rank = [4, 3] if method == "tucker2" else [4]
    w = _w64(layer)
    factors = fac.decompose(w, rank, n_iter=50, seed=0)
    w_hat = fac.reconstruct(factors, w.shape)
    module = fac.build(copy.deepcopy(layer).double(), factors)
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    torch.testing.assert_close(module(x), _conv64(layer, x, w_hat), rtol=1e-10, atol=1e-10)
    n_weights = sum(m.weight.numel() for m in module)
    assert n_weights == fac.weight_params(w.shape, rank)
    assert n_weights + 10 == sum(p.numel() for p in module.parameters())


def test_tucker2_factors_recomposed_in_numpy_give_the_reported_error():
    torch.manual_seed(2)
    layer = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    mod, entry = _factorized_entry(layer, LowRankConfig(conv="tucker2", ranks={"0": [5, 4]}))
    first, core, last = (m.weight.detach().double().numpy() for m in mod)
    assert first.shape == (4, 8, 1, 1) and core.shape == (5, 4, 3, 3)
    assert last.shape == (12, 5, 1, 1)
    assert mod[1].stride == (2, 2) and mod[1].padding == (1, 1)
    w_hat = np.einsum("oa,abhw,bi->oihw", last[:, :, 0, 0], core, first[:, :, 0, 0])
    w = _w64(layer)
    err = np.linalg.norm(w - w_hat) / np.linalg.norm(w)
    assert err == pytest.approx(entry["rel_error"], rel=1e-5)
    # A Tucker-2 with r_out = 5 has a mode-0 unfolding of rank <= 5, so it cannot beat the
    # best rank-5 approximation of that unfolding (Eckart-Young): a lower bound on its error.
    s0 = np.linalg.svd(w.reshape(12, -1), compute_uv=False)
    assert entry["rel_error"] >= np.sqrt(np.sum(s0[5:] ** 2) / np.sum(s0**2)) - 1e-12


def test_cp_factors_recomposed_in_numpy_give_the_reported_error():
    torch.manual_seed(3)
    layer = nn.Conv2d(5, 7, 3, padding=1)
    mod, entry = _factorized_entry(layer, LowRankConfig(conv="cp", ranks={"0": [6]}))
    b, c, d, a = (m.weight.detach().double().numpy() for m in mod)
    assert mod[1].groups == 6 and mod[2].groups == 6
    w_hat = np.einsum("or,ri,rh,rw->oihw", a[:, :, 0, 0], b[:, :, 0, 0], c[:, 0, :, 0],
                      d[:, 0, 0, :])
    w = _w64(layer)
    assert np.linalg.norm(w - w_hat) / np.linalg.norm(w) == pytest.approx(entry["rel_error"],
                                                                          rel=1e-5)
    assert entry["params_after"] == 6 * (5 + 7 + 3 + 3) + 7


def test_spatial_error_is_the_discarded_energy_of_the_reshaped_kernel():
    torch.manual_seed(4)
    layer = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    w = _w64(layer)
    # M[(i, h), (o, w)] = W[o, i, h, w], written out with loops as an independent reference.
    m = np.zeros((4 * 3, 6 * 3))
    for o in range(6):
        for i in range(4):
            for h in range(3):
                for k in range(3):
                    m[i * 3 + h, o * 3 + k] = w[o, i, h, k]
    s = np.linalg.svd(m, compute_uv=False)
    mod, entry = _factorized_entry(layer, LowRankConfig(conv="spatial", ranks={"0": [3]}))
    assert entry["rel_error"] == pytest.approx(np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2)),
                                               rel=1e-10)
    v, h = (t.weight.detach().double().numpy() for t in mod)
    w_hat = np.einsum("rih,orw->oihw", v[:, :, :, 0], h[:, :, 0, :])
    assert np.linalg.norm(w - w_hat) / np.linalg.norm(w) == pytest.approx(entry["rel_error"],
                                                                          rel=1e-5)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    mod64 = copy.deepcopy(mod).double()
    torch.testing.assert_close(mod64(x), _conv64(layer, x, w_hat), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("conv", ["tucker2", "svd"])
def test_conv1d_and_full_rank_tucker2_is_exact(conv: str):
    torch.manual_seed(5)
    layer = nn.Conv1d(4, 6, 5, stride=2, padding=2, dilation=1)
    fac = FACTORIZERS.get(conv)
    top = fac.max_rank(tuple(layer.weight.shape))
    w = _w64(layer)
    factors = fac.decompose(w, top)
    assert np.abs(fac.reconstruct(factors, w.shape) - w).max() < 1e-10
    x = torch.randn(3, 4, 17, dtype=torch.float64)
    out = fac.build(copy.deepcopy(layer).double(), factors)(x)
    torch.testing.assert_close(out, _conv64(layer, x, w), rtol=1e-9, atol=1e-9)


def test_one_by_one_convs_use_svd_and_grouped_convs_are_skipped():
    net = nn.Sequential(nn.Conv2d(16, 32, 1), nn.Conv2d(32, 32, 3, groups=4), nn.Flatten())
    plan = plan_lowrank(net, LowRankConfig(conv="tucker2", rank="ratio", ratio=0.3))
    assert plan["layers"]["0"]["method"] == "svd" and "1x1" in plan["layers"]["0"]["note"]
    assert plan["layers"]["0"]["rank"] == [int(0.3 * 16 * 32 / 48)]
    assert "groups=4" in plan["layers"]["1"]["reason"]
    small, rec = stage_on(lowrank, net, LowRankConfig(conv="tucker2", rank="ratio", ratio=0.3))
    assert isinstance(small[1], nn.Conv2d) and isinstance(small[0], nn.Sequential)
    assert {"what": "1", "why": plan["layers"]["1"]["reason"]} in rec.skipped


def test_spatial_and_cp_refuse_what_they_cannot_split():
    spatial, cp = FACTORIZERS.get("spatial"), FACTORIZERS.get("cp")
    assert "already separable" in spatial.unsupported(nn.Conv2d(3, 4, (1, 3)))
    assert "Conv2d" in spatial.unsupported(nn.Conv1d(3, 4, 3))
    assert "asymmetrically" in cp.unsupported(nn.Conv2d(3, 4, 4, padding="same"))
    assert cp.unsupported(nn.Conv2d(3, 4, 3, padding="same")) is None
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    layer = nn.Conv2d(3, 4, 3, padding="same")
    w = _w64(layer)
    factors = cp.decompose(w, [3], n_iter=20)
    out = cp.build(copy.deepcopy(layer).double(), factors)(x)
    torch.testing.assert_close(out, _conv64(layer, x, cp.reconstruct(factors, w.shape)))


def test_factorized_grads_flow_and_dtype_follows_the_layer():
    layer = nn.Conv2d(4, 8, 3).double()
    fac = FACTORIZERS.get("tucker2")
    module = fac.build(layer, fac.decompose(_w64(layer), [3, 2]))
    assert all(p.dtype == torch.float64 and p.requires_grad for p in module.parameters())
    module(torch.randn(1, 4, 5, 5, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None for p in module.parameters())


# Layers every factorizer is tried on; each takes those it does not refuse.
SHELL_LAYERS = {
    "linear": lambda: nn.Linear(40, 24),
    "linear_no_bias": lambda: nn.Linear(40, 24, bias=False),
    "conv2d": lambda: nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    "conv2d_same_no_bias": lambda: nn.Conv2d(6, 10, 3, padding="same", bias=False),
    "conv1d": lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2),
}


def _shapes(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", FACTORIZERS.names())
def test_shell_has_the_structure_of_build_and_runs_on_meta(method: str):
    """The artifact rebuild (``shell``) and the numeric path (``build``) give the same modules,
    state_dict keys, shapes and dtypes, and the shell reads no value (it runs on meta)."""
    fac = FACTORIZERS.get(method)
    tried = []
    for name, make in SHELL_LAYERS.items():
        torch.manual_seed(0)
        layer = make().double()
        if fac.unsupported(layer):
            continue
        shape = tuple(layer.weight.shape)
        rank = [max(1, r // 2) for r in fac.max_rank(shape)]
        built = fac.build(layer, fac.decompose(_w64(layer), rank, n_iter=5))
        shell = fac.shell(layer, rank)
        assert _shapes(shell) == _shapes(built), name
        assert [type(m) for m in shell] == [type(m) for m in built], name
        assert repr(shell) == repr(built), name  # strides, paddings, groups alike
        with torch.device("meta"):
            meta_layer = make().double()
        meta_shell = fac.shell(meta_layer, rank)
        assert _shapes(meta_shell) == _shapes(built), name
        assert all(t.is_meta for t in meta_shell.state_dict().values()), name
        tried.append(name)
    assert tried, f"{method} handled none of the test layers"
