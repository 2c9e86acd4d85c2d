"""The statistics of the drift check: PSI on fixed bins, the two-sample KS test, token-frequency buckets.

PSI (population stability index) of a new sample against a reference, over the same bins:

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

with e_i, a_i the reference's and the new sample's share of bin i, each clipped below at
`PSI_EPSILON` = 1e-4 so that an empty bin contributes a large but finite term. Numeric features use
`bins_for(n)` = n // 40 bins (at least 4, at most `PSI_BINS` = 10), so each reference bin holds
about 40 values or more (10 bins of 16 values each make PSI itself noisy: about 0.1 between two
samples of the same distribution), with the reference's quantiles as inner edges (duplicates
dropped, so an integer feature such as a length may get fewer bins); the outer bins are open (-inf, e_1] and
(e_k, +inf), so every new value lands in a bin. The usual bands (Evidently's): PSI < 0.1 no
significant change, 0.1-0.2 moderate, >= 0.2 significant.

The two-sample Kolmogorov-Smirnov test is `scipy.stats.ks_2samp` (two-sided, exact or asymptotic
p-value as scipy chooses); its statistic D, the largest gap between the two empirical CDFs, is
the effect size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

PSI_EPSILON = 1e-4
PSI_BINS = 10
# Token-frequency buckets: calibration tokens sorted by count, cut where the cumulative share of the
# calibration's tokens reaches these marks; a last bucket holds tokens the calibration never saw.
TOKEN_MASS_CUTS = (0.25, 0.5, 0.75, 0.9)
TOKEN_FOLDS = 5


def psi(expected_counts: Sequence[float], actual_counts: Sequence[float], epsilon: float = PSI_EPSILON) -> float:
    """PSI of the new sample (`actual_counts` per bin) against the reference (`expected_counts`)."""
    e = np.asarray(expected_counts, np.float64)
    a = np.asarray(actual_counts, np.float64)
    if e.shape != a.shape or e.sum() <= 0 or a.sum() <= 0:
        raise ValueError(f"psi needs two non-empty histograms over the same bins, got {e.shape} and {a.shape}")
    e = np.clip(e / e.sum(), epsilon, None)
    a = np.clip(a / a.sum(), epsilon, None)
    return float(np.sum((a - e) * np.log(a / e)))


def bins_for(n: int) -> int:
    """PSI bins for a reference of `n` values: about 40 per bin, 4 to `PSI_BINS`."""
    return int(min(PSI_BINS, max(4, n // 40)))


def quantile_edges(reference: Sequence[float], bins: int = PSI_BINS) -> list[float]:
    """Inner bin edges: the reference's 1/bins ... (bins-1)/bins quantiles, duplicates dropped."""
    qs = np.quantile(np.asarray(reference, np.float64), np.arange(1, bins) / bins)
    return [float(q) for q in np.unique(qs)]


def bin_counts(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin (-inf, e_1], (e_1, e_2], ..., (e_k, +inf): len(edges) + 1 bins."""
    idx = np.searchsorted(np.asarray(edges, np.float64), np.asarray(values, np.float64), side="left")
    return [int(c) for c in np.bincount(idx, minlength=len(edges) + 1)]


def ks_test(reference: Sequence[float], new: Sequence[float]) -> tuple[float, float]:
    """(statistic D, p-value) of `scipy.stats.ks_2samp`, two-sided."""
    from scipy.stats import ks_2samp

    result = ks_2samp(np.asarray(reference, np.float64), np.asarray(new, np.float64))
    return float(result.statistic), float(result.pvalue)


def numeric_feature(values: Sequence[float], bins: int | None = None, keep: int = 4000) -> dict:
    """A numeric feature's reference record: its values (up to `keep`, evenly subsampled, for KS),
    the PSI bin edges and the reference counts per bin."""
    values = np.asarray(values, np.float64)
    edges = quantile_edges(values, bins or bins_for(len(values)))
    kept = values if len(values) <= keep else values[np.linspace(0, len(values) - 1, keep).astype(int)]
    return {"edges": edges, "counts": bin_counts(values, edges), "values": [round(float(v), 6) for v in kept],
            "mean": float(values.mean()), "n": int(len(values))}


def token_ranking(token_lists: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """(token ids by descending count, ties by id; cut ranks): bucket b holds ranks [cut[b-1], cut[b])."""
    counts = Counter(t for tokens in token_lists for t in tokens)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    total = sum(counts.values())
    cumulative = np.cumsum([counts[t] for t in ranked]) / max(total, 1)
    cuts = [int(np.searchsorted(cumulative, m, side="left")) + 1 for m in TOKEN_MASS_CUTS]
    return ranked, cuts


def token_bucket_counts(token_lists: Sequence[Sequence[int]], ranked: Sequence[int], cuts: Sequence[int]) -> list[int]:
    """Tokens per frequency bucket (len(cuts) + 1 seen buckets, then one for tokens not in `ranked`)."""
    rank = {t: r for r, t in enumerate(ranked)}
    unseen = len(cuts) + 1
    buckets = [int(np.searchsorted(cuts, rank[t], side="right")) if t in rank else unseen
               for tokens in token_lists for t in tokens]
    return [int(c) for c in np.bincount(np.asarray(buckets, np.int64), minlength=unseen + 1)]


def token_frequency_feature(token_lists: Sequence[Sequence[int]]) -> dict:
    """The calibration's token-frequency table and its expected bucket shares.

    The reference counts are cross-fitted: the texts are split into `TOKEN_FOLDS` folds (text i in
    fold i % 5), and each fold's tokens are bucketed by the ranking of the other folds, so the
    reference carries the share of unseen tokens that text from the same distribution shows. New
    traffic is bucketed by the ranking of all calibration texts."""
    ranked, cuts = token_ranking(token_lists)
    counts = np.zeros(len(cuts) + 2, np.int64)
    for fold in range(TOKEN_FOLDS):
        train = [t for i, t in enumerate(token_lists) if i % TOKEN_FOLDS != fold]
        test = [t for i, t in enumerate(token_lists) if i % TOKEN_FOLDS == fold]
        if train and test:
            counts += np.asarray(token_bucket_counts(test, *token_ranking(train)))
    return {"ranked_ids": [int(t) for t in ranked], "cuts": cuts, "counts": [int(c) for c in counts],
            "labels": [f"top {int(m * 100)}% of tokens" if i == 0 else
                       f"{int(TOKEN_MASS_CUTS[i - 1] * 100)}-{int(m * 100)}%" for i, m in enumerate(TOKEN_MASS_CUTS)]
            + [f"{int(TOKEN_MASS_CUTS[-1] * 100)}-100%", "unseen in calibration"]}
