"""When requests are sent: the load modes and the arrival process.

  offline      every request is submitted at t = 0 (`--scenario generate`; infinite rate)
  rate         open loop: inter-arrival gaps ~ Gamma(shape=B, scale=1/(R*B)), mean 1/R, variance
               1/(R^2 B); B = 1 is a Poisson process (exponential gaps), B < 1 burstier, B > 1
               more regular (as `vllm bench serve --burstiness`). The first request goes at t = 0.
  concurrency  closed loop: C clients, each sends its next request when its previous one ends
  sweep        a sequence of `rate` runs searching for the highest rate that meets every target
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inferforge.errors import UserInputError

MODES = ("offline", "rate", "concurrency", "sweep")


@dataclass(frozen=True)
class LoadConfig:
    mode: str = "offline"
    rate: float | None = None           # requests/s (rate), the starting rate (sweep)
    burstiness: float = 1.0
    concurrency: int | None = None
    sweep_max_doublings: int = 6        # sweep: rate, 2*rate, 4*rate ... until a point misses
    sweep_bisections: int = 3           # then this many bisection steps between the last pass and the first miss

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserInputError(f"load mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mode in ("rate", "sweep") and (self.rate is None or not self.rate > 0):
            raise UserInputError(f"--rate must be > 0 requests/s, got {self.rate}")
        if not self.burstiness > 0:
            raise UserInputError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.mode == "concurrency" and (self.concurrency is None or self.concurrency < 1):
            raise UserInputError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.sweep_max_doublings < 0 or self.sweep_bisections < 0:
            raise UserInputError("sweep steps must be >= 0")

    def at_rate(self, rate: float) -> LoadConfig:
        """One point of a sweep: an open-loop run at `rate`."""
        return LoadConfig(mode="rate", rate=rate, burstiness=self.burstiness)

    def summary(self) -> dict:
        """report.json's `load`; offline's rate is the string "inf" (JSON has no infinity)."""
        rate = "inf" if self.mode == "offline" else self.rate if self.mode in ("rate", "sweep") else None
        return {"mode": self.mode, "rate": rate, "burstiness": self.burstiness, "concurrency": self.concurrency}


def arrival_times(n: int, rate: float, *, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times in seconds from the start, [n] float64, non-decreasing, the first at 0.

    Gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate for every burstiness."""
    if n < 1:
        return np.zeros(0)
    if rate == float("inf"):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])
