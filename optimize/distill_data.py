"""Distillation data: texts from local files, a seeded held-out split, and a batch order that is a
pure function of (seed, epoch, step), so a resumed run reads exactly the batches an uninterrupted
run would have read.

Texts: the non-empty lines of .txt files, or the "text" fields of .jsonl files, in file order,
de-duplicated. `held_out_share` of them, drawn with `seed`, are held out; training never sees them,
nor the `exclude` texts (a later validation step's held-out set).

Order: epoch e visits the training texts in `permutation(seed, e)`; step s of a run with B texts per
step reads positions [p * B, (p + 1) * B) of epoch s // steps_per_epoch, p = s % steps_per_epoch (a
last partial batch of an epoch is dropped). With `lengths` given (grouping by length), the epoch's
batches are then rearranged so each holds texts of similar length: the permutation is cut into
groups of `GROUP_BATCHES` batches, each group sorted by length and cut into batches, and the
batches of the epoch shuffled (seeded). Every text is still visited once per epoch, in a random
context, and a batch pads to far fewer tokens (short fortunes no longer wait on long sentences).
Under DDP, rank r of W takes every W-th of those texts
(r, r + W, ...), so the ranks together read the same batch as a single process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inferforge.errors import UserInputError

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512


@dataclass(frozen=True)
class DistillData:
    files: tuple[dict, ...]          # {"path" (absolute), "sha256", "texts"} per file
    train: tuple[str, ...]
    held_out: tuple[str, ...]
    excluded: int                    # texts dropped because `exclude` holds them
    length_mix: dict | None = None   # {"short_queries", "long_passages"} added to `train` (see `with_length_mix`)

    def record(self) -> dict:
        """For the manifest: the files with their hashes and the split's sizes."""
        from inferforge.data import sha256_lines

        record = {"files": list(self.files), "train_texts": len(self.train), "held_out_texts": len(self.held_out),
                  "held_out_sha256": sha256_lines(self.held_out), "excluded_texts": self.excluded}
        if self.length_mix is not None:
            record["length_mix"] = dict(self.length_mix)
        return record


def load_distill_data(paths: Sequence[str | Path], *, held_out_share: float, seed: int,
                      exclude: Iterable[str] = ()) -> DistillData:
    """Read, de-duplicate and split the texts; raises UserInputError naming --data for bad files."""
    from inferforge.fileio import sha256_file
    from inferforge.optimize.calibration import read_texts

    if not paths:
        raise UserInputError("no training text: give --data FILE (.txt, one passage per line, or .jsonl)")
    texts, files = [], []
    for path in paths:
        read = read_texts(path, flag="--data")
        files.append({"path": str(Path(path).resolve()), "sha256": sha256_file(path), "texts": len(read)})
        texts.extend(read)
    banned = set(exclude)
    distinct = list(dict.fromkeys(texts))
    kept = [t for t in distinct if t not in banned]
    if len(kept) < 2:
        raise UserInputError(f"--data: {len(kept)} distinct text(s) left after removing the validation texts; "
                             "distillation needs at least 2 (some to train on, some held out): give more text")
    order = np.random.default_rng(seed).permutation(len(kept))
    n_held = min(max(1, round(len(kept) * held_out_share)), len(kept) - 1)
    held = sorted(order[:n_held].tolist())
    held_set = set(held)
    return DistillData(files=tuple(files), train=tuple(t for i, t in enumerate(kept) if i not in held_set),
                       held_out=tuple(kept[i] for i in held), excluded=len(distinct) - len(kept))


# length_mix: one short query per SHORT_EVERY training texts, one long passage per LONG_EVERY. Long
# passages are few because each costs about eight ordinary texts' tokens and more attention.
SHORT_EVERY, LONG_EVERY = 4, 32


def with_length_mix(data: DistillData, *, count_tokens, max_tokens: int, exclude: Iterable[str] = ()) -> DistillData:
    """`data` with short queries (the first 1-3 words of training texts) and long passages (consecutive
    training texts joined until they hold at least 75% of `max_tokens` tokens; tokenizing cuts them at
    `max_tokens`) added to the training texts, the kinds of input an encoder recipe's validate step
    holds in its "short" and "long" buckets (`inferforge.data`), made from the training texts only.
    The held-out split stays as it was; none of the added texts is a training, held-out or `exclude`
    text (a "passage" that is one training text already is dropped, so when single texts reach 75% of
    `max_tokens` few or no passages are added; the count is in `length_mix` and logged).
    `count_tokens(text)`: the tokenizer's length with special tokens. `train_texts` in `record()`
    then counts the added texts too."""
    from dataclasses import replace

    from inferforge.data import long_passages, short_queries

    banned = set(data.held_out) | set(exclude) | set(data.train)
    short = short_queries(data.train, max(1, len(data.train) // SHORT_EVERY), exclude=frozenset(banned))
    banned.update(short)
    long = [p for p in long_passages(data.train, max(1, len(data.train) // LONG_EVERY), count_tokens=count_tokens,
                                     max_tokens=max_tokens) if p not in banned]
    if not long:
        log.warning("length_mix: no long passage added: single training texts already reach 75%% of max_length "
                    "(%d tokens); a larger max_length makes room for passages", max_tokens)
    return replace(data, train=(*data.train, *short, *long),
                   length_mix={"short_queries": len(short), "long_passages": len(long), "max_tokens": max_tokens})


GROUP_BATCHES = 50


def epoch_order(seed: int, epoch: int, n: int, *, lengths: Sequence[int] | None = None,
                batch_size: int = 1) -> np.ndarray:
    """The order in which epoch `epoch` visits `n` training texts: a pure function of its arguments.
    With `lengths` (tokens per text), consecutive `batch_size` slices hold texts of similar length."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if lengths is None or batch_size <= 1:
        return order
    used = (n // batch_size) * batch_size
    group = batch_size * GROUP_BATCHES
    batches = []
    for start in range(0, used, group):
        chunk = order[start:min(start + group, used)]
        chunk = chunk[np.argsort([lengths[i] for i in chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffled = [batches[i] for i in rng.permutation(len(batches))]
    return np.concatenate(shuffled + [order[used:]])


def steps_per_epoch(n: int, batch_size: int) -> int:
    if batch_size > n:
        raise UserInputError(f"--batch-size {batch_size} is larger than the {n} training texts; lower it or give "
                             "more --data")
    return n // batch_size


def step_indices(step: int, *, seed: int, n: int, batch_size: int,
                 lengths: Sequence[int] | None = None) -> tuple[int, int, np.ndarray]:
    """(epoch, position in the epoch, the texts' indices) for optimizer step `step` (from 0);
    `lengths`: group each batch's texts by length (see `epoch_order`)."""
    epoch, position = divmod(step, steps_per_epoch(n, batch_size))
    order = epoch_order(seed, epoch, n, lengths=lengths, batch_size=batch_size)
    return epoch, position, order[position * batch_size:(position + 1) * batch_size]


def rank_share(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    return indices[rank::world]


def position_limit(teacher_config) -> int | None:
    """The most tokens the teacher's position embeddings take (RoBERTa-style models offset theirs by
    the padding id + 1), or None when the configuration has no such limit."""
    positions = getattr(teacher_config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    if teacher_config.model_type in ("roberta", "xlm-roberta"):
        positions -= (teacher_config.pad_token_id or 0) + 1
    return positions


def resolve_max_length(requested: int | None, teacher_path, teacher_config) -> int:
    """`requested` (refused above the teacher's positions), or min(the teacher's limit, 512, positions)."""
    from inferforge.models import source_max_length

    positions = position_limit(teacher_config)
    if requested is not None:
        if positions is not None and requested > positions:
            raise UserInputError(f"--max-length {requested}: the teacher takes at most {positions} tokens "
                                 f"(max_position_embeddings); give --max-length {positions} or less")
        return requested
    try:
        model_limit = source_max_length(teacher_path)[0]
    except UserInputError:
        model_limit = DEFAULT_MAX_LENGTH
    return min(model_limit, DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)


def tokenize_all(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (special tokens added, cut at `max_length`)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask`, int64 [batch, longest]."""
    longest = max(len(t) for t in token_ids)
    ids = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
    for row, tokens in enumerate(token_ids):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, :len(tokens)] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0
