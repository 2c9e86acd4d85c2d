"""`OnnxDecoder`: generation with ONNX Runtime over an exported decoder with past key/values.

The graph is the one `inferforge.optimize.llm_export.export_decoder_onnx` writes: inputs
`input_ids`, `position_ids` int64 `[batch, seq]`, `attention_mask` int64 `[batch, past + seq]` and
`past_key_values.{i}.key|value` `[batch, kv_heads, past, head_dim]`; outputs `logits`
`[batch, seq, vocab]` and `present.{i}.key|value` `[batch, kv_heads, past + seq, head_dim]`.

Batching: every running sequence is one row of a left-padded batch. Row r's past holds `pad_r`
padding columns, then its own K/V; `attention_mask` is 0 on the padding and `position_ids` count
the ones before each token, so a row's numbers do not depend on its neighbours. Between two steps
the `present.*` outputs are the next step's `past_key_values.*` as they are: a prefix never runs
twice. When rows join (a new request's prompt, run as its own left-padded batch) or leave (a
finished request), the batch is rebuilt: rows dropped, the leading columns that are padding in
every row cut off, the pasts left-padded to the longest and stacked.

Providers: `CUDAExecutionProvider` when torch sees a GPU and ONNX Runtime has it (inputs and
outputs are bound to torch CUDA tensors with IO binding, so the past stays on the device), else
`CPUExecutionProvider` (numpy arrays shared with torch tensors, no copies). `.provider` says which.

The decoder has the online interface of `LLMEngine` (`add_request`, `step`, `finished`, `abort`,
`has_unfinished`, `stats`), so `AsyncEngine`, `inferforge serve` and the in-process serving
benchmark run it; requests join and leave between steps (continuous batching, no chunked prefill).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inferforge.errors import UserInputError

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16}
KV_CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def left_pad(prompts: Sequence[Sequence[int]], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask`, `position_ids`, all int64 `[batch, longest]`: prompts aligned to the
    right, padding (id 0, mask 0, position 0) on the left; a token's position is the count of real tokens
    before it."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _kv_order(name: str) -> tuple[int, int]:
    _, layer, which = name.rsplit(".", 2)
    return int(layer), 0 if which == "key" else 1


class DecoderSession:
    """One ONNX Runtime session over the graph, with the model's `spec` (`LlamaSpec`).

    `run(input_ids, attention_mask, position_ids, past)` takes torch tensors on `.device` and returns
    `(logits [batch, seq, vocab], present)` with `present` in the order of `.past_names`."""

    def __init__(self, onnx_path: str | Path, spec, *, provider: str | None = None, threads: int | None = None,
                 session_config: dict[str, str] | None = None):
        import onnxruntime as ort

        self.path, self.spec = Path(onnx_path), spec
        available = ort.get_available_providers()
        if provider is None:
            cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
            provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
        elif provider not in available:
            raise UserInputError(f"provider {provider!r} is not available in this ONNX Runtime "
                                 f"(available: {', '.join(available)})")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session_config = dict(session_config or {})
        for key, value in self.session_config.items():   # e.g. session.disable_quant_qdq=1 for fp8 QDQ on the CPU
            options.add_session_config_entry(key, str(value))
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        if self.provider != provider:
            log.warning("ONNX Runtime could not start %s; running on %s", provider, self.provider)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in inputs]
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_kv_order)
        self.present_names = ["present" + n[len("past_key_values"):] for n in self.past_names]
        missing += [n for n in ("logits", *self.present_names) if n not in outputs]
        if missing or not self.past_names:
            raise UserInputError(f"{self.path}: not a decoder graph with past key/values (missing "
                                 f"{', '.join(missing) or 'past_key_values.*'}); export it with `inferforge export`")
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.kv_dtype = _TORCH_DTYPES[first.type]
        self.logits_dtype = _TORCH_DTYPES[outputs["logits"].type]
        self.device = torch.device("cuda") if self.provider == "CUDAExecutionProvider" else torch.device("cpu")
        log.info("onnx decoder %s on %s", self.path, self.provider)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype, device=self.device)
                for _ in self.past_names]

    def run(self, input_ids, attention_mask, position_ids, past) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.device.type == "cuda":
            return self._run_bound(input_ids, attention_mask, position_ids, past)
        feed = {"input_ids": input_ids.contiguous().numpy(), "attention_mask": attention_mask.contiguous().numpy(),
                "position_ids": position_ids.contiguous().numpy()}
        feed.update({name: t.contiguous().numpy() for name, t in zip(self.past_names, past)})
        logits, *present = self.session.run(["logits", *self.present_names], feed)
        return torch.from_numpy(logits), [torch.from_numpy(p) for p in present]

    def _run_bound(self, input_ids, attention_mask, position_ids, past):
        """CUDA: bind torch tensors by pointer; outputs are allocated here, so nothing leaves the GPU."""
        import numpy as np

        element = {torch.int64: np.int64, torch.float32: np.float32, torch.float16: np.float16}
        prefix = 0
        if past[0].shape[2] == 0:
            # A zero-sized buffer has no device pointer to bind: give the first step one padding
            # column (mask 0, so it changes nothing) and cut it from the outputs.
            past = [torch.zeros((t.shape[0], t.shape[1], 1, t.shape[3]), dtype=t.dtype, device=t.device) for t in past]
            pad = torch.zeros((attention_mask.shape[0], 1), dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask, prefix = torch.cat([pad, attention_mask], 1), 1
        binding = self.session.io_binding()
        keep = []   # the contiguous tensors must outlive the run

        def bind(name, tensor, output=False):
            tensor = tensor.contiguous()
            keep.append(tensor)
            bind_fn = binding.bind_output if output else binding.bind_input
            bind_fn(name, "cuda", tensor.device.index or 0, element[tensor.dtype], list(tensor.shape),
                    tensor.data_ptr())
            return tensor

        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids),
                        *zip(self.past_names, past)):
            bind(name, t.to(self.device))
        batch, seq = input_ids.shape
        total = attention_mask.shape[1]
        logits = bind("logits", torch.empty((batch, seq, self.spec.vocab_size), dtype=self.logits_dtype,
                                            device=self.device), output=True)
        present = [bind(name, torch.empty((batch, self.kv_heads, total, self.head_dim), dtype=self.kv_dtype,
                                          device=self.device), output=True) for name in self.present_names]
        self.session.run_with_iobinding(binding)
        return logits, [p[:, :, prefix:] for p in present]


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
    finished: bool = False
    finish_reason: str | None = None


def _check_params(max_new_tokens, temperature, top_k, top_p, truncate) -> None:
    if max_new_tokens is None or max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise UserInputError(f"sampling needs temperature >= 0, top_k >= 1 and 0 < top_p <= 1; got temperature="
                             f"{temperature}, top_k={top_k}, top_p={top_p}")
    if truncate not in (None, "left"):
        raise UserInputError(f"truncate must be None or 'left', got {truncate!r}")


class OnnxDecoder:
    """Generate with an exported decoder graph; `generate` and `stream` as `LLMEngine`'s."""

    def __init__(self, onnx_path: str | Path, spec, *, tokenizer=None, max_num_seqs: int = 8,
                 max_context: int | None = None, provider: str | None = None, threads: int | None = None,
                 session_config: dict[str, str] | None = None):
        if max_num_seqs < 1:
            raise UserInputError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.model = DecoderSession(onnx_path, spec, provider=provider, threads=threads, session_config=session_config)
        self.provider = self.model.provider
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        window = spec.max_position_embeddings
        self.max_context = min(max_context or window, window)
        self.manifest: dict | None = None
        self.steps = 0
        self.finished: dict[int, str] = {}
        self._waiting: list[_Request] = []
        self._rows: list[_Request] = []          # the running batch, one row per request
        self._past: list[torch.Tensor] = []      # [rows, kv_heads, columns, head_dim] per past input
        self._mask: torch.Tensor | None = None   # [rows, columns] int64, 0 on left padding

    @classmethod
    def from_artifact(cls, path: str | Path, *, model: str = "model.onnx", kv_cache_dtype=None, max_num_seqs: int = 8,
                      max_context: int | None = None, max_step_tokens: int | None = None, provider: str | None = None,
                      threads: int | None = None) -> OnnxDecoder:
        """The decoder of an `onnx-causal-lm` artifact directory (graph, config.json, tokenizer files).
        `max_step_tokens` is accepted for `LLMEngine` compatibility: prompts are prefilled whole.
        `kv_cache_dtype` must be the graph's own past dtype (it is fixed at export). The session config
        entries the artifact records (`inferforge.ort_config.decoder_session_config`) are applied."""
        from inferforge.checkpoint_files import read_config
        from inferforge.ort_config import decoder_session_config
        from inferforge.runtime.llama import LlamaSpec

        path = Path(path)
        spec = LlamaSpec.from_config(read_config(path), source=str(path / "config.json"))
        tokenizer = None
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        decoder = cls(path / model, spec, tokenizer=tokenizer, max_num_seqs=max_num_seqs, max_context=max_context,
                      provider=provider, threads=threads, session_config=decoder_session_config(path))
        wanted = KV_CACHE_DTYPES.get(kv_cache_dtype, kv_cache_dtype)
        if kv_cache_dtype is not None and wanted != decoder.model.kv_dtype:
            have = {v: k for k, v in KV_CACHE_DTYPES.items()}.get(decoder.model.kv_dtype, str(decoder.model.kv_dtype))
            raise UserInputError(f"{path}: the ONNX graph keeps its KV cache in {have}, fixed at export; drop "
                                 f"--kv-cache-dtype {kv_cache_dtype} (or export again, with --fp16 for fp16)")
        return decoder

    # ------------------------------------------------------------------ requests
    def _make_request(self, index, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
                      stop_token_ids=None, truncate=None) -> _Request:
        from inferforge.runtime.engine import ContextWindowExceeded

        _check_params(max_new_tokens, temperature, top_k, top_p, truncate)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise UserInputError("prompts must be a list of non-empty token-id lists")
        vocab = self.model.spec.vocab_size
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise UserInputError(f"prompt {index}: token ids must be ints in [0, {vocab}), got {bad[0]!r}")
        prompt = list(prompt)
        total = len(prompt) + max_new_tokens
        if total > self.max_context:
            if truncate == "left" and max_new_tokens < self.max_context:
                prompt = prompt[total - self.max_context:]
            else:
                problem = (f"prompt ({len(prompt)} tokens) + {{}} ({max_new_tokens}) = {total} exceeds the model's "
                           f"context window ({self.max_context} tokens)")
                raise ContextWindowExceeded(
                    problem.format("max_new_tokens") + "; shorten the prompt, lower max_new_tokens, or pass "
                    "truncate='left'", cli_message=problem.format("--max-new-tokens") + "; shorten --prompt, lower "
                    "--max-new-tokens, or pass --truncate-left to keep the most recent tokens")
        generator = None
        if temperature > 0:
            base = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 2
            generator = torch.Generator().manual_seed(base + index)
        stop = frozenset(self.model.spec.eos_token_ids if stop_token_ids is None else stop_token_ids)
        return _Request(index, prompt, max_new_tokens, temperature, top_k, top_p, stop, generator)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_token_ids: Sequence[int] | None = None, truncate: str | None = None,
                 sliding_window: int | None = None, sink_tokens: int = 4) -> list[list[int]]:
        """Generated token ids for every prompt (token-id lists), in order; as `LLMEngine.generate`:
        greedy at temperature 0, else top-k / top-p sampling (reproducible with `seed`); stops at
        `max_new_tokens` or a stop token (default the model's EOS), which is included."""
        outputs: dict[int, list[int]] = {}
        for index, token in self.stream(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, truncate=truncate,
                                        sliding_window=sliding_window, sink_tokens=sink_tokens):
            outputs.setdefault(index, []).append(token)
        return [outputs.get(i, []) for i in range(len(prompts))]

    def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sliding_window: int | None = None,
               sink_tokens: int = 4, **params) -> Iterator[tuple[int, int]]:
        """Like `generate`, but yields `(prompt_index, token)` as soon as each token is chosen."""
        if sliding_window is not None:
            raise UserInputError("sliding_window is not available with an ONNX decoder (its past is one dense "
                                 "tensor); run the checkpoint or its causal-LM artifact on the engine for it")
        if self.has_unfinished():
            raise UserInputError("this decoder is already generating (a stream is still open); finish or close it "
                                 "first, or pass all prompts in one call")
        if not isinstance(prompts, (list, tuple)):
            raise UserInputError("prompts must be a list of non-empty token-id lists")
        # No prompts: nothing to generate (as LLMEngine), once the arguments are checked.
        _check_params(max_new_tokens, params.get("temperature", 0.0),
                      params.get("top_k"), params.get("top_p"), params.get("truncate"))
        self._waiting.extend(self._make_request(i, p, max_new_tokens, **params) for i, p in enumerate(prompts))
        try:
            while self.has_unfinished():
                yield from self.step()
        finally:
            self._waiting.clear()
            self._keep_rows([])

    # ------------------------------------------------------------------ online serving
    def add_request(self, request_id: int, prompt: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False) -> None:
        """Queue one request under `request_id` (as `LLMEngine.add_request`); `step()` runs it."""
        if any(r.index == request_id for r in (*self._waiting, *self._rows)):
            raise UserInputError(f"request id {request_id} is already in use")
        request = self._make_request(request_id, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                     stop_token_ids)
        if ignore_eos:
            request.stop = request.stop - frozenset(self.model.spec.eos_token_ids)
        self._waiting.append(request)

    def abort(self, request_id: int) -> bool:
        for r in self._waiting:
            if r.index == request_id:
                self._waiting.remove(r)
                return True
        rows = [i for i, r in enumerate(self._rows) if r.index != request_id]
        if len(rows) == len(self._rows):
            return False
        self._keep_rows(rows)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._rows)

    def stats(self) -> dict:
        """running and waiting requests; `kv_tokens`: past columns times rows held now. The past is dense,
        not paged, so `kv_blocks_used` / `kv_blocks_total` are 0."""
        columns = 0 if self._mask is None else self._mask.shape[1]
        return {"running": len(self._rows), "waiting": len(self._waiting), "kv_tokens": columns * len(self._rows),
                "kv_blocks_used": 0, "kv_blocks_total": 0}

    # ------------------------------------------------------------------ the batch
    def step(self) -> list[tuple[int, int]]:
        """Decode one token for every running row, then prefill the requests that fit as a new batch
        and merge it in; returns `(request_id, token)` pairs; ended requests are in `finished`."""
        self.finished = {}
        produced = []
        if self._rows:
            device = self.model.device
            ids = torch.tensor([[r.output[-1]] for r in self._rows], dtype=torch.long, device=device)
            mask = torch.cat([self._mask, torch.ones((len(self._rows), 1), dtype=torch.long, device=device)], 1)
            positions = mask.sum(1, keepdim=True) - 1
            logits, self._past = self.model.run(ids, mask, positions, self._past)
            self._mask = mask
            produced += self._choose(self._rows, logits[:, -1])
        room = self.max_num_seqs - len(self._rows)
        if room > 0 and self._waiting:
            new, self._waiting = self._waiting[:room], self._waiting[room:]
            ids, mask, positions = left_pad([r.prompt for r in new], self.model.device)
            logits, present = self.model.run(ids, mask, positions, self.model.empty_past(len(new)))
            if not bool(mask.all()):   # padding rows attended to nothing: zero their K/V, never read anyway
                keep = mask[:, None, :, None].bool()
                present = [torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device)) for p in present]
            produced += self._choose(new, logits[:, -1])
            self._merge(new, present, mask)
        self.steps += 1
        done = [r for r in self._rows if r.finished]
        if done:
            self._keep_rows([i for i, r in enumerate(self._rows) if not r.finished])
            self.finished = {r.index: r.finish_reason for r in done}
        return produced

    def _choose(self, rows: list[_Request], logits: torch.Tensor) -> list[tuple[int, int]]:
        from inferforge.runtime.engine import sample

        logits = logits.float()
        if all(r.temperature <= 0 for r in rows):
            tokens = logits.argmax(-1).tolist()
        else:
            tokens = [sample(logits[i], temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                             generator=r.generator) for i, r in enumerate(rows)]
        for r, token in zip(rows, tokens):
            r.output.append(token)
            if token in r.stop or len(r.output) >= r.max_new_tokens:
                r.finished, r.finish_reason = True, "stop" if token in r.stop else "length"
        return [(r.index, t) for r, t in zip(rows, tokens)]

    def _merge(self, rows: list[_Request], past: list[torch.Tensor], mask: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._past, self._mask = list(rows), past, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def pad(t, columns):   # left-pad the column axis (dim 2 of a past, dim 1 of a mask) with zeros
            extra = width - columns
            return t if extra == 0 else torch.nn.functional.pad(t, (0, 0, extra, 0) if t.dim() == 4 else (extra, 0))

        old = self._mask.shape[1]
        self._past = [torch.cat([pad(a, old), pad(b, mask.shape[1])]) for a, b in zip(self._past, past)]
        self._mask = torch.cat([pad(self._mask, old), pad(mask, mask.shape[1])])
        self._rows = self._rows + list(rows)

    def _keep_rows(self, keep: list[int]) -> None:
        """Drop the other rows, then the leading columns that are padding in every row left."""
        if not keep:
            self._rows, self._past, self._mask = [], [], None
            return
        if len(keep) < len(self._rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.model.device)
            self._rows = [self._rows[i] for i in keep]
            self._past = [p.index_select(0, index) for p in self._past]
            self._mask = self._mask.index_select(0, index)
        lead = int(self._mask.any(0).long().argmax())
        if lead:
            self._past = [p[:, :, lead:] for p in self._past]
            self._mask = self._mask[:, lead:]


def validate_decoder(*args, **kwargs) -> dict:
    """ONNX Runtime against PyTorch; see `inferforge.optimize.onnx_decoder_validate.validate_decoder`."""
    from inferforge.optimize.onnx_decoder_validate import validate_decoder as validate

    return validate(*args, **kwargs)
