"""Text for calibration and validation: disjoint calibration and held-out sentence sets."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from inferforge.errors import UserInputError

DEMO_SENTENCES = Path(__file__).parent / "assets" / "sentences.txt"


@dataclass(frozen=True)
class SentenceSplit:
    calibration: tuple[str, ...]
    held_out: tuple[str, ...]


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


def sha256_lines(lines: Iterable[str]) -> str:
    """sha256 of the sentences joined by newlines (UTF-8): the identity of a calibration or held-out set."""
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def sentence_record(split: SentenceSplit, *, calibration_source: str, held_out_source: str) -> dict:
    """What an artifact's manifest records about its data: the sources, counts and sha256 of each set."""
    return {"calibration_source": calibration_source, "calibration_sentences": len(split.calibration),
            "calibration_sha256": sha256_lines(split.calibration),
            "held_out_source": held_out_source, "held_out_sentences": len(split.held_out),
            "held_out_sha256": sha256_lines(split.held_out)}
