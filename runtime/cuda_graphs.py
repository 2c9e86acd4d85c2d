"""CUDA-graph decode: capture the pure-decode step once per batch-size bucket, then replay it.

Off by default (`LLMEngine.from_pretrained(..., cuda_graphs=True)` turns it on) until it has been
measured on a GPU: `python -m inferforge.bench.kernels.bench_decode_graphs`.

A decode step launches a few hundred small kernels (per layer: norms, projections, RoPE, append_kv,
decode attention, MLP); at batch 1 the launches, not the GPU, set the pace. A CUDA graph records
them once and replays them with one launch. A graph replays fixed shapes and fixed addresses, so:
- batch sizes are rounded up to buckets 1, 2, 4, 8, then multiples of 8 up to `max_num_seqs`
  (vLLM's scheme); one graph per bucket, all sharing one memory pool, captured largest first;
- inputs live in static buffers the step copies into: tokens, positions, slot_mapping, seq_lens,
  and block tables padded to a fixed width of ceil(max_context / block_size) blocks;
- padding rows have slot -1 (append_kv skips them: nothing is written) and seq_len 0 (decode
  attention returns zeros for them); their logits are computed and dropped. No cache block has to
  be set aside for padding.

Host values fixed at capture: `paged_decode_attention` picks its number of splits (`_num_splits`)
from the block tables' width (a host-side shape), so with the fixed width it is constant per bucket
(the splits divide each sequence's real length inside the kernel, so splits past it do no work);
its value checks read `seq_lens` on the host only on CPU, and `append_kv`'s slot check likewise, so
the captured CUDA path has no host sync. The dense model's forward has no data-dependent host
values (`h[logits_rows]` gathers on the device). Quantized layers have not been checked for host
syncs; a sync inside capture fails the capture with CUDA's error.

`mode="eager"` runs the same padded static buffers through the model without capturing: the CPU
tests use it to check the padding against the normal engine.
"""

from __future__ import annotations

import logging

import torch

from inferforge.errors import UserInputError
from inferforge.runtime.llama import StepBatch

log = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to the first bucket >= max_num_seqs."""
    buckets, b = [], 1
    while True:
        buckets.append(b)
        if b >= max_num_seqs:
            return buckets
        b = b * 2 if b < 8 else b + 8


class DecodeGraphRunner:
    """Static buffers and one captured graph per bucket for an engine's pure-decode steps."""

    def __init__(self, engine, *, mode: str = "graph"):
        if mode not in ("graph", "eager"):
            raise ValueError(f"mode must be 'graph' or 'eager', got {mode!r}")
        model, cache = engine.model, engine.cache
        if mode == "graph" and model.device.type != "cuda":
            raise UserInputError(f"CUDA graphs need a CUDA GPU; this model is on {model.device}")
        self.model, self.cache, self.mode = model, cache, mode
        self.buckets = decode_buckets(engine.max_num_seqs)
        self.width = -(-engine.max_context // cache.block_size)
        largest, device = self.buckets[-1], model.device
        self.tokens = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(largest, self.width, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.rows = torch.arange(largest, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.runs = 0           # decode steps this runner ran (replayed, or eager)
        if mode == "graph":
            self._capture_all()

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def can_run(self, num_decode: int) -> bool:
        """A pure-decode batch of this size fits a bucket, and nothing observes the step (calibration)."""
        return num_decode <= self.buckets[-1] and self.model.kv_observer is None

    def _forward(self, bucket: int) -> torch.Tensor:
        batch = StepBatch(tokens=self.tokens[:bucket], positions=self.positions[:bucket],
                          slot_mapping=self.slot_mapping[:bucket], num_decode=bucket,
                          decode_block_tables=self.block_tables[:bucket], decode_seq_lens=self.seq_lens[:bucket],
                          logits_rows=self.rows[:bucket])
        return self.model.forward(batch, self.cache)

    def _pad(self, start: int, bucket: int) -> None:
        """Rows start..bucket become padding: no write (slot -1), no keys (seq_len 0)."""
        self.tokens[start:bucket].zero_()
        self.positions[start:bucket].zero_()
        self.slot_mapping[start:bucket].fill_(-1)
        self.seq_lens[start:bucket].zero_()

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Logits `[num_decode, vocab]` for a pure-decode `batch` (as the engine builds it)."""
        n = batch.num_decode
        bucket = self.bucket_for(n)
        width = batch.decode_block_tables.shape[1]
        if width > self.width:
            raise RuntimeError(f"a block table of {width} blocks is wider than the runner's {self.width}")
        self.tokens[:n].copy_(batch.tokens)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        # Entries past a table's end are never read (seq_lens bound the reads); stale ones may stay.
        self.block_tables[:n, :width].copy_(batch.decode_block_tables)
        self.seq_lens[:n].copy_(batch.decode_seq_lens)
        self._pad(n, bucket)
        self.runs += 1
        if self.mode == "graph":
            self.graphs[bucket].replay()
            logits = self.outputs[bucket]
        else:
            logits = self._forward(bucket)
        return logits[:n].clone()      # the static output is overwritten by the next replay

    def _capture_all(self) -> None:
        """Warm up (Triton compiles and autotunes outside capture) and capture every bucket, largest
        first, into one shared memory pool."""
        pool = None
        with torch.no_grad():
            for bucket in reversed(self.buckets):
                self._pad(0, bucket)        # all padding: the warm-up and capture write nothing to the cache
                side = torch.cuda.Stream(self.model.device)
                side.wait_stream(torch.cuda.current_stream(self.model.device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._forward(bucket)
                torch.cuda.current_stream(self.model.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bucket] = self._forward(bucket)
                pool = graph.pool()
                self.graphs[bucket] = graph
        torch.cuda.synchronize(self.model.device)
        log.info("captured decode CUDA graphs for batch buckets %s (block tables %d blocks wide)", self.buckets,
                 self.width)
