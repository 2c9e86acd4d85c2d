"""Validation of an optimized encoder against its source: mean-pooled embedding cosine similarity."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class EmbeddingReport:
    """Cosine similarity between source and optimized embeddings over held-out texts.

    `buckets` holds the same numbers per length bucket (`sentences`, `min_cosine`, `mean_cosine`,
    `p01_cosine`, and `tokens`: the [shortest, longest] input in tokens), in bucket order.
    """

    sentences: int
    min_cosine: float
    mean_cosine: float
    p01_cosine: float
    worst: tuple[tuple[float, str], ...]   # the lowest-scoring sentences, for the report
    buckets: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["worst"] = [{"cosine": c, "sentence": s} for c, s in self.worst]
        return d


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, d] arrays, computed in float64."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.clip(den, 1e-12, None)


def compare_embeddings(reference: np.ndarray, candidate: np.ndarray, sentences, *, worst: int = 5,
                       buckets: dict[str, list[int]] | None = None, tokens=None) -> EmbeddingReport:
    """Row-wise cosine of `reference` and `candidate` ([n, d]); `buckets` maps a bucket name to row
    indices, `tokens` gives each row's input length in tokens (for the bucket's token range)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"embedding shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    cos = cosine_rows(reference, candidate)
    order = np.argsort(cos)[:worst]
    per_bucket = {}
    for name, idx in (buckets or {}).items():
        c = cos[idx]
        per_bucket[name] = {"sentences": len(idx), "min_cosine": float(c.min()), "mean_cosine": float(c.mean()),
                            "p01_cosine": float(np.percentile(c, 1))}
        if tokens is not None:
            lengths = [tokens[i] for i in idx]
            per_bucket[name]["tokens"] = [min(lengths), max(lengths)]
    return EmbeddingReport(
        sentences=len(cos),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        p01_cosine=float(np.percentile(cos, 1)),
        worst=tuple((float(cos[i]), sentences[i]) for i in order),
        buckets=per_bucket,
    )
