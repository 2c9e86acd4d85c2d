"""Text for calibration and validation: disjoint calibration and held-out sets, in length buckets.

Real embedding traffic mixes one-word queries, ordinary sentences and long passages, and int8 error
depends on length: a 3-token query averages over few tokens, a long passage stretches activation
ranges. So both sets hold three buckets, built deterministically from the same text:

- `short`: the first 1, 2 or 3 words of the sentences (cycling), punctuation stripped;
- `ordinary`: the sentences as they are;
- `long`: consecutive sentences joined until the passage reaches 75-100% of the model's maximum
  sequence length in tokens (five targets, cycling; the first passage reaches the limit and is cut
  there, as every longer input is).

Calibration texts come only from the calibration sentences, held-out texts only from the held-out
sentences, and a held-out short query that also occurs in calibration is skipped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from inferforge.errors import UserInputError

DEMO_SENTENCES = Path(__file__).parent / "assets" / "sentences.txt"
BUCKETS = ("short", "ordinary", "long")
EXTRA_BUCKET = "extra"   # held-out texts of a second distribution (`DataConfig.extra_sentences`)
SHORT_SHARE = 4     # short queries: one per SHORT_SHARE sentences of the set
LONG_SHARE = 8      # long passages: one per LONG_SHARE sentences of the set
_LONG_TARGETS = (1.0, 0.75, 0.8125, 0.875, 0.9375)   # of the maximum length, cycling over passages


@dataclass(frozen=True)
class SentenceSplit:
    """Calibration and held-out texts; `held_out_buckets[i]` names the length bucket of `held_out[i]`
    (empty when the split has no buckets: then every text counts as `ordinary`)."""

    calibration: tuple[str, ...]
    held_out: tuple[str, ...]
    held_out_buckets: tuple[str, ...] = ()

    def buckets(self) -> dict[str, list[int]]:
        """Bucket name -> indices into `held_out`, in `BUCKETS` order, empty buckets left out."""
        labels = self.held_out_buckets or ("ordinary",) * len(self.held_out)
        out = {b: [i for i, label in enumerate(labels) if label == b] for b in (*BUCKETS, EXTRA_BUCKET)}
        return {b: idx for b, idx in out.items() if idx}


def read_sentences(source: str = "demo") -> list[str]:
    """Non-empty, de-duplicated lines of a text file (or the shipped demo sentences), order kept."""
    path = DEMO_SENTENCES if source == "demo" else Path(source)
    if not path.is_file():
        raise UserInputError(f"sentence file not found: {path}")
    seen, out = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s and not s.startswith("#") and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def split_sentences(source: str, calibration_size: int, held_out_size: int) -> SentenceSplit:
    """The first `calibration_size` sentences calibrate, the next `held_out_size` validate; never overlapping."""
    sentences = read_sentences(source)
    need = calibration_size + held_out_size
    if len(sentences) < need:
        raise UserInputError(
            f"{source}: {len(sentences)} distinct sentences, but calibration_size + held_out_size = {need}; "
            "lower the sizes in the recipe's data section or give more text")
    calibration = tuple(sentences[:calibration_size])
    held_out = tuple(sentences[calibration_size:need])
    assert not set(calibration) & set(held_out)
    return SentenceSplit(calibration, held_out)


def split_extra(source: str, calibration_size: int, held_out_size: int, *,
                exclude: Iterable[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A second distribution's (calibration, held-out) texts: of the distinct lines of `source` not
    in `exclude` (the first split's texts), the first `calibration_size` and the next `held_out_size`."""
    excluded = set(exclude)
    texts = [t for t in read_sentences(source) if t not in excluded]
    need = calibration_size + held_out_size
    if len(texts) < need:
        raise UserInputError(f"{source}: {len(texts)} distinct new texts, but extra_calibration_size + "
                             f"extra_held_out_size = {need}; give more text or lower the sizes")
    return tuple(texts[:calibration_size]), tuple(texts[calibration_size:need])


def with_extra_held_out(split: SentenceSplit, held_out: Sequence[str]) -> SentenceSplit:
    """`split` with `held_out` appended as the bucket `extra` (texts also in calibration skipped)."""
    labels = split.held_out_buckets or ("ordinary",) * len(split.held_out)
    seen = set(split.calibration) | set(split.held_out)
    extra = [t for t in dict.fromkeys(held_out) if t not in seen]
    return replace(split, held_out=(*split.held_out, *extra), held_out_buckets=(*labels, *(EXTRA_BUCKET,) * len(extra)))


def sha256_lines(lines: Iterable[str]) -> str:
    """sha256 of the sentences joined by newlines (UTF-8): the identity of a calibration or held-out set."""
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def sentence_record(split: SentenceSplit, *, calibration_source: str, held_out_source: str) -> dict:
    """What an artifact's manifest records about its data: the sources, counts and sha256 of each set."""
    return {"calibration_source": calibration_source, "calibration_sentences": len(split.calibration),
            "calibration_sha256": sha256_lines(split.calibration),
            "held_out_source": held_out_source, "held_out_sentences": len(split.held_out),
            "held_out_sha256": sha256_lines(split.held_out)}


_EDGE_PUNCTUATION = "\"'`()[]{}.,;:!?-*"


def short_queries(sentences: Sequence[str], count: int, *, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Up to `count` distinct queries of 1-3 words: sentence i gives its first (i % 3) + 1 words."""
    out, seen = [], set(exclude)
    for i, sentence in enumerate(sentences):
        words = [w.strip(_EDGE_PUNCTUATION) for w in sentence.split()]
        words = [w for w in words if re.search(r"\w", w)]
        query = " ".join(words[:i % 3 + 1])
        if query and query not in seen:
            seen.add(query)
            out.append(query)
            if len(out) == count:
                break
    return out


def long_passages(sentences: Sequence[str], count: int, *, count_tokens: Callable[[str], int],
                  max_tokens: int) -> list[str]:
    """`count` passages of consecutive sentences, each grown until it holds at least its target
    share (`_LONG_TARGETS`, cycling) of `max_tokens` tokens, or every sentence once."""
    out = []
    n = len(sentences)
    for i in range(count):
        start, target = i * n // count, _LONG_TARGETS[i % len(_LONG_TARGETS)] * max_tokens
        parts = []
        for k in range(n):
            parts.append(sentences[(start + k) % n])
            if count_tokens(" ".join(parts)) >= target:
                break
        out.append(" ".join(parts))
    return list(dict.fromkeys(out))


def with_length_buckets(split: SentenceSplit, *, count_tokens: Callable[[str], int], max_tokens: int) -> SentenceSplit:
    """`split` with short queries and long passages added to both sets (see the module docstring).

    `count_tokens(text)` is the tokenizer's length of `text` with special tokens; `max_tokens` the
    model's maximum sequence length. The held-out texts are ordered short, ordinary, long.
    """
    def extra(sentences, exclude=frozenset()):
        short = short_queries(sentences, max(1, len(sentences) // SHORT_SHARE), exclude=exclude)
        long = long_passages(sentences, max(1, len(sentences) // LONG_SHARE), count_tokens=count_tokens,
                             max_tokens=max_tokens)
        return short, long

    cal_short, cal_long = extra(split.calibration, exclude=frozenset(split.held_out))
    calibration = (*split.calibration, *cal_short, *cal_long)
    held_short, held_long = extra(split.held_out, exclude=frozenset(calibration))
    held_long = [p for p in held_long if p not in set(calibration)]
    held_out = (*held_short, *split.held_out, *held_long)
    labels = ("short",) * len(held_short) + ("ordinary",) * len(split.held_out) + ("long",) * len(held_long)
    assert not set(calibration) & set(held_out)
    return replace(split, calibration=calibration, held_out=held_out, held_out_buckets=labels)


def bucketed(split: SentenceSplit, tokenizer, max_length: int) -> SentenceSplit:
    """`with_length_buckets` with a Hugging Face tokenizer counting the tokens (special tokens included)."""
    def count_tokens(text: str) -> int:
        return len(tokenizer(text, truncation=False)["input_ids"])

    return with_length_buckets(split, count_tokens=count_tokens, max_tokens=max_length)
