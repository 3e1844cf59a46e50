"""Distillation losses against float64 numpy references, zero at equality, student-only grads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimkit.distill.losses import (
    attention_map_loss,
    attention_transfer_loss,
    hidden_state_loss,
    hint_loss,
    kd_loss,
    similarity_preserving_loss,
    soft_target_kl,
)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.0), (4.0, 0.5), (2.5, 1.0)])
def test_kd_loss_matches_numpy(temperature: float, alpha: float) -> None:
    s, t = _rand(6, 5, seed=1) * 3, _rand(6, 5, seed=2) * 3
    y = torch.tensor([0, 4, 2, 1, 3, 0])
    got = kd_loss(s, t, y, temperature, alpha)
    sn, tn, yn = s.numpy(), t.numpy(), y.numpy()
    ce = -_np_log_softmax(sn)[np.arange(6), yn].mean()
    log_ps, log_pt = _np_log_softmax(sn / temperature), _np_log_softmax(tn / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum() / 6  # batchmean: sum over classes, mean rows
    want = alpha * ce + (1 - alpha) * temperature**2 * kl
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_kd_loss_rejects_bad_arguments() -> None:
    s, y = _rand(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, s, y, 2.0, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, y, 0.0, 0.5)
    with pytest.raises(ValueError, match="same classes"):
        soft_target_kl(s, _rand(2, 4), 2.0)


def test_hint_and_hidden_losses_match_numpy() -> None:
    s, t = _rand(3, 4, 5, seed=3), _rand(3, 4, 5, seed=4)
    want = ((s.numpy() - t.numpy()) ** 2).mean()
    for fn in (hint_loss, hidden_state_loss):
        torch.testing.assert_close(fn(s, t).item(), want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="project"):
        hint_loss(s, _rand(3, 4, 6))


def _np_at_map(f: np.ndarray, p: float, pool: int = 1) -> np.ndarray:
    q = (np.abs(f) ** p).mean(axis=1)  # [B, H, W]
    if pool > 1:  # block average == adaptive avg pool for exact multiples
        b, h, w = q.shape
        q = q.reshape(b, h // pool, pool, w // pool, pool).mean(axis=(2, 4))
    q = q.reshape(q.shape[0], -1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_attention_transfer_matches_numpy(p: float) -> None:
    fs, ft = _rand(3, 4, 6, 6, seed=5), _rand(3, 7, 6, 6, seed=6)  # channel counts differ
    got = attention_transfer_loss(fs, ft, p=p)
    diff = _np_at_map(fs.numpy(), p) - _np_at_map(ft.numpy(), p)
    want = np.linalg.norm(diff, axis=1).mean()
    torch.testing.assert_close(got.item(), want, rtol=1e-12, atol=0)


def test_attention_transfer_pools_the_larger_map() -> None:
    fs, ft = _rand(2, 3, 8, 8, seed=7), _rand(2, 5, 4, 4, seed=8)
    want = np.linalg.norm(_np_at_map(fs.numpy(), 2, pool=2) - _np_at_map(ft.numpy(), 2),
                          axis=1).mean()
    torch.testing.assert_close(attention_transfer_loss(fs, ft).item(), want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="channels-first"):
        attention_transfer_loss(_rand(2, 3), _rand(2, 3))


def test_similarity_preserving_matches_numpy() -> None:
    fs, ft = _rand(5, 3, 4, seed=9), _rand(5, 8, seed=10)  # only the batch has to agree
    b = 5

    def gram(f: np.ndarray) -> np.ndarray:
        flat = f.reshape(b, -1)
        g = flat @ flat.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    want = ((gram(fs.numpy()) - gram(ft.numpy())) ** 2).sum() / b**2
    torch.testing.assert_close(similarity_preserving_loss(fs, ft).item(), want, rtol=1e-12,
                               atol=0)
    with pytest.raises(ValueError, match="batch"):
        similarity_preserving_loss(fs, _rand(4, 8))


def test_attention_map_loss_matches_numpy_per_head_and_head_averaged() -> None:
    a_s = _rand(2, 2, 5, 5, seed=11).softmax(-1)
    a_t = _rand(2, 2, 5, 5, seed=12).softmax(-1)
    per_head = np.mean([((a_s[:, h] - a_t[:, h]).numpy() ** 2).mean() for h in range(2)])
    torch.testing.assert_close(attention_map_loss(a_s, a_t).item(), per_head, rtol=1e-12, atol=0)
    a_t4 = _rand(2, 4, 5, 5, seed=13).softmax(-1)  # teacher has more heads: compare head means
    want = ((a_s.numpy().mean(1) - a_t4.numpy().mean(1)) ** 2).mean()
    torch.testing.assert_close(attention_map_loss(a_s, a_t4).item(), want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="token"):
        attention_map_loss(a_s, _rand(2, 2, 4, 4))


def _pairs() -> dict[str, tuple]:
    y = torch.tensor([1, 0, 2, 1])
    return {
        "kd": (lambda s, t: kd_loss(s, t, y, 3.0, 0.0), (4, 3)),
        "hint": (hint_loss, (4, 3, 5)),
        "attention_transfer": (attention_transfer_loss, (4, 3, 4, 4)),
        "similarity": (similarity_preserving_loss, (4, 6)),
        "hidden": (hidden_state_loss, (4, 3, 5)),
        "attention_map": (attention_map_loss, (4, 2, 3, 3)),
    }


@pytest.mark.parametrize("name", list(_pairs()))
def test_zero_when_student_equals_teacher(name: str) -> None:
    fn, shape = _pairs()[name]
    x = _rand(*shape, seed=14)
    assert abs(fn(x, x.clone()).item()) < 1e-12


@pytest.mark.parametrize("name", list(_pairs()))
def test_gradients_reach_the_student_only(name: str) -> None:
    fn, shape = _pairs()[name]
    s = _rand(*shape, seed=15).requires_grad_(True)
    t = _rand(*shape, seed=16).requires_grad_(True)  # even a grad-enabled teacher is detached
    fn(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
