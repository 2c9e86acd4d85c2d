"""Accuracy of a quantized language model against its original, and the gate that decides.

On held-out token batches (`[batch, seq]` int64 tensors), with logits from both models:
    perplexity       = exp(mean next-token cross-entropy)
    ppl_increase     = ppl(quantized) / ppl(original) - 1
    top1_agreement   = share of positions where both models' argmax agree
    kl               = mean KL(original || quantized) of the next-token distributions
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inferforge.errors import UserInputError

# The gate `inferforge quantize LLAMA_DIR --config FORMAT` (and the recipe form) applies unless it is
# turned off explicitly. Real quantization of real models lands well inside these limits: int8
# weight-only adds well under 1% perplexity, W8A8 (SmoothQuant) and FP8 about 1-3% on 1-8B models;
# group-wise int4 (g128; RTN, GPTQ, AWQ) about 4-12% (Llama-3-8B about +6-10%, smaller models more),
# with 90-99% of next-token argmaxes unchanged. A broken quantization (wrong scales, clipped or
# zeroed weights) raises perplexity by tens of percent or more and changes most argmaxes.
DEFAULT_MIN_TOP1_AGREEMENT = 0.90
DEFAULT_MAX_PPL_INCREASE = {"int8-weight-only": 0.05, "w8a8": 0.05, "fp8": 0.05,
                            "int4-g128": 0.15, "int4-gptq": 0.15, "int4-awq": 0.15}


@dataclass(frozen=True)
class LMGate:
    max_ppl_increase: float | None = None      # 0.02 = 2%
    min_top1_agreement: float | None = None
    max_kl: float | None = None

    @classmethod
    def default(cls, fmt: str) -> LMGate:
        """The default gate for a `--config` format: see DEFAULT_MAX_PPL_INCREASE and DEFAULT_MIN_TOP1_AGREEMENT."""
        return cls(max_ppl_increase=DEFAULT_MAX_PPL_INCREASE[fmt], min_top1_agreement=DEFAULT_MIN_TOP1_AGREEMENT)

    def describe(self) -> str:
        """'perplexity increase <= 5%, top-1 agreement >= 90%': the limits as the help and reports state them."""
        parts = [f"perplexity increase <= {_percent(self.max_ppl_increase)}" if self.max_ppl_increase is not None else "",
                 f"top-1 agreement >= {_percent(self.min_top1_agreement)}" if self.min_top1_agreement is not None else "",
                 f"KL <= {self.max_kl:g}" if self.max_kl is not None else ""]
        return ", ".join(p for p in parts if p)

    def checks(self, metrics: dict) -> list[dict]:
        """One check per limit: name, kind 'gate', measured, op, limit, passed (as the encoder gates)."""
        rows = [("perplexity increase (held-out)", "ppl_increase", "<=", self.max_ppl_increase),
                ("top-1 agreement (held-out)", "top1_agreement", ">=", self.min_top1_agreement),
                ("KL per token (held-out)", "kl", "<=", self.max_kl)]
        return [{"name": name, "kind": "gate", "measured": metrics[key], "op": op, "limit": limit,
                 "passed": metrics[key] <= limit if op == "<=" else metrics[key] >= limit}
                for name, key, op, limit in rows if limit is not None]

    def __post_init__(self):
        if all(v is None for v in (self.max_ppl_increase, self.min_top1_agreement, self.max_kl)):
            raise UserInputError("LMGate needs at least one of max_ppl_increase, min_top1_agreement, max_kl")

    def evaluate(self, original, quantized, batches) -> dict:
        return compare_lms(original, quantized, batches)

    def failures(self, metrics: dict) -> list[str]:
        out = []
        if self.max_ppl_increase is not None and metrics["ppl_increase"] > self.max_ppl_increase:
            out.append(f"perplexity +{metrics['ppl_increase']:.2%} > +{self.max_ppl_increase:.2%}")
        if self.min_top1_agreement is not None and metrics["top1_agreement"] < self.min_top1_agreement:
            out.append(f"top-1 agreement {metrics['top1_agreement']:.2%} < {self.min_top1_agreement:.2%}")
        if self.max_kl is not None and metrics["kl"] > self.max_kl:
            out.append(f"KL {metrics['kl']:.4f} > {self.max_kl:.4f}")
        return out


def _percent(share: float) -> str:
    return f"{round(share * 100, 4):g}%"


def _logits(model, batch):
    out = model(batch)
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.no_grad()
def compare_lms(original, quantized, batches) -> dict:
    """Perplexity of both, its relative increase, top-1 agreement and mean KL over `batches`."""
    nll_o = nll_q = kl = agree = count = 0.0
    for batch in batches:
        lo, lq = _logits(original, batch)[:, :-1], _logits(quantized, batch)[:, :-1]
        target = batch[:, 1:]
        nll_o += F.cross_entropy(lo.reshape(-1, lo.shape[-1]), target.reshape(-1), reduction="sum").item()
        nll_q += F.cross_entropy(lq.reshape(-1, lq.shape[-1]), target.reshape(-1), reduction="sum").item()
        po = F.log_softmax(lo, -1)
        kl += F.kl_div(F.log_softmax(lq, -1), po, log_target=True, reduction="sum").item()
        agree += (lo.argmax(-1) == lq.argmax(-1)).sum().item()
        count += target.numel()
    if count == 0:
        raise UserInputError("compare_lms needs held-out batches with at least two tokens per sequence")
    ppl_o, ppl_q = math.exp(nll_o / count), math.exp(nll_q / count)
    return {"ppl_original": ppl_o, "ppl_quantized": ppl_q, "ppl_increase": ppl_q / ppl_o - 1,
            "top1_agreement": agree / count, "kl": kl / count, "tokens": int(count)}


@dataclass(frozen=True)
class EncoderGate:
    """Gate for encoders: cosine similarity of mean-pooled embeddings with the original model."""

    min_cosine: float = 0.99
    mean_cosine: float | None = None

    def evaluate(self, original, quantized, batches) -> dict:
        return compare_encoders(original, quantized, batches)

    def failures(self, metrics: dict) -> list[str]:
        out = []
        if metrics["min_cosine"] < self.min_cosine:
            out.append(f"min cosine {metrics['min_cosine']:.4f} < {self.min_cosine:.4f}")
        if self.mean_cosine is not None and metrics["mean_cosine"] < self.mean_cosine:
            out.append(f"mean cosine {metrics['mean_cosine']:.4f} < {self.mean_cosine:.4f}")
        return out


@torch.no_grad()
def compare_encoders(original, quantized, batches) -> dict:
    """Per sequence, the cosine of the mean-pooled last hidden states (over attention_mask) of both
    models; `batches` are tokenizer outputs (dicts of tensors). Returns min and mean cosine."""
    cos = []
    for batch in batches:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = []
        for model in (original, quantized):
            hidden = model(**batch).last_hidden_state.float()
            pooled.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        cos.append(F.cosine_similarity(pooled[0].double(), pooled[1].double(), dim=-1))
    if not cos:
        raise UserInputError("compare_encoders needs at least one held-out batch")
    cos = torch.cat(cos)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "sequences": int(cos.numel())}
