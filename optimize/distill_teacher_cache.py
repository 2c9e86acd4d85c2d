"""The teacher's outputs on every training text, computed once before training (encoders).

The teacher is frozen and deterministic (eval mode, no dropout), so what it says about a text does
not change between epochs: running it once per text, in batches of similar lengths, replaces a
teacher forward pass in every training step. Kept per text: the attention-masked mean-pooled
embedding (float32) and, when the hidden-state loss is on, the token states of the teacher layers
the student learns (float16, only the text's own tokens). A step then reads its batch's targets
and pads them to the batch's length.

Memory: 4 bytes x texts x hidden for the embeddings, 2 bytes x tokens x layers x hidden for the
token states, e.g. 6,300 texts of 25 tokens, 3 layers of 384: 10 MB and 360 MB. Decoders' targets are logits over the vocabulary, far too large
to keep, so they are not cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from inferforge.optimize.distill_losses import masked_mean_pool

CACHE_BATCH = 64


class TeacherCache:
    """`targets(indices, longest)` -> {"pooled": [b, h], "hidden": [b, longest, h] per learned layer}."""

    def __init__(self, pooled: torch.Tensor, hidden: list | None):
        self.pooled, self.hidden = pooled, hidden

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: torch.nn.Module, token_ids: Sequence[Sequence[int]], pad: int, device, autocast,
              layers: Sequence[int] | None = None, on_batch=None) -> TeacherCache:
        """Run `teacher` over `token_ids` (longest first, in batches of `CACHE_BATCH`); `layers`: the teacher
        layer indices (from 0) whose outputs to keep, or None for the pooled embedding only."""
        from inferforge.optimize.distill_data import collate

        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        pooled, hidden = None, ([None] * len(token_ids) if layers else None)
        for start in range(0, len(order), CACHE_BATCH):
            idx = order[start:start + CACHE_BATCH]
            ids, mask = collate([token_ids[i] for i in idx], pad)
            ids, mask = ids.to(device), mask.to(device)
            with autocast():
                out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=bool(layers))
            batch_pooled = masked_mean_pool(out.last_hidden_state.float(), mask).cpu()
            if pooled is None:
                pooled = torch.empty(len(token_ids), batch_pooled.shape[-1])
            pooled[idx] = batch_pooled
            if layers:
                stacked = torch.stack([out.hidden_states[j + 1] for j in layers], dim=1).half().cpu()   # [b, k, s, h]
                for row, i in enumerate(idx):
                    hidden[i] = stacked[row, :, :len(token_ids[i])].clone()
            if on_batch is not None:
                on_batch(len(idx))
        return cls(pooled, hidden)

    def targets(self, indices: Sequence[int], longest: int) -> dict:
        out = {"pooled": self.pooled[list(indices)]}
        if self.hidden is not None:
            k, _, h = self.hidden[indices[0]].shape
            padded = torch.zeros(len(indices), k, longest, h)
            for row, i in enumerate(indices):
                states = self.hidden[i]
                padded[row, :, :states.shape[1]] = states.float()
            out["hidden"] = list(padded.unbind(dim=1))
        return out
