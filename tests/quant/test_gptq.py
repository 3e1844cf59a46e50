"""GPTQ against a float64 reference implementation, RTN, and its non-PD fallback."""

import pytest
import torch

from slimkit.core.errors import DataError
from slimkit.quant.gptq import (
    HessianAccumulator,
    collect_hessians,
    gptq_quantize,
    output_error,
)
from slimkit.quant.primitives import dequantize_codes, group_qparams, rtn_quantize


def reference_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, block: int, symmetric: bool,
                   damp: float) -> torch.Tensor:
    """Straight Optimal Brain Surgeon steps in float64, no Cholesky tricks, no lazy batches.

    Each step inverts the Hessian of the columns not yet quantized, quantizes the next
    column and moves the others by ``-e [H_F^-1]_{j,F} / [H_F^-1]_jj``. Group qparams come
    from the updated weights when the group's first column is reached.
    """
    w = w.clone().to(torch.float64)
    h = h.to(torch.float64) + damp * torch.eye(h.shape[0], dtype=torch.float64)
    n, k = w.shape
    codes = torch.zeros(n, k, dtype=torch.float64)
    s = z = None
    for j in range(k):
        if j % block == 0:
            s, z = group_qparams(w[:, j:j + block], bits, symmetric, "float32")
            s, z = s.double(), z.double()
        hinv = torch.linalg.inv(h[j:, j:])
        q = torch.clamp(torch.round(w[:, j] / s) + z, 0, (1 << bits) - 1)
        codes[:, j] = q
        e = (w[:, j] - (q - z) * s) / hinv[0, 0]
        w[:, j:] -= e[:, None] * hinv[0][None, :]
    return codes


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs driven by k/4 latent factors plus a little noise (strongly correlated)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k // 4, k, generator=gen)
    noise = 0.1 * torch.randn(n, k, generator=gen)
    return (torch.randn(n, k // 4, generator=gen) @ mix + noise) * torch.linspace(0.2, 2.0, k)


@pytest.mark.parametrize(("block", "blocksize"), [(16, 8), (16, 32), (32, 32)])
def test_gptq_equals_the_float64_reference(block: int, blocksize: int):
    torch.manual_seed(0)
    x = correlated_inputs(200, 32).double()
    w = torch.randn(6, 32, dtype=torch.float64)
    h = 2 * x.T @ x / len(x)
    res = gptq_quantize(w, h, 3, block, symmetric=False, scale_dtype="float32", percdamp=0.01,
                        blocksize=blocksize)
    ref = reference_gptq(w, h, 3, block, False, res.info["damp"])
    assert res.info["fallback"] is None
    assert torch.equal(res.codes.double(), ref)


def test_gptq_output_error_below_rtn_on_correlated_inputs():
    torch.manual_seed(0)
    x = correlated_inputs(512, 64)
    w = torch.randn(16, 64)
    h = 2 * x.double().T @ x.double() / len(x)
    for act_order in (False, True):
        res = gptq_quantize(w, h, 4, 32, True, act_order=act_order)
        w_g = dequantize_codes(res.codes, res.scales, res.zeros, 64)
        w_r = dequantize_codes(*rtn_quantize(w, 4, 32, True), 64)
        err_g = float((x @ w_g.T - x @ w.T).norm())
        err_r = float((x @ w_r.T - x @ w.T).norm())
        assert err_g < 0.7 * err_r
        assert output_error(w, w_g, h) == pytest.approx(err_g / float((x @ w.T).norm()),
                                                        rel=1e-3)


def test_streaming_hessian_equals_the_batch_formula():
    x = torch.randn(3, 10, 8)
    acc = HessianAccumulator(8)
    for part in x.split(1):
        acc.add(part)
    flat = x.reshape(-1, 8).double()
    torch.testing.assert_close(acc.h, 2 * flat.T @ flat / 30)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    got = collect_hessians(net, ["0"], [(x[i],) for i in range(3)])
    torch.testing.assert_close(got["0"].h, acc.h)
    assert net.training


def test_dead_columns_and_rank_deficient_inputs():
    torch.manual_seed(0)
    x = correlated_inputs(4, 32)  # rank 4 < 32
    x[:, 5] = 0  # a column never activated
    w = torch.randn(8, 32)
    h = 2 * x.double().T @ x.double() / len(x)
    res = gptq_quantize(w, h, 4, 16, True, percdamp=0.0)
    assert res.info["fallback"] is None and res.info["dead_columns"] == 1
    assert res.info["damp"] > 0 and res.info["notes"]  # the dampening had to be raised
    w_g = dequantize_codes(res.codes, res.scales, res.zeros, 32)
    w_r = dequantize_codes(*rtn_quantize(w, 4, 16, True), 32)
    assert float((x @ w_g.T - x @ w.T).norm()) < float((x @ w_r.T - x @ w.T).norm())
    # the dead column is rounded to nearest, not zeroed (unseen inputs may use it)
    torch.testing.assert_close(w_g[:, 5], w_r[:, 5])


def test_non_positive_definite_hessian_falls_back_to_rtn():
    h = -torch.eye(16, dtype=torch.float64)
    h[0, 0] = 1.0
    w = torch.randn(4, 16)
    res = gptq_quantize(w, h, 4, 16, True, damp_tries=1)
    assert "not positive definite" in res.info["fallback"]
    codes, scales, zeros = rtn_quantize(w, 4, 16, True)
    assert torch.equal(res.codes, codes) and torch.equal(res.scales, scales)
    with pytest.raises(DataError, match="NaN/Inf"):
        gptq_quantize(w, torch.full((16, 16), float("nan")), 4, 16, True)
