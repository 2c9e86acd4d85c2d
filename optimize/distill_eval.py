"""Held-out metrics of a student against its teacher.

Encoders: cosine of the student's mean-pooled embedding (projected to the teacher's width when the
widths differ) with the teacher's, per held-out text: mean, min, 1st percentile; and retrieval
agreement: with each held-out text as a query against all the others, the share of queries whose
nearest text is the same under the student as under the teacher.
Decoders: over every held-out position whose next token is real, the share where the student's most
likely next token is the teacher's (top-1 agreement) and the mean KL(teacher || student) at T = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from inferforge.optimize.distill_data import collate
from inferforge.optimize.distill_losses import kl_divergence, masked_mean_pool, next_token_mask

EVAL_BATCH = 32


def _batches(token_ids: Sequence[Sequence[int]], pad: int, device):
    # Longest first, so batches hold texts of similar length (less padding).
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    for start in range(0, len(order), EVAL_BATCH):
        idx = order[start:start + EVAL_BATCH]
        ids, mask = collate([token_ids[i] for i in idx], pad)
        yield idx, ids.to(device), mask.to(device)


@torch.no_grad()
def teacher_embeddings(teacher: torch.nn.Module, token_ids, pad: int, device, autocast) -> torch.Tensor:
    """[n, hidden] float32 mean-pooled teacher embeddings, in the order of `token_ids`."""
    out = None
    for idx, ids, mask in _batches(token_ids, pad, device):
        with autocast():
            hidden = teacher(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = masked_mean_pool(hidden.float(), mask).cpu()
        if out is None:
            out = torch.empty(len(token_ids), pooled.shape[-1])
        out[idx] = pooled
    return out


@torch.no_grad()
def evaluate_encoder(module, teacher_pooled: torch.Tensor, token_ids, pad: int, device, autocast) -> dict:
    """Metrics of the student (a `StudentWithHeads`) against cached teacher embeddings."""
    was_training = module.training
    module.eval()
    got = torch.empty_like(teacher_pooled)
    for idx, ids, mask in _batches(token_ids, pad, device):
        with autocast():
            got[idx] = module(ids, mask)["pooled"].float().cpu()
    module.train(was_training)
    cos = F.cosine_similarity(got.double(), teacher_pooled.double(), dim=-1).numpy()
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "p01_cosine": float(np.percentile(cos, 1)), "retrieval_agreement": retrieval_agreement(teacher_pooled, got),
            "held_out_texts": len(cos)}


def retrieval_agreement(teacher: torch.Tensor, student: torch.Tensor) -> float | None:
    """Share of texts whose nearest other text (cosine) is the same under both models."""
    if len(teacher) < 3:
        return None

    def nearest(x):
        x = F.normalize(x.double(), dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(dim=-1)

    return float((nearest(teacher) == nearest(student)).double().mean())


@torch.no_grad()
def evaluate_decoder(module, teacher: torch.nn.Module, token_ids, pad: int, device, autocast) -> dict:
    was_training = module.training
    module.eval()
    agree, positions, kl_sum = 0, 0, 0.0
    for _, ids, mask in _batches(token_ids, pad, device):
        with autocast():
            student_logits = module(ids, mask)["logits"].float()
            teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits.float()
        valid = next_token_mask(mask)
        same = (student_logits.argmax(-1) == teacher_logits.argmax(-1)) & valid.bool()
        agree += int(same.sum())
        count = int(valid.sum())
        positions += count
        # kl_divergence averages per sample; weight each sample by its number of positions.
        per_sample = kl_divergence(student_logits, teacher_logits, valid, temperature=1.0)
        kl_sum += float((per_sample * valid.sum(dim=1)).sum())
    module.train(was_training)
    return {"top1_agreement": agree / max(positions, 1), "kl": kl_sum / max(positions, 1),
            "held_out_positions": positions, "held_out_texts": len(token_ids)}
