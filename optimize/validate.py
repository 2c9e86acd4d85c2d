"""Validation of an optimized encoder against its source: mean-pooled embedding cosine similarity."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class EmbeddingReport:
    """Cosine similarity between source and optimized embeddings over held-out sentences."""

    sentences: int
    min_cosine: float
    mean_cosine: float
    p01_cosine: float
    worst: tuple[tuple[float, str], ...]   # the lowest-scoring sentences, for the report

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


def compare_embeddings(reference: np.ndarray, candidate: np.ndarray, sentences, *, worst: int = 5) -> EmbeddingReport:
    if reference.shape != candidate.shape:
        raise ValueError(f"embedding shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    cos = cosine_rows(reference, candidate)
    order = np.argsort(cos)[:worst]
    return EmbeddingReport(
        sentences=len(cos),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        p01_cosine=float(np.percentile(cos, 1)),
        worst=tuple((float(cos[i]), sentences[i]) for i in order),
    )
