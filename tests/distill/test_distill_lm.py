"""Distilling a causal language model: the student's perplexity moves towards the teacher's,
from the teacher's per-token distributions alone; feature taps work on a Hugging Face GPT-2."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimkit.data.bundle import DataBundle
from slimkit.distill import DistillConfig, FeaturePair, LogitKD, build_objective
from slimkit.distill.config import DistillStageConfig
from slimkit.distill.run import _distill
from slimkit.io import batch as B
from slimkit.measure.tasks import data_batches, get_task
from slimkit.train.config import TrainConfig

VOCAB, LENGTH = 12, 10


def _transitions() -> torch.Tensor:
    """A peaked Markov chain over the vocabulary: each token has a few likely successors."""
    g = torch.Generator().manual_seed(0)
    return (2.5 * torch.randn(VOCAB, VOCAB, generator=g)).softmax(-1)


def _text(n: int, seed: int) -> dict:
    """Sequences from the chain, right-padded with token 0 after a random length (>= 4)."""
    g = torch.Generator().manual_seed(seed)
    p = _transitions()
    ids = torch.zeros(n, LENGTH, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for i in range(1, LENGTH):
        ids[:, i] = torch.multinomial(p[ids[:, i - 1]], 1, generator=g).squeeze(1)
    mask = (torch.arange(LENGTH) < torch.randint(4, LENGTH + 1, (n, 1), generator=g)).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


class BigramTeacher(nn.Module):
    """The chain itself: logits = log P(next | current), the best any next-token model does."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, VOCAB)
        self.table.weight.data.copy_(_transitions().log())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return {"logits": self.table(input_ids)}


class TinyLM(nn.Module):
    """A student through a narrow bottleneck: embed (dim 6) -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(VOCAB, 6)
        self.head = nn.Linear(6, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return {"logits": self.head(self.embed(input_ids))}


def _perplexity(model: nn.Module, x: dict) -> float:
    return get_task("causal_lm").evaluate(model, data_batches(x, None))["perplexity"]


def test_token_kd_lowers_the_students_perplexity_towards_the_teacher() -> None:
    train, test = _text(512, seed=1), _text(128, seed=2)
    zeros = torch.zeros(512, dtype=torch.long)
    data = DataBundle("markov", train, zeros, test, zeros[:128], 0, task="causal_lm")
    teacher, student = BigramTeacher(), TinyLM()
    # alpha 0: the hard next-token loss is off, so all the student learns is the teacher's
    # per-token distributions (temperature 1: the soft targets are the teacher's own).
    cfg = DistillStageConfig(loss=DistillConfig(logits=LogitKD(temperature=1.0, alpha=0.0)),
                             train=TrainConfig(epochs=6, batch_size=32, lr=0.03, seed=0))
    trained, record = _distill(student, teacher, data, cfg)
    d = record.details
    teacher_ppl, before, after = (d["teacher_perplexity"], d["student_perplexity_before"],
                                  d["student_perplexity"])
    assert teacher_ppl == pytest.approx(_perplexity(teacher, test), rel=1e-9)
    assert after == pytest.approx(_perplexity(trained, test), rel=1e-9)
    assert _perplexity(student, test) == pytest.approx(before, rel=1e-9)  # input left alone
    assert teacher_ppl < after < before
    # most of the way to the teacher, which is the data's own entropy rate
    assert after - teacher_ppl < 0.1 * (before - teacher_ppl), (teacher_ppl, before, after)
    losses = [e["loss"] for e in d["student_train"]["epochs"]]
    assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses)


def _gpt2(width: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=1, n_head=2, n_positions=16,
                        use_cache=False, bos_token_id=0, eos_token_id=0)  # as wrap() sets it
    return GPT2LMHeadModel(config).eval()


def test_gpt2_token_kd_with_a_feature_tap_by_layer_name() -> None:
    pytest.importorskip("transformers")
    teacher, student = _gpt2(16), _gpt2(8)
    x, y = _text(6, seed=3), torch.zeros(6, dtype=torch.long)
    cfg = DistillConfig(logits=LogitKD(temperature=2.0, alpha=0.4), features=[
        FeaturePair(student="transformer.h.0.mlp", teacher="transformer.h.0.mlp",
                    layout="channels_last")])
    with B.judging("logits"):
        obj = build_objective(student, teacher, cfg, B.take(x, slice(0, 2)), task="causal_lm")
        student.train()
        loss, logits, parts = obj(student, x, y)
    assert logits.shape == (6, LENGTH, VOCAB)
    assert set(parts) == {"ce", "kd", "hint:transformer.h.0.mlp->transformer.h.0.mlp"}
    loss.backward()
    assert student.transformer.wte.weight.grad.abs().sum() > 0
    assert obj.feature_projectors[0].channel_map.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    total = 0.4 * parts["ce"] + 0.6 * parts["kd"] + parts[
        "hint:transformer.h.0.mlp->transformer.h.0.mlp"]
    assert loss.item() == pytest.approx(total, rel=1e-5)
