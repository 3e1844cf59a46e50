"""Distillation's output term per task against float64 numpy references: per-token KL with a
padding mask (causal LM), cosine/MSE of mean-pooled embeddings (encoder), MSE (regression);
the refusals of losses that do not apply to a task."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.core.errors import ConfigError
from slimkit.data.bundle import DataBundle
from slimkit.distill import DistillConfig, FeaturePair, LogitKD, SelfDistill, build_objective
from slimkit.distill.config import DistillStageConfig
from slimkit.distill.losses import cosine_embedding_loss, output_mse_loss, soft_target_kl
from slimkit.distill.outputs import output_loss
from slimkit.distill.run import _distill
from slimkit.io import batch as B
from slimkit.measure.tasks import get_task


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _padded_mask(b: int, t: int, seed: int = 0) -> torch.Tensor:
    """Right-padded rows keeping a random-length prefix (at least 2 tokens)."""
    keep = torch.randint(2, t + 1, (b, 1), generator=torch.Generator().manual_seed(seed))
    return (torch.arange(t) < keep).long()


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_token_kl(s: np.ndarray, t: np.ndarray, mask: np.ndarray, temp: float) -> float:
    """T² · Σ_{b,i} m_bi KL(p_t ‖ p_s)_bi / Σ m: the KL over the vocabulary at every kept token."""
    log_ps, log_pt = _np_log_softmax(s / temp), _np_log_softmax(t / temp)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)  # [B, T]
    return temp**2 * (kl * mask).sum() / mask.sum()


def _np_next_token_ce(s: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> float:
    """Mean CE of predicting token i+1 from position i, over pairs whose target is kept."""
    log_p = _np_log_softmax(s[:, :-1])
    b, n = ids[:, 1:].shape
    nll = -log_p[np.arange(b)[:, None], np.arange(n)[None, :], ids[:, 1:]]
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()


def _np_embed(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def _np_cosine_loss(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return 1 - cos.mean()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_masked_token_kl_matches_numpy(temperature: float) -> None:
    s, t = _rand(3, 6, 7, seed=1) * 2, _rand(3, 6, 7, seed=2) * 2
    mask = _padded_mask(3, 6)
    got = soft_target_kl(s, t, temperature, mask=mask)
    want = _np_token_kl(s.numpy(), t.numpy(), mask.numpy(), temperature)
    torch.testing.assert_close(got.item(), want, rtol=1e-12, atol=0)
    # padded positions count for nothing, whatever the models put there
    pad = (mask == 0).unsqueeze(-1)
    moved = soft_target_kl(s + 5 * pad * _rand(3, 6, 7, seed=3), t - 3 * pad, temperature,
                           mask=mask)
    torch.testing.assert_close(moved.item(), want, rtol=1e-12, atol=0)
    # no mask: the mean over every token, as the unmasked batchmean
    torch.testing.assert_close(soft_target_kl(s, t, temperature, mask=torch.ones(3, 6)),
                               soft_target_kl(s, t, temperature), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="without the last dim"):
        soft_target_kl(s, t, temperature, mask=mask[:, :5])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_causal_lm_output_term_is_masked_ce_plus_token_kd(alpha: float) -> None:
    s, t = _rand(3, 6, 7, seed=4) * 2, _rand(3, 6, 7, seed=5) * 2
    mask = _padded_mask(3, 6, seed=1)
    ids = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(2))
    x, y = {"input_ids": ids, "attention_mask": mask}, torch.zeros(3, dtype=torch.long)
    term = output_loss("causal_lm", DistillConfig(logits=LogitKD(temperature=2.0, alpha=alpha)))
    with B.judging("logits"):  # a stage's judged output name must not break the bare tensors
        loss, parts = term(s, t, x, y)
    ce = _np_next_token_ce(s.numpy(), ids.numpy(), mask.numpy())
    kd = _np_token_kl(s.numpy(), t.numpy(), mask.numpy(), 2.0)
    assert set(parts) == {"ce", "kd"}
    np.testing.assert_allclose(parts["ce"], ce, rtol=1e-5)  # the task's CE runs in float32
    np.testing.assert_allclose(parts["kd"], kd, rtol=1e-12)
    np.testing.assert_allclose(loss.item(), alpha * ce + (1 - alpha) * kd, rtol=1e-5)
    # the hard part is the causal_lm task's own loss
    task_ce = get_task("causal_lm").loss(s, x, y, None)
    assert parts["ce"] == float(task_ce)


def test_cosine_and_mse_embedding_losses_match_numpy() -> None:
    a, b = _rand(5, 8, seed=6), _rand(5, 8, seed=7)
    torch.testing.assert_close(cosine_embedding_loss(a, b).item(),
                               _np_cosine_loss(a.numpy(), b.numpy()), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(output_mse_loss(a, b).item(),
                               ((a.numpy() - b.numpy()) ** 2).mean(), rtol=1e-12, atol=0)
    assert abs(cosine_embedding_loss(a, 3 * a).item()) < 1e-12  # scale does not matter
    with pytest.raises(ValueError, match="same dimension"):
        cosine_embedding_loss(a, _rand(5, 9))


@pytest.mark.parametrize("kind", ["auto", "cosine", "mse"])
def test_embedding_output_term_compares_mean_pooled_embeddings(kind: str) -> None:
    hs, ht = _rand(4, 6, 5, seed=8), _rand(4, 6, 5, seed=9)  # [B, tokens, dim] hidden states
    mask = _padded_mask(4, 6, seed=3)
    x = {"input_ids": torch.zeros(4, 6, dtype=torch.long), "attention_mask": mask}
    term = output_loss("embedding", DistillConfig(logits=LogitKD(loss=kind)))
    loss, parts = term(hs, ht, x, torch.zeros(4, dtype=torch.long))
    es, et = _np_embed(hs.numpy(), mask.numpy()), _np_embed(ht.numpy(), mask.numpy())
    want = ((es - et) ** 2).mean() if kind == "mse" else _np_cosine_loss(es, et)
    assert set(parts) == {"embed"}  # no labels: no hard part, and no softmax KD
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)  # embed() pools in float32
    # without logit KD an encoder still trains towards the teacher: its task's own loss
    plain = output_loss("embedding", DistillConfig(logits=None, features=[
        FeaturePair(student="a", teacher="b")]))(hs, ht, x, torch.zeros(4))[0]
    task_loss = get_task("embedding").loss(hs, x, torch.zeros(4), ht)
    torch.testing.assert_close(plain, task_loss, rtol=0, atol=0)


def test_regression_output_term_matches_numpy() -> None:
    s, t = _rand(6, 1, seed=10), _rand(6, 1, seed=11)
    y = _rand(6, seed=12).float().double()  # the regression task reads targets as float32
    term = output_loss("regression", DistillConfig(logits=LogitKD(alpha=0.25)))
    loss, parts = term(s, t, None, y)
    hard = ((s.numpy()[:, 0] - y.numpy()) ** 2).mean()
    soft = ((s.numpy() - t.numpy()) ** 2).mean()
    np.testing.assert_allclose([parts["mse"], parts["kd"], loss.item()],
                               [hard, soft, 0.25 * hard + 0.75 * soft], rtol=1e-12)


@pytest.mark.parametrize(("task", "cfg", "message"), [
    ("embedding", DistillConfig(logits=LogitKD(loss="kl")),
     "logits loss 'kl' does not apply to task 'embedding'"),
    ("regression", DistillConfig(logits=LogitKD(loss="kl")),
     "logits loss 'kl' does not apply to task 'regression'"),
    ("classification", DistillConfig(logits=LogitKD(loss="cosine")),
     "logits loss 'cosine' does not apply to task 'classification'"),
    ("causal_lm", DistillConfig(logits=LogitKD(loss="mse")),
     "logits loss 'mse' does not apply to task 'causal_lm'"),
    ("causal_lm", DistillConfig(logits=None, self_distill=SelfDistill(exits=["a"])),
     "self_distill does not apply to task 'causal_lm'"),
    ("my_eval", DistillConfig(), "task 'my_eval' has no distillation loss"),
])
def test_a_loss_that_does_not_apply_to_the_task_is_one_clear_line(task: str, cfg: DistillConfig,
                                                                  message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        output_loss(task, cfg)
    assert "\n" not in str(err.value)


class TinyEncoder(nn.Module):
    """Dict inputs -> last_hidden_state [B, T, D], as an HF encoder; no dropout."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, dim)
        self.ff = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return {"last_hidden_state": torch.tanh(self.ff(self.embed(input_ids)))}


def _text(n: int = 6) -> dict:
    ids = torch.randint(0, 20, (n, 7), generator=torch.Generator().manual_seed(4))
    return {"input_ids": ids, "attention_mask": _padded_mask(n, 7, seed=5)}


def test_encoder_objective_learns_the_teachers_embeddings_with_feature_taps() -> None:
    torch.manual_seed(0)
    teacher = TinyEncoder()
    student = copy.deepcopy(teacher)
    x, y = _text(), torch.zeros(6, dtype=torch.long)
    cfg = DistillConfig(features=[FeaturePair(student="ff", teacher="ff",
                                              layout="channels_last")])
    obj = build_objective(student, teacher, cfg, B.take(x, slice(0, 2)), task="embedding")
    loss, out, parts = obj(student, x, y)
    assert set(parts) == {"embed", "hint:ff->ff"} and out.shape == (6, 7, 8)
    assert parts["embed"] < 1e-6  # the same model: the same directions
    with torch.no_grad():
        student.ff.weight.add_(_rand(8, 8, seed=13).float())
    loss, _, parts = obj(student, x, y)
    loss.backward()
    assert parts["embed"] > 1e-3 and student.ff.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ConfigError, match="'kl' does not apply to task 'embedding'"):
        build_objective(student, teacher, DistillConfig(logits=LogitKD(loss="kl")), x,
                        task="embedding")


def test_distill_stage_refuses_before_any_work() -> None:
    x = _text(8)
    data = DataBundle("text", x, torch.zeros(8, dtype=torch.long), x,
                      torch.zeros(8, dtype=torch.long), 0, task="embedding")
    cfg = DistillStageConfig(loss=DistillConfig(logits=LogitKD(loss="kl")))
    with pytest.raises(ConfigError, match="'kl' does not apply to task 'embedding'"):
        _distill(TinyEncoder(), TinyEncoder(), data, cfg)
