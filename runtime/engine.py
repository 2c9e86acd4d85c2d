"""`LLMEngine`: continuous batching with chunked prefill over a paged KV cache.

Each `step()` builds one flat batch: every running sequence past its prompt contributes its last
token (decode), then prompts contribute chunks until the step's token budget is used (chunked
prefill), so a long prompt never stalls the running decodes for more than one budget's worth of
work. Requests join when there is room (sequences and cache blocks) and leave when they finish,
between steps. Prompts that start with whole blocks another sequence has already computed reuse
those blocks (prefix sharing) and skip their prefill.

Context window: by default a request whose prompt plus `max_new_tokens` exceeds the model's
context (or the engine's `max_context`), or what the KV cache can hold, is refused with the
numbers; `truncate="left"` keeps the most recent prompt tokens that fit instead.
`sliding_window=W` (with `sink_tokens=S`) runs an endless stream in a fixed cache, as in
StreamingLLM: the sequence keeps its first S tokens (the attention sinks, whole blocks) and its
most recent tokens (between W/2 and W); when blocks have to go, the oldest half of the window is
evicted and the keys after it are re-rotated to their new, earlier positions, so positions are
positions in the cache and never run past the model's window.

Online serving drives the same loop one request at a time: `add_request(id, prompt, ...)` queues a
request under an id the caller chooses, `step()` advances every request by one step, `finished`
says which requests ended in that step and why, `abort(id)` drops a request and frees its blocks.
`runtime/async_engine.py` runs this loop in a background thread for many concurrent clients.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inferforge.errors import UserInputError
from inferforge.kernels import PagedKVCache
from inferforge.runtime.cpu_linear import check_cpu_packed_linears, pack_dense_linears_if_asked
from inferforge.runtime.llama import LlamaModel, StepBatch, shift_cached_keys
from inferforge.runtime.llama_quantized import call_cpu_kernels_directly

_log = logging.getLogger(__name__)


class ContextWindowExceeded(UserInputError):
    """A request does not fit the model's context window or the KV cache. `cli_message` says the
    same with the command line's flags (`inferforge generate`) instead of Python arguments."""

    def __init__(self, message: str, *, cli_message: str | None = None):
        super().__init__(message)
        self.cli_message = cli_message or message


@dataclass
class _Request:
    index: int
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stop: frozenset
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    prefilled: int = 0            # prompt tokens whose K/V are in the cache
    finished: bool = False
    finish_reason: str | None = None          # "stop" (a stop token) or "length" (max_new_tokens)
    sliding: tuple[int, int] | None = None   # (sink blocks, most blocks held) with a sliding window

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < len(self.prompt)


def sample(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> int:
    """One token from float32 logits [vocab]: greedy at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.double() / temperature     # float64: a tiny temperature must not overflow to inf
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class LLMEngine:
    """Generation engine for Llama-family checkpoints on the toolkit's kernels."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, *, max_num_seqs: int = 8, max_context: int | None = None,
                 max_step_tokens: int = 256):
        if max_num_seqs < 1 or max_step_tokens < 1:
            raise UserInputError("max_num_seqs and max_step_tokens must be >= 1")
        self.model, self.cache = model, cache
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        window = model.spec.max_position_embeddings
        self.max_context = min(max_context or window, window)
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self.steps = 0
        self.finished: dict[int, str] = {}   # after each step: request id -> "stop" or "length"
        self.kv_plan = None     # from_pretrained: how the KV cache was sized (runtime/kv_budget.py KVPlan)
        self.cpu_linears = None  # from_pretrained: how dense CPU projections run (runtime/cpu_linear.py)
        self._graphs = None     # a runtime/cuda_graphs.py DecodeGraphRunner when enabled

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None, device=None,
                        kv_cache_dtype: str | torch.dtype | None = None, max_num_seqs: int = 8,
                        max_context: int | None = None, block_size: int = 16, num_blocks: int | None = None,
                        max_step_tokens: int = 256, kv_scales: tuple | None = None,
                        memory_budget: str | int | None = None, memory_utilization: float | None = None,
                        cuda_graphs: bool = False, cpu_packed_linears: bool | str | None = None) -> LLMEngine:
        """Load a Hugging Face Llama / Mistral / Qwen2 directory (config.json + safetensors).

        KV-cache size (see `runtime/kv_budget.py`): `num_blocks` blocks of `block_size` tokens when
        given; otherwise what fits in the memory budget after the weights and the activation peak of
        a `max_step_tokens` step, and never more than `max_num_seqs` sequences of `max_context`
        tokens need. The budget is `memory_budget` ("4GiB" or bytes: weights + activations + KV),
        or `memory_utilization` (a fraction of the device's memory, as vLLM's gpu_memory_utilization),
        or by default 0.9 of the GPU / half of MemAvailable on CPU with at most 1 GiB of KV cache.
        `max_context` defaults to the model's window, lowered to what one sequence can hold when the
        budget is smaller; a `max_context` you give that does not fit raises UserInputError. The
        choice is logged and kept in `engine.kv_plan`.
        `kv_cache_dtype` "fp8" works with unit scales (e4m3 is a float format); "int8" needs
        calibrated per-layer, per-KV-head scales: `kv_scales=(k_scales, v_scales)`, each
        `[num_layers, n_kv_heads]`. `cuda_graphs=True` (CUDA only, off by default and not yet
        measured) replays captured decode steps: see `runtime/cuda_graphs.py`.
        `cpu_packed_linears` picks how dense float projections run on the CPU (`runtime/cpu_linear.py`).
        The default (None) times the layouts on the model's own weights at load (well under a second
        for 1 GB of weights) and keeps the fastest: `F.linear` on the dense weights; the dense weights
        plus a packed copy for steps of more than three rows (MKL's for max_num_seqs 4-16 in float32
        where it timed faster, else oneDNN's: twice the memory of those weights, counted in the KV
        budget); or oneDNN's layout alone for every step (no extra memory but a tied LM head's copy).
        `engine.cpu_linears` says which, with the timings. False keeps `F.linear`, True the dense
        weights and a copy, "onednn" oneDNN's layout; on a GPU leave it unset."""
        from inferforge.kernels.kv_cache import CACHE_DTYPES
        from inferforge.runtime import kv_budget

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cuda_graphs and device.type != "cuda":
            raise UserInputError(f"cuda_graphs=True needs a CUDA GPU; the engine runs on {device}: leave cuda_graphs "
                                 "off there")
        if kv_cache_dtype in ("int8", torch.int8) and kv_scales is None:
            raise UserInputError("an int8 KV cache needs calibrated scales: pass kv_scales=(k_scales, v_scales), "
                                 "each [num_layers, n_kv_heads], or use kv_cache_dtype='fp8'")
        for name, value in (("max_num_seqs", max_num_seqs), ("max_step_tokens", max_step_tokens),
                            ("block_size", block_size), ("max_context", max_context), ("num_blocks", num_blocks)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserInputError(f"{name} must be a whole number >= 1, got {value!r}")
        budget = kv_budget.check_memory_options(memory_budget, memory_utilization)
        before = kv_budget.device_memory_before_load(device) if num_blocks is None else None
        check_cpu_packed_linears(cpu_packed_linears)
        if cpu_packed_linears is not None and device.type != "cpu":
            raise UserInputError(f"cpu_packed_linears={cpu_packed_linears!r} (--cpu-linears) sets how float weights "
                                 f"run on a CPU; the engine runs on {device.type}: leave it unset (auto)")
        model = LlamaModel.load(path, dtype=dtype, device=device)
        cpu_linears = pack_dense_linears_if_asked(model, cpu_packed_linears, max_num_seqs)
        call_cpu_kernels_directly(model)
        spec = model.spec
        window = spec.max_position_embeddings
        context = min(max_context or window, window)
        cache_dtype = kv_cache_dtype or model.dtype
        if isinstance(cache_dtype, str):
            cache_dtype = CACHE_DTYPES.get(cache_dtype, cache_dtype)
        plan = kv_budget.plan_engine_cache(model, before, budget=budget, utilization=memory_utilization,
                                           num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                                           max_context=context, context_given=max_context is not None,
                                           max_step_tokens=max_step_tokens, cache_dtype=cache_dtype)
        context = plan.max_context
        _log.info(plan.describe())
        k_scales, v_scales = kv_scales or (None, None)
        cache = PagedKVCache(num_layers=spec.num_layers, num_blocks=plan.num_blocks, n_kv_heads=spec.n_kv_heads,
                             head_dim=spec.head_dim, block_size=block_size, dtype=cache_dtype,
                             device=device, k_scales=k_scales, v_scales=v_scales)
        engine = cls(model, cache, max_num_seqs=max_num_seqs, max_context=context, max_step_tokens=max_step_tokens)
        engine.kv_plan = plan
        engine.cpu_linears = cpu_linears
        if cuda_graphs:
            from inferforge.runtime.cuda_graphs import DecodeGraphRunner

            engine._graphs = DecodeGraphRunner(engine, mode="graph")
        return engine

    # ------------------------------------------------------------------ requests
    def _fit(self, prompt: list[int], max_new_tokens: int, truncate: str | None) -> list[int]:
        capacity = self.cache.num_blocks * self.cache.block_size
        limit = min(self.max_context, capacity)
        total = len(prompt) + max_new_tokens
        if total <= limit:
            return prompt
        what = (f"the model's context window ({self.max_context} tokens)" if limit == self.max_context
                else f"what the KV cache can hold ({capacity} tokens in {self.cache.num_blocks} blocks)")
        if truncate == "left" and max_new_tokens < limit:
            return prompt[len(prompt) - (limit - max_new_tokens):]
        problem = f"prompt ({len(prompt)} tokens) + {{}} ({max_new_tokens}) = {total} exceeds {what}"
        raise ContextWindowExceeded(
            problem.format("max_new_tokens") + "; shorten the prompt, lower max_new_tokens, or pass truncate='left' "
            "to keep the most recent tokens",
            cli_message=problem.format("--max-new-tokens") + "; shorten --prompt, lower --max-new-tokens, or pass "
            "--truncate-left to keep the most recent tokens")

    def _sliding_plan(self, sliding_window: int | None, sink_tokens: int) -> tuple[int, int] | None:
        if sliding_window is None:
            return None
        if not isinstance(sliding_window, int) or sliding_window < 1 or sink_tokens < 0:
            raise UserInputError("sliding_window must be an int >= 1 and sink_tokens >= 0")
        if self.cache.quantized:
            raise UserInputError("sliding_window needs a float KV cache (keys are re-rotated in place); "
                                 f"this cache is {self.cache.dtype}")
        bs = self.cache.block_size
        sinks = -(-sink_tokens // bs)
        most = sinks + -(-sliding_window // bs) + 1          # one block of room for new tokens
        limit = min(self.max_context, self.cache.num_blocks * bs)
        if most * bs > limit:
            need = (f"need {most} blocks of {bs} tokens = {most * bs} tokens, more than the {limit} the model's window "
                    "and the KV cache allow")
            raise ContextWindowExceeded(
                f"sink_tokens ({sink_tokens}) + sliding_window ({sliding_window}) {need}",
                cli_message=f"--sink-tokens ({sink_tokens}) + --sliding-window ({sliding_window}) {need}; lower them")
        return sinks, most

    def _make_requests(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, truncate,
                       sliding_window=None, sink_tokens=4):
        if truncate not in (None, "left"):
            raise UserInputError(f"truncate must be None or 'left', got {truncate!r}")
        sliding = self._sliding_plan(sliding_window, sink_tokens)
        if sliding and truncate:
            raise UserInputError("choose one context policy: truncate='left' or sliding_window")
        if max_new_tokens < 1:
            raise UserInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise UserInputError(f"sampling needs temperature >= 0, top_k >= 1 and 0 < top_p <= 1; got temperature="
                                 f"{temperature}, top_k={top_k}, top_p={top_p}")
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, (list, tuple)) and p for p in prompts):
            raise UserInputError("prompts must be a list of non-empty token-id lists")
        vocab = self.model.spec.vocab_size
        stop = frozenset(self.model.spec.eos_token_ids if stop_token_ids is None else stop_token_ids)
        requests = []
        for i, prompt in enumerate(prompts):
            bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab)]
            if bad:
                raise UserInputError(f"prompt {i}: token ids must be ints in [0, {vocab}), got {bad[0]!r}")
            generator = None
            if temperature > 0:
                # Without a seed, draw one from the OS: never touch the user's global torch RNG.
                base = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 2
                generator = torch.Generator().manual_seed(base + i)
            fitted = list(prompt) if sliding else self._fit(list(prompt), max_new_tokens, truncate)
            requests.append(_Request(i, fitted, max_new_tokens, temperature, top_k, top_p, stop, generator,
                                     sliding=sliding))
        return requests

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_token_ids: Sequence[int] | None = None, truncate: str | None = None,
                 sliding_window: int | None = None, sink_tokens: int = 4) -> list[list[int]]:
        """Generate for every prompt (token-id lists); returns the generated token lists in order.

        Greedy at temperature 0; otherwise sampling with optional top-k / top-p, reproducible with
        `seed`. Generation stops at `max_new_tokens` or a stop token (default: the model's EOS),
        which is included in the output. Context policies: see the module docstring."""
        outputs = {}
        for index, token in self.stream(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, truncate=truncate,
                                        sliding_window=sliding_window, sink_tokens=sink_tokens):
            outputs.setdefault(index, []).append(token)
        return [outputs.get(i, []) for i in range(len(prompts))]

    def stream(self, prompts: Sequence[Sequence[int]], **kwargs) -> Iterator[tuple[int, int]]:
        """Like `generate`, but yields `(prompt_index, token)` as soon as each token is sampled."""
        params = dict(max_new_tokens=None, temperature=0.0, top_k=None, top_p=None, seed=None, stop_token_ids=None,
                      truncate=None, sliding_window=None, sink_tokens=4)
        unknown = set(kwargs) - set(params)
        if unknown:
            raise TypeError(f"unknown arguments: {', '.join(sorted(unknown))}")
        params.update(kwargs)
        if params["max_new_tokens"] is None:
            raise TypeError("max_new_tokens is required")
        if self._waiting or self._running:
            raise UserInputError("this engine is already generating (a stream is still open); finish or close it "
                                 "first, or pass all prompts in one call")
        self._waiting.extend(self._make_requests(prompts, **params))
        try:
            while self._waiting or self._running:
                yield from self.step()
        finally:
            for r in self._running:
                self.cache.free(r.index)
            self._running.clear()
            self._waiting.clear()

    # ------------------------------------------------------------------ online serving
    def add_request(self, request_id: int, prompt: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False) -> None:
        """Validate one request and queue it; `step()` runs it with the others.

        `request_id` is any int not in use by a waiting or running request; tokens come back from
        `step()` as `(request_id, token)`. Sampling and stop tokens as in `generate`; `ignore_eos`
        removes the model's EOS tokens from the stop set. Raises `ContextWindowExceeded` or
        `UserInputError` (nothing is queued then)."""
        if any(r.index == request_id for r in (*self._waiting, *self._running)):
            raise UserInputError(f"request id {request_id} is already in use")
        (request,) = self._make_requests([prompt], max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids,
                                         None)
        request.index = request_id
        if ignore_eos:
            request.stop = request.stop - frozenset(self.model.spec.eos_token_ids)
        self._waiting.append(request)

    def abort(self, request_id: int) -> bool:
        """Drop a waiting or running request and free its cache blocks; False if there is none."""
        for queue in (self._waiting, self._running):
            for r in queue:
                if r.index == request_id:
                    queue.remove(r)
                    if queue is self._running:
                        self.cache.free(r.index)
                    return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def stats(self) -> dict:
        """Requests running and waiting, and KV-cache blocks in use out of the total."""
        return {"running": len(self._running), "waiting": len(self._waiting),
                "kv_blocks_used": self.cache.num_blocks - self.cache.num_free_blocks,
                "kv_blocks_total": self.cache.num_blocks}

    # ------------------------------------------------------------------ scheduling
    def _blocks_for(self, r: _Request) -> int:
        full = self.cache.blocks_needed(len(r.prompt) + r.max_new_tokens)
        return min(full, r.sliding[1]) if r.sliding else full

    def _make_room(self, r: _Request, num_new: int) -> None:
        """Sliding window: evict the oldest window blocks so `num_new` more tokens fit.

        Half the window goes at once (at least what is needed): every key is then re-rotated about
        twice in its life, so rounding in a bf16/fp16 cache cannot build up; the kept window varies
        between half and all of `sliding_window`."""
        if not r.sliding:
            return
        sinks, most = r.sliding
        cache = self.cache
        need = cache.blocks_needed(cache.seq_len(r.index) + num_new) - most
        if need <= 0:
            return
        count = min(max(need, (most - sinks - 1) // 2), len(cache.block_table(r.index)) - sinks - 1)
        for _ in range(count):
            cache.evict_block(r.index, sinks)
        shift_cached_keys(self.model, cache, cache.block_table(r.index)[sinks:], count * cache.block_size)

    def _admit(self) -> None:
        """Admit waiting requests in order while a sequence slot and their worst-case blocks are free,
        so a running sequence can never run out of cache mid-generation."""
        while self._waiting and len(self._running) < self.max_num_seqs:
            r = self._waiting[0]
            reserved = sum(self._blocks_for(x) for x in self._running)
            if reserved + self._blocks_for(r) > self.cache.num_blocks:
                return      # wait for running sequences to finish and free their blocks
            self._waiting.pop(0)
            r.prefilled = self.cache.add_sequence(r.index, r.prompt, share=r.sliding is None)
            self._running.append(r)

    def step(self) -> list[tuple[int, int]]:
        """Run one batch (decodes first, then prompt chunks up to the token budget); returns the new tokens
        as `(request_id, token)`. Requests that ended in this step are in `self.finished` afterwards."""
        self.finished = {}
        self._admit()
        if not self._running:
            return []
        decode = [r for r in self._running if not r.in_prefill]
        budget = self.max_step_tokens - len(decode)
        prefill = []
        for r in self._running:
            if r.in_prefill and budget > 0:
                n = min(len(r.prompt) - r.prefilled, budget)
                if r.sliding:   # a chunk must fit next to the sinks and the kept part of the window
                    n = min(n, (r.sliding[1] - r.sliding[0] - 1) * self.cache.block_size)
                prefill.append((r, n))
                budget -= n
        cache, device = self.cache, self.model.device
        tokens, positions, slots, logits_rows = [], [], [], []
        # Positions are positions in the cache: the absolute ones, unless a sliding window evicted blocks.
        decode_slots = []
        for r in decode:
            self._make_room(r, 1)
            pos = cache.seq_len(r.index)
            tokens.append(r.output[-1])
            positions.append(pos)
            decode_slots.append(cache.next_slot(r.index))
            logits_rows.append(len(tokens) - 1)
        if decode_slots:   # one tensor for all decode rows (python ints, no tensor per sequence)
            slots.append(torch.tensor(decode_slots, dtype=torch.int64, device=cache.device))
        chunks = []
        for r, n in prefill:
            self._make_room(r, n)
            start, pos = r.prefilled, cache.seq_len(r.index)
            tokens.extend(r.prompt[start:start + n])
            positions.extend(range(pos, pos + n))
            slots.append(cache.slots(r.index, n))
            if start + n == len(r.prompt):
                logits_rows.append(len(tokens) - 1)
            chunks.append((n, pos + n, cache.block_table(r.index)))
        batch = StepBatch(
            tokens=torch.tensor(tokens, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.cat(slots).to(device), num_decode=len(decode), prefill=chunks,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=device))
        if decode:
            ids = [r.index for r in decode]
            batch.decode_block_tables, batch.decode_seq_lens = cache.block_tables(ids), cache.seq_lens(ids)
        # Always run the step: a prompt chunk that ends mid-prompt needs no logits, but its K/V must be written.
        if self._graphs is not None and decode and not prefill and self._graphs.can_run(len(decode)):
            logits = self._graphs.run(batch)   # pure decode: padded to a bucket, replayed (runtime/cuda_graphs.py)
        else:
            with torch.inference_mode():
                logits = self.model.forward(batch, cache) if tokens else None
        self.steps += 1

        produced, row = [], 0
        for r, n in prefill:
            r.prefilled += n
            if not r.sliding:   # sliding-window blocks are rewritten in place: never shared
                cache.mark_computed(r.index, r.prefilled)
        sampled = [r for r in decode] + [r for r, n in prefill if not r.in_prefill]
        # Greedy rows all at once: one argmax and one host copy instead of one per row (same ties:
        # the first maximum). Rows with temperature > 0 draw from their own generator as before.
        greedy = torch.argmax(logits, dim=-1).tolist() if sampled else []
        for r in sampled:
            if r.temperature <= 0:
                token = greedy[row]
            else:
                token = sample(logits[row], temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                               generator=r.generator)
            row += 1
            r.output.append(token)
            cache.extend_tokens(r.index, [token])
            produced.append((r.index, token))
            if token in r.stop or len(r.output) >= r.max_new_tokens:
                r.finished = True
                r.finish_reason = "stop" if token in r.stop else "length"
        for r in [r for r in self._running if r.finished]:
            self._running.remove(r)
            cache.free(r.index)
            self.finished[r.index] = r.finish_reason
        return produced
