"""Knowledge distillation: the loss as a pure function of tensors, and the loading / freezing of the teacher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["DistillationOutput", "distillation_loss", "causal_lm_distillation_loss", "freeze_teacher"]


@dataclass
class DistillationOutput:
    """Result of [`distillation_loss`]: the combined loss and its components (all scalar tensors).

    Args:
        loss: `(1 - alpha) * task_loss + alpha * kd_loss + hidden_weight * hidden_loss`.
        task_loss: the task loss (cross-entropy against the labels, or the one given).
        kd_loss: `T^2 * KL(softmax(teacher / T) || softmax(student / T))`, already scaled by `T^2`.
        hidden_loss: mean over layers of the MSE between hidden states (0 when not asked for).
    """

    loss: torch.Tensor
    task_loss: torch.Tensor
    kd_loss: torch.Tensor
    hidden_loss: torch.Tensor


def _task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:  # regression head (e.g. STS-B)
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _hidden_mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """MSE between `(batch, seq, hidden)` states, over the real tokens of `attention_mask` when given."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"Hidden states {tuple(student.shape)} (student) and {tuple(teacher.shape)} (teacher) differ: the "
            "hidden-state term needs the same hidden size."
        )
    teacher = teacher.detach().to(student.dtype)
    if attention_mask is None:
        return F.mse_loss(student, teacher)
    weights = attention_mask.to(student.dtype).unsqueeze(-1)
    return ((student - teacher) ** 2 * weights).sum() / (weights.sum() * student.shape[-1]).clamp_min(1.0)


def _token_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """`T^2 * KL(teacher || student)` per token of `(batch, seq, num_labels)` logits, averaged over the tokens that
    count (real tokens, labels other than -100). The mean is over this batch's tokens, as the task loss's is; under
    DDP the gradients of the per-process means are averaged."""
    keep = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device)
    if attention_mask is not None:
        keep &= attention_mask.to(student.device).bool()
    if labels is not None and labels.shape == student.shape[:2]:
        keep &= labels.to(student.device) != -100
    s = F.log_softmax(student / temperature, dim=-1)
    t = F.log_softmax(teacher / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(dim=-1)
    weights = keep.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0) * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    task_loss: torch.Tensor | None = None,
    student_hidden_states: tuple[torch.Tensor, ...] | None = None,
    teacher_hidden_states: tuple[torch.Tensor, ...] | None = None,
    hidden_weight: float = 0.0,
    attention_mask: torch.Tensor | None = None,
) -> DistillationOutput:
    """Hinton et al. (2015) distillation loss, a pure function of tensors.

    `loss = (1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))`. The `T^2`
    factor keeps the gradient magnitude of the soft term independent of `T` (Hinton et al. 2015, section 2). For a
    regression head (one logit) the soft term is the MSE between the logits. For token classification (`(batch, seq,
    num_labels)` logits) the KL is taken per token and averaged over the tokens that count: real tokens of
    `attention_mask`, and, when `labels` are given, those whose label is not -100 (special tokens and the later
    sub-tokens of a word), so the soft term weighs the same tokens as the task loss. The teacher logits are detached,
    so no gradient ever reaches the teacher.

    Args:
        student_logits: `(batch, num_labels)` logits of the student, or `(batch, seq, num_labels)` per token.
        teacher_logits: logits of the teacher, same shape.
        labels: task labels; used to compute the task loss when `task_loss` is not given, and for per-token logits to
            leave out the tokens labelled -100.
        alpha: weight of the distillation term, in `[0, 1]`.
        temperature: softmax temperature `T > 0`.
        task_loss: a task loss computed elsewhere (e.g. by the model); takes precedence over `labels`.
        student_hidden_states / teacher_hidden_states: per-layer hidden states for the optional MSE term.
        hidden_weight: weight of the hidden-state MSE (0 = off).
        attention_mask: `(batch, seq)` mask of real tokens; when given, the hidden-state MSE (and the per-token KL) is
            averaged over real tokens only, so padding (whose states depend on the batch's longest row) carries no
            weight.

    Returns:
        [`DistillationOutput`] with the combined loss and its components.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1].")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "the teacher must be trained on the same labels as the student."
        )
    teacher_logits = teacher_logits.detach().to(student_logits.dtype)
    if task_loss is None:
        if labels is None:
            task_loss = student_logits.new_zeros(())
            if alpha < 1.0:
                raise ValueError("distillation_loss needs `labels` or `task_loss` when alpha < 1.")
        else:
            task_loss = _task_loss(student_logits, labels)

    num_labels = student_logits.shape[-1]
    if num_labels == 1:
        kd_loss = F.mse_loss(student_logits, teacher_logits)
    elif student_logits.dim() == 3:
        kd_loss = _token_kl(student_logits, teacher_logits, temperature, labels, attention_mask)
    else:
        s = F.log_softmax(student_logits.reshape(-1, num_labels) / temperature, dim=-1)
        t = F.log_softmax(teacher_logits.reshape(-1, num_labels) / temperature, dim=-1)
        # batchmean over every position is the true KL per example (sum over classes, mean over rows).
        kd_loss = F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2

    hidden_loss = student_logits.new_zeros(())
    if hidden_weight > 0:
        if not student_hidden_states or not teacher_hidden_states:
            raise ValueError("hidden_weight > 0 needs student_hidden_states and teacher_hidden_states.")
        if len(student_hidden_states) != len(teacher_hidden_states):
            raise ValueError(
                f"Student has {len(student_hidden_states)} hidden states, teacher {len(teacher_hidden_states)}: "
                "the hidden-state term needs the same number of layers."
            )
        pairs = zip(student_hidden_states, teacher_hidden_states)
        hidden_loss = torch.stack([_hidden_mse(s_h, t_h, attention_mask) for s_h, t_h in pairs]).mean()

    loss = (1.0 - alpha) * task_loss + alpha * kd_loss + hidden_weight * hidden_loss
    return DistillationOutput(loss=loss, task_loss=task_loss, kd_loss=kd_loss, hidden_loss=hidden_loss)


def _chunk_sums(student_head, teacher_head, temperature, student_h, teacher_h, targets):
    """Summed cross-entropy and summed KL(teacher || student) at `temperature` over one chunk of positions."""
    student = student_head(student_h).float()
    with torch.no_grad():
        teacher = teacher_head(teacher_h).float()
    ce = F.cross_entropy(student, targets, reduction="sum")
    s = F.log_softmax(student / temperature, dim=-1)
    t = F.log_softmax(teacher / temperature, dim=-1)
    return ce, (t.exp() * (t - s)).sum()


def causal_lm_distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 512,
) -> DistillationOutput:
    """Token-level distillation of a causal LM, a pure function that never holds the vocabulary-sized logits of a
    whole batch.

    The logits at position `i` predict token `i + 1`, so position `i` counts when `labels[i + 1]` is not -100 (and,
    with `attention_mask`, is a real token). Over those `N` positions, `loss = (1 - alpha) * CE + alpha * T^2 *
    KL(softmax(teacher / T) || softmax(student / T))`, each a mean per token (Hinton et al. 2015; token-level KD as
    in Minitron, Sreenivas et al. 2024). The positions are taken `chunk_size` at a time: each chunk's logits are
    computed from the final hidden states by the output heads, reduced to two sums, and recomputed in the backward
    pass (activation checkpointing), so memory holds `chunk_size x vocabulary` logits, not `batch x length x
    vocabulary`. The mean is over this batch's tokens, as the model's own loss is; gradient accumulation divides it by
    the steps and DDP averages it, never multiplied by the world size.

    Args:
        student_hidden / teacher_hidden: `(batch, length, hidden)` final hidden states (after the final norm), the
            input of each model's output head.
        student_head / teacher_head: the output heads (`model.get_output_embeddings()`), hidden -> vocabulary logits.
        labels: `(batch, length)` token ids, -100 where no token is to be predicted (padding, prompts).
        alpha: weight of the distillation term, in `[0, 1]`.
        temperature: softmax temperature `T > 0`.
        attention_mask: `(batch, length)` mask of real tokens.
        chunk_size: positions per chunk.

    Returns:
        [`DistillationOutput`] (`hidden_loss` is 0).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1].")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
    if student_hidden.shape[:2] != labels.shape or teacher_hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"Hidden states {tuple(student_hidden.shape)} (student), {tuple(teacher_hidden.shape)} (teacher) and "
            f"labels {tuple(labels.shape)} must share (batch, length)."
        )
    targets = labels[:, 1:].to(student_hidden.device)
    keep = targets != -100
    if attention_mask is not None:
        keep &= attention_mask[:, 1:].to(keep.device).bool()
    student_h = student_hidden[:, :-1][keep]
    teacher_h = teacher_hidden[:, :-1][keep].detach()
    targets = targets[keep]
    count = targets.numel()
    chunk = partial(_chunk_sums, student_head, teacher_head, temperature)
    ce_sum = kl_sum = student_hidden.sum() * 0.0  # a batch without a token to predict adds nothing
    for start in range(0, count, chunk_size):
        parts = (student_h[start : start + chunk_size], teacher_h[start : start + chunk_size])
        part_targets = targets[start : start + chunk_size]
        if torch.is_grad_enabled() and student_h.requires_grad:
            ce, kl = checkpoint(chunk, *parts, part_targets, use_reentrant=False)
        else:
            ce, kl = chunk(*parts, part_targets)
        ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
    tokens = max(count, 1)
    task_loss, kd_loss = ce_sum / tokens, kl_sum / tokens * temperature**2
    loss = (1.0 - alpha) * task_loss + alpha * kd_loss
    return DistillationOutput(loss=loss, task_loss=task_loss, kd_loss=kd_loss, hidden_loss=loss.new_zeros(()))


def freeze_teacher(teacher: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Puts the teacher in eval mode, turns its gradients off and moves it to `device`."""
    teacher.eval()
    teacher.requires_grad_(False)
    if device is not None:
        teacher.to(device)
    return teacher
