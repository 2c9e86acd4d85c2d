"""Distillation losses. Every function returns one value per sample, `[batch]` float32, so that a
batch split over gradient-accumulation micro-batches and DDP ranks sums to the same mean.

Encoders (BERT-style): the student's mean-pooled embedding against the teacher's (cosine: 1 - cos;
mse: squared error averaged over the dimensions) and chosen hidden states (per-token MSE or 1 - cos,
averaged over real tokens). Decoders (Llama family): KL(teacher || student) of the temperature-softened next-
token distributions, multiplied by T^2 so its gradients keep their scale as T changes (Hinton et al.,
2015), averaged over real tokens; next-token cross-entropy where labels exist (the text itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states over real tokens. hidden [b, s, h], attention_mask [b, s] -> [b, h]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Per-sample loss between pooled embeddings [b, h]: `1 - cos` or the mean squared error."""
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    if kind == "mse":
        return ((student - teacher) ** 2).mean(dim=-1)
    raise ValueError(f"embedding loss {kind!r}: choose cosine or mse")


def token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of token states [b, s, h], averaged over the real tokens of each sample."""
    per_token = ((student.float() - teacher.float()) ** 2).mean(dim=-1)          # [b, s]
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def token_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample `1 - cos` of token states [b, s, h], averaged over the real tokens of each sample."""
    per_token = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)   # [b, s]
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


HIDDEN_LOSS_FUNCTIONS = {"mse": token_mse, "cosine": token_cosine}


def hidden_pairs(layer_map, which: str = "all") -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs the hidden-state loss compares: every student layer
    against `layer_map`'s teacher layer ("all"), or only the last ("last")."""
    pairs = list(enumerate(layer_map))
    return pairs if which == "all" else pairs[-1:]


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
                  temperature: float = 1.0) -> torch.Tensor:
    """Per-sample T^2 * KL(softmax(t / T) || softmax(s / T)) over the vocabulary, averaged over the
    positions where `mask` [b, s] is 1. logits [b, s, vocab]."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)   # [b, s]
    mask = mask.to(per_token.dtype)
    return (t * t) * (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def next_token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of predicting token i+1 from position i, over positions where both
    tokens are real. logits [b, s, vocab], input_ids and mask [b, s]."""
    pred, target = logits[:, :-1].float(), input_ids[:, 1:]
    valid = (mask[:, :-1] * mask[:, 1:]).to(pred.dtype)
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").view_as(valid)
    return (ce * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def next_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is real: where a causal LM's prediction can be checked. [b, s]"""
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, :-1] * mask[:, 1:]
    return out
