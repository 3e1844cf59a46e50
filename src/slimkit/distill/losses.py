"""Distillation losses as pure tensor functions.

Every function takes the student's tensor first and the teacher's second, and detaches the
teacher's: gradients reach the student (and any projector in front of it) only, whatever the
caller did with the teacher. None of them holds state or parameters; projectors and hooks live
in :mod:`slimkit.distill.objective` and :mod:`slimkit.distill.hooks`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "attention_map_loss",
    "attention_transfer_loss",
    "cosine_embedding_loss",
    "hidden_state_loss",
    "hint_loss",
    "kd_loss",
    "output_mse_loss",
    "similarity_preserving_loss",
    "soft_target_kl",
]


def _same_shape(what: str, student: Tensor, teacher: Tensor, hint: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student shape {tuple(student.shape)} differs from teacher "
                         f"shape {tuple(teacher.shape)}; {hint}")


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                   mask: Tensor | None = None) -> Tensor:
    """The soft-target term of Hinton et al. (2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``.

    Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015). The ``T²``
    factor keeps the gradient scale independent of ``T`` (soft-target gradients scale as
    ``1/T²``). The KL is summed over classes (the last dim) and averaged over rows
    ("batchmean"); logits with more than two dims (e.g. ``[B, T, V]``, one distribution per
    token) are flattened to rows ``[-1, num_classes]``. With ``mask``, the average is over the
    rows it keeps: ``Σ m_r KL_r / Σ m_r`` (padding tokens of a language model count for
    nothing; a mask that keeps no row gives 0).

    Args:
        student_logits: ``[..., K]`` logits of the student.
        teacher_logits: same shape; detached here.
        temperature: ``T > 0``; larger values soften both distributions.
        mask: optional ``[...]`` weights (the logits' shape without the last dim), e.g. an
            ``attention_mask``; nonzero keeps a row.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: for a non-positive temperature, different shapes, or a mask whose shape
            is not the logits' without the last dim.

    Example:
        >>> soft_target_kl(student_lm(ids), teacher_lm(ids), 2.0, mask=attention_mask)
    """
    if temperature <= 0:
        raise ValueError(f"soft_target_kl: temperature must be > 0, got {temperature}")
    _same_shape("soft_target_kl", student_logits, teacher_logits,
                "the teacher and the student must predict the same classes")
    k = student_logits.shape[-1]
    log_ps = F.log_softmax(student_logits.reshape(-1, k) / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach().reshape(-1, k) / temperature, dim=-1)
    if mask is None:
        kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
        return kl * temperature**2
    if tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"soft_target_kl: mask shape {tuple(mask.shape)} must be the logits' "
                         f"{tuple(student_logits.shape)} without the last dim")
    weight = (mask.reshape(-1) != 0).to(log_ps.dtype)
    per_row = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    return (per_row * weight).sum() / weight.sum().clamp_min(1.0) * temperature**2


def cosine_embedding_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """``1 − mean_i cos(e_s,i, e_t,i)``: how far the student's embeddings point from the
    teacher's.

    Sentence-encoder distillation matches directions rather than class scores, since an
    embedding has no softmax (cosine is what retrieval with the embeddings uses); compare
    DistilBERT's cosine embedding loss (Sanh et al., 2019).

    Args:
        student_emb: ``[B, D]`` student embeddings.
        teacher_emb: ``[B, D]`` teacher embeddings; detached here.

    Returns:
        A scalar tensor in ``[0, 2]``; 0 when every pair points the same way.

    Raises:
        ValueError: when the shapes differ.
    """
    _same_shape("cosine_embedding_loss", student_emb, teacher_emb,
                "both models must embed into the same dimension")
    return 1 - F.cosine_similarity(student_emb, teacher_emb.detach(), dim=-1).mean()


def output_mse_loss(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """``mean((s − t)²)`` between the student's and the teacher's outputs.

    The output-regression form of distillation of Ba & Caruana, "Do Deep Nets Really Need to
    be Deep?" (NeurIPS 2014): the student regresses the teacher's outputs (here a regressor's
    predictions, or embeddings when MSE is asked for).

    Args:
        student_out: the student's output.
        teacher_out: the teacher's, same shape; detached here.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: when the shapes differ.
    """
    _same_shape("output_mse_loss", student_out, teacher_out,
                "both models must give outputs of the same shape")
    return F.mse_loss(student_out, teacher_out.detach())


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
            temperature: float = 4.0, alpha: float = 0.5) -> Tensor:
    """Knowledge distillation loss of Hinton et al. (2015).

    ``alpha · CE(s, y) + (1 − alpha) · T² · KL(softmax(t/T) ‖ softmax(s/T))`` with a
    batch-mean KL (see :func:`soft_target_kl`).

    Args:
        student_logits: ``[B, K]`` logits of the student.
        teacher_logits: ``[B, K]`` logits of the teacher; detached here.
        labels: ``[B]`` int64 class indices.
        temperature: softening temperature ``T > 0``.
        alpha: weight of the hard-label cross-entropy, in ``[0, 1]``.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: for ``alpha`` outside ``[0, 1]``, a non-positive temperature, or shapes
            that differ.

    Example:
        >>> loss = kd_loss(student(x), teacher(x).detach(), y, temperature=4.0, alpha=0.5)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kd_loss: alpha must be in [0, 1], got {alpha}")
    soft = soft_target_kl(student_logits, teacher_logits, temperature)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * hard + (1.0 - alpha) * soft


def hint_loss(student_feat_projected: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNets hint loss: ``mean((r(F_s) − F_t)²)``.

    Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015). ``r`` is the learned
    regressor (projector) the caller applied to the student's guided layer so that its shape
    matches the teacher's hint layer.

    Args:
        student_feat_projected: the projected student feature.
        teacher_feat: the teacher feature, same shape; detached here.

    Returns:
        A scalar tensor (mean squared error over all elements).

    Raises:
        ValueError: when the shapes differ (project the student feature first).
    """
    _same_shape("hint_loss", student_feat_projected, teacher_feat,
                "project the student feature to the teacher's shape first")
    return F.mse_loss(student_feat_projected, teacher_feat.detach())


def _attention_map(feat: Tensor, p: float, size: tuple[int, ...]) -> Tensor:
    """``Q = mean_c |F_c|^p`` resized to ``size``, flattened and L2-normalized per sample."""
    q = feat.abs().pow(p).mean(dim=1, keepdim=True)  # [B, 1, *spatial]
    if tuple(q.shape[2:]) != size:
        pool = F.adaptive_avg_pool1d if q.dim() == 3 else F.adaptive_avg_pool2d
        q = pool(q, size)
    return F.normalize(q.flatten(1), dim=1)


def attention_transfer_loss(fs: Tensor, ft: Tensor, p: float = 2) -> Tensor:
    """Activation-based attention transfer of Zagoruyko & Komodakis (ICLR 2017).

    "Paying More Attention to Attention". Per sample the spatial attention map is
    ``Q = mean_c |F_c|^p``, flattened and L2-normalized; the loss is the batch mean of
    ``‖Q_s − Q_t‖₂``. Channel counts may differ (the map averages channels out); when the
    spatial sizes differ, both maps are adaptive-average-pooled to the smaller size per dim.

    Args:
        fs: student feature, channels first: ``[B, C, L]`` or ``[B, C, H, W]``.
        ft: teacher feature, same batch and rank; detached here.
        p: exponent of the activation magnitudes (the paper uses 2).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: for other ranks, different ranks, or different batch sizes.
    """
    if fs.dim() not in (3, 4) or fs.dim() != ft.dim() or fs.shape[0] != ft.shape[0]:
        raise ValueError(
            f"attention_transfer_loss: needs channels-first [B, C, L] or [B, C, H, W] features "
            f"with the same batch and rank, got {tuple(fs.shape)} and {tuple(ft.shape)}")
    size = tuple(min(a, b) for a, b in zip(fs.shape[2:], ft.shape[2:], strict=True))
    qs = _attention_map(fs, p, size)
    qt = _attention_map(ft.detach(), p, size)
    return torch.linalg.vector_norm(qs - qt, dim=1).mean()


def _batch_similarity(feat: Tensor) -> Tensor:
    flat = feat.flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


def similarity_preserving_loss(fs: Tensor, ft: Tensor) -> Tensor:
    """Similarity-preserving KD of Tung & Mori (ICCV 2019).

    "Similarity-Preserving Knowledge Distillation". With ``F`` the features flattened per
    sample (``[b, -1]``), ``G = row_normalize(F Fᵀ)`` is the ``b × b`` matrix of pairwise
    similarities inside the batch; the loss is ``‖G_s − G_t‖_F² / b²``. Only the batch size has
    to agree, so no projector is needed whatever the widths or layouts.

    Args:
        fs: student feature ``[b, ...]``.
        ft: teacher feature ``[b, ...]``; detached here.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: when the batch sizes differ.
    """
    b = fs.shape[0]
    if ft.shape[0] != b:
        raise ValueError(f"similarity_preserving_loss: batch sizes differ ({b} vs {ft.shape[0]})")
    diff = _batch_similarity(fs) - _batch_similarity(ft.detach())
    return diff.pow(2).sum() / b**2


def hidden_state_loss(student_hidden_projected: Tensor, teacher_hidden: Tensor) -> Tensor:
    """TinyBERT hidden-state loss: ``MSE(H_s W_h, H_t)``.

    Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding" (Findings of
    EMNLP 2020), eq. 8. ``W_h`` is the learned projection the caller applied to the student's
    ``[B, T, d_s]`` hidden states to reach the teacher's width ``d_t``.

    Args:
        student_hidden_projected: ``[B, T, d_t]`` projected student hidden states.
        teacher_hidden: ``[B, T, d_t]`` teacher hidden states; detached here.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: when the shapes differ.
    """
    _same_shape("hidden_state_loss", student_hidden_projected, teacher_hidden,
                "project the student hidden states to the teacher's width first")
    return F.mse_loss(student_hidden_projected, teacher_hidden.detach())


def attention_map_loss(student_attn: Tensor, teacher_attn: Tensor) -> Tensor:
    """TinyBERT attention loss: ``(1/h) Σ_i MSE(A_i^s, A_i^t)`` over heads ``i``.

    Jiao et al. (2020), eq. 7, applied to attention probability maps ``softmax(q kᵀ/√d)``
    (TinyBERT itself fits the pre-softmax scores; probabilities are bounded and compare across
    models of different widths, which is why they are used here). When the head counts differ
    there is no head-to-head pairing, so both sides are averaged over heads first and the loss
    is the MSE of the two mean maps.

    Args:
        student_attn: ``[B, H_s, T, T]`` (or ``[B, T, T]`` for one head).
        teacher_attn: ``[B, H_t, T, T]`` (or ``[B, T, T]``); detached here.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: for different batch or token counts.
    """
    sa = student_attn if student_attn.dim() == 4 else student_attn.unsqueeze(1)
    ta = teacher_attn.detach()
    ta = ta if ta.dim() == 4 else ta.unsqueeze(1)
    if sa.shape[0] != ta.shape[0] or sa.shape[2:] != ta.shape[2:]:
        raise ValueError(f"attention_map_loss: batch or token counts differ: student "
                         f"{tuple(sa.shape)} vs teacher {tuple(ta.shape)}")
    if sa.shape[1] != ta.shape[1]:
        sa, ta = sa.mean(dim=1), ta.mean(dim=1)
    return F.mse_loss(sa, ta)
