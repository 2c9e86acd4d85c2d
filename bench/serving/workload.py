"""The requests a benchmark sends: prompts and output lengths, from a file or synthetic.

Prompt sources:
  * a text file, one prompt per line (blank lines skipped);
  * a JSONL file, one object per line: {"prompt": "text" or [token ids], "output_len"?: int};
  * synthetic: `num_requests` prompts of random token ids whose lengths follow `input_len`.
Output lengths come from the JSONL line when it has one, else from `output_len`. Every draw uses
one numpy Generator seeded with `seed`, so a workload is the same on every run.

Length distributions (`LengthDist`), all rounded to integers and clipped to >= 1:
  fixed    every request gets `mean`
  uniform  integers in [min, max], both included; by default min/max = mean * (1 -/+ range_ratio)
  normal   round(N(mean, std)), clipped to [1, max] when max is given
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inferforge.errors import UserInputError

DISTRIBUTIONS = ("fixed", "uniform", "normal")


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts; see the module docstring."""

    kind: str = "fixed"
    mean: int = 128
    range_ratio: float | None = None    # uniform: min/max = mean * (1 -/+ range_ratio) unless min/max given
    std: float | None = None            # normal
    min: int | None = None
    max: int | None = None
    name: str = "length"                # the flag's name, for messages

    def __post_init__(self):
        flag = f"--{self.name}"
        if self.kind not in DISTRIBUTIONS:
            raise UserInputError(f"{flag}-dist {self.kind!r}: choose one of {', '.join(DISTRIBUTIONS)}")
        if self.mean < 1:
            raise UserInputError(f"{flag} must be >= 1, got {self.mean}")
        if self.kind == "uniform":
            if self.range_ratio is None and (self.min is None or self.max is None):
                raise UserInputError(f"{flag}-dist uniform needs {flag}-range R (0 <= R < 1) or {flag}-min and {flag}-max")
            if self.range_ratio is not None and not 0 <= self.range_ratio < 1:
                raise UserInputError(f"{flag}-range must be in [0, 1), got {self.range_ratio}")
            low, high = self.bounds()
            if not 1 <= low <= high:
                raise UserInputError(f"{flag}-min/{flag}-max must satisfy 1 <= min <= max, got {low}..{high}")
        if self.kind == "normal" and (self.std is None or self.std < 0):
            raise UserInputError(f"{flag}-dist normal needs {flag}-std >= 0")

    def bounds(self) -> tuple[int, int]:
        """Uniform: the inclusive integer range."""
        if self.min is not None and self.max is not None:
            return self.min, self.max
        r = self.range_ratio or 0.0
        return max(1, int(round(self.mean * (1 - r)))), max(1, int(round(self.mean * (1 + r))))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.mean, dtype=np.int64)
        if self.kind == "uniform":
            low, high = self.bounds()
            return rng.integers(low, high + 1, n)
        values = np.rint(rng.normal(self.mean, self.std, n)).astype(np.int64)
        return np.clip(values, 1, self.max if self.max is not None else None)


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send; `dataset` is a .txt / .jsonl path, or None for synthetic prompts."""

    num_requests: int = 100
    input_len: LengthDist = LengthDist(mean=128, name="input-len")
    output_len: LengthDist = LengthDist(mean=128, name="output-len")
    dataset: str | None = None
    seed: int = 0
    warmup: int = 2

    def __post_init__(self):
        if self.num_requests < 1:
            raise UserInputError(f"--num-requests must be >= 1, got {self.num_requests}")
        if self.warmup < 0:
            raise UserInputError(f"--warmup must be >= 0, got {self.warmup}")
        if self.dataset is not None and not Path(self.dataset).is_file():
            raise UserInputError(f"--dataset {self.dataset}: no such file")

    def settings(self) -> dict:
        d = asdict(self)
        for key in ("input_len", "output_len"):
            d[key].pop("name")
        if self.dataset is not None:
            d["dataset"] = Path(self.dataset).name
            d.pop("input_len")
        return d


@dataclass(frozen=True)
class BenchRequest:
    """One request. `prompt` is token ids, or text when `prompt_tokens` is unknown until the server says."""

    id: int
    prompt: list[int] | str
    prompt_tokens: int | None
    output_len: int


def _read_dataset(path: Path) -> list[tuple[list[int] | str, int | None]]:
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompt, out = obj["prompt"], obj.get("output_len")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserInputError(f"{path.name} line {number}: expected {{\"prompt\": ..., \"output_len\"?: int}}") from None
            ok_prompt = isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                                    and all(isinstance(t, int) for t in prompt))
            if not ok_prompt or (out is not None and (not isinstance(out, int) or out < 1)):
                raise UserInputError(f"{path.name} line {number}: prompt must be text or a list of token ids, "
                                     "output_len an int >= 1")
            rows.append((prompt, out))
    else:
        rows = [(line, None) for line in lines if line.strip()]
    if not rows:
        raise UserInputError(f"{path.name}: no prompts")
    return rows


def build_workload(config: WorkloadConfig, *, vocab_size: int | None, tokenize=None) -> list[BenchRequest]:
    """`warmup + num_requests` requests (the first `warmup` are the warm-up ones).

    Synthetic prompts need `vocab_size` (token ids are drawn from [3, vocab), past the usual special
    ids). `tokenize(text) -> list[int]`, when given, turns text prompts into token ids (in-process)."""
    rng = np.random.default_rng(config.seed)
    n = config.warmup + config.num_requests
    out_lens = config.output_len.sample(rng, n)
    requests = []
    if config.dataset is None:
        if not vocab_size:
            raise UserInputError("synthetic prompts are random token ids: give --vocab-size N or --tokenizer DIR "
                                 "(or --dataset FILE with text prompts)")
        low = 3 if vocab_size > 3 else 0
        in_lens = config.input_len.sample(rng, n)
        for i in range(n):
            prompt = rng.integers(low, vocab_size, int(in_lens[i])).tolist()
            requests.append(BenchRequest(i, prompt, len(prompt), int(out_lens[i])))
        return requests
    rows = _read_dataset(Path(config.dataset))
    for i in range(n):
        prompt, out = rows[i % len(rows)]
        if isinstance(prompt, str) and tokenize is not None:
            prompt = tokenize(prompt)
        tokens = len(prompt) if isinstance(prompt, list) else None
        requests.append(BenchRequest(i, prompt, tokens, int(out) if out else int(out_lens[i])))
    return requests


def length_stats(values) -> dict | None:
    """mean / min / max / median / std of token counts, or None when none are known."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return None
    return {"mean": float(a.mean()), "min": int(a.min()), "max": int(a.max()), "median": float(np.median(a)),
            "std": float(a.std())}
