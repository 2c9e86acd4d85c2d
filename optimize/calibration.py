"""Calibration data from local files, and observers that turn activations into ranges.

`load_token_batches(path, tokenizer, num_samples, seq_len)` reads a .txt file (one document per
line) or a .jsonl file (a "text" field per line), tokenizes, concatenates with EOS between
documents, and cuts `num_samples` sequences of `seq_len` tokens: `[1, seq_len]` int64 batches.

Observers reduce the |x| values a channel saw to the range its quantization should cover:
- `minmax`: the largest |x| (no clipping);
- `percentile`: the given percentile of |x| (clips rare outliers);
- `mse`: the clip that minimizes the int8 round-trip mean squared error of the observed values.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from inferforge.errors import UserInputError

OBSERVERS = ("minmax", "percentile", "mse")
TEXT_SUFFIXES = (".txt", ".jsonl")


def check_text_file(path: str | Path, *, flag: str | None = None) -> None:
    """Refuse, in one line, what `read_texts` cannot read: a directory, a missing file, a file that is
    neither .txt nor .jsonl. Cheap: a command checks its text files with it before any work."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise UserInputError(f"{where}: is a directory; give a text file in it (.txt, one passage per line, or "
                             ".jsonl)")
    if not path.is_file():
        raise UserInputError(f"{where}: no such file" if flag else f"calibration file not found: {path}")
    if path.suffix.lower() not in TEXT_SUFFIXES:
        kind = f"'{path.suffix}'" if path.suffix else "without an extension"
        raise UserInputError(f"{where}: a file {kind} is not read; give a .txt file (one passage per line) or a "
                             ".jsonl file (a \"text\" field per line)")


def read_texts(path: str | Path, *, flag: str | None = None) -> list[str]:
    """Non-empty lines of a .txt file, or the "text" fields of a .jsonl file; other files are refused.
    Errors name `flag` (e.g. "--data") when given."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    check_text_file(path, flag=flag)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserInputError(f"{where}: not UTF-8 text") from None
    texts = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(f"{where}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserInputError(f"{where}, line {number}: expected an object with a \"text\" string")
            texts.append(record["text"])
        else:
            texts.append(line)
    if not texts:
        raise UserInputError(f"{where}: no text (empty file)")
    return texts


def load_token_batches(path, tokenizer, *, num_samples: int = 32, seq_len: int = 256, progress=None,
                       too_short_hint: str | None = None) -> list[torch.Tensor]:
    """`num_samples` batches `[1, seq_len]` of consecutive tokens from the file's documents.
    `too_short_hint` replaces the end of the message for a file with too little text (what was asked
    for and the fix, in the caller's terms)."""
    if num_samples < 1 or seq_len < 2:
        raise UserInputError("num_samples must be >= 1 and seq_len >= 2")
    texts = read_texts(path)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    task = progress.task("tokenizing calibration text", total=len(texts)) if progress else None
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
        if task:
            task.advance()
        if len(stream) >= num_samples * seq_len:
            break
    if task:
        task.close()
    available = len(stream) // seq_len
    if available < num_samples:
        hint = too_short_hint or f"{num_samples} were asked for: give more text or lower num_samples / seq_len"
        raise UserInputError(f"{path}: {len(stream)} tokens make {available} sequences of {seq_len}; {hint}")
    return [torch.tensor(stream[i * seq_len:(i + 1) * seq_len]).unsqueeze(0) for i in range(num_samples)]


def observe_range(values: torch.Tensor, observer: str = "minmax", percentile: float = 99.99) -> torch.Tensor:
    """Per channel (last dimension), the |x| range to quantize for: values [..., channels]."""
    if observer not in OBSERVERS:
        raise UserInputError(f"observer {observer!r}: choose one of {', '.join(OBSERVERS)}")
    a = values.detach().abs().reshape(-1, values.shape[-1]).float()
    if observer == "minmax":
        return a.amax(dim=0)
    if observer == "percentile":
        return torch.quantile(a, percentile / 100, dim=0) if a.shape[0] <= 2**24 else a.amax(dim=0)
    # mse: try clips from 30% to 100% of the max and keep, per channel, the one with the least error.
    top = a.amax(dim=0).clamp(min=1e-12)
    best, best_err = top.clone(), torch.full_like(top, float("inf"))
    for ratio in torch.linspace(0.3, 1.0, 15):
        clip = top * ratio
        scale = clip / 127
        err = ((torch.round(a.clamp(max=clip) / scale).clamp(-127, 127) * scale - a) ** 2).mean(dim=0)
        better = err < best_err
        best, best_err = torch.where(better, clip, best), torch.where(better, err, best_err)
    return best
