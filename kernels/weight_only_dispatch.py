"""Per-layer choice of how a weight-only quantized linear runs on a GPU, from measured timings.

For one shape key (GPU name, format, N, K, group, M bucket, activation dtype) there are two
quantized candidates:
- "fused": the public `w8a16_matmul` / `w4a16_matmul` (whatever tile or path its own tuner picks);
- "dequantize+cublas": the weights dequantized to x's dtype in one pass, then `F.linear` (cuBLAS);
and the bf16 baseline, `F.linear` on a dense weight of the same shape, which the quantized layer does
not hold: it is timed only to say whether the format pays for that shape ("bf16 is faster").

Timings (milliseconds, median of CUDA-graph replays) live in a JSON cache, one file for all GPUs
(keys start with the GPU's name): `$INFERFORGE_DISPATCH_CACHE`, else
`~/.cache/inferforge/weight_only_dispatch.json`. It is written atomically after each new
measurement. A cache that cannot be read (corrupt JSON, wrong layout) is logged once and rebuilt
from new measurements; it is never trusted partially.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FUSED = "fused"
DEQUANTIZE_CUBLAS = "dequantize+cublas"
BF16 = "bf16"
CANDIDATES = (FUSED, DEQUANTIZE_CUBLAS)
CACHE_FORMAT = "inferforge-weight-only-dispatch/1"


def m_bucket(m: int) -> int:
    """The M range a timing stands for: 1, then powers of two (as the kernel tuner's buckets)."""
    return 1 if m <= 1 else 1 << (m - 1).bit_length()


@dataclass(frozen=True)
class ShapeKey:
    gpu: str            # torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3"
    fmt: str            # "w8a16" or "w4a16"
    n: int
    k: int
    group: int          # int4 group size; K for int8 (one scale per output channel)
    m: int              # the M bucket
    dtype: str = "bfloat16"

    def text(self) -> str:
        return f"{self.gpu}|{self.fmt}|n={self.n}|k={self.k}|g={self.group}|m={self.m}|{self.dtype}"


@dataclass(frozen=True)
class Choice:
    candidate: str                 # the quantized candidate to run: FUSED or DEQUANTIZE_CUBLAS
    timings_ms: dict               # candidate (and BF16) -> ms
    bf16_faster: bool              # no quantized candidate beats the bf16 matmul of this shape

    @property
    def speedup(self) -> float | None:
        """bf16 time over the chosen candidate's time (> 1: the format pays), None without a bf16 timing."""
        bf16, ours = self.timings_ms.get(BF16), self.timings_ms.get(self.candidate)
        return None if bf16 is None or not ours else bf16 / ours


def choose(timings_ms: dict) -> Choice:
    """The fastest quantized candidate among the timed ones, and whether bf16 beats them all."""
    timed = {c: float(timings_ms[c]) for c in CANDIDATES if timings_ms.get(c) is not None}
    if not timed:
        raise ValueError(f"no quantized candidate was timed: {timings_ms}")
    best = min(timed, key=timed.get)
    bf16 = timings_ms.get(BF16)
    return Choice(best, dict(timings_ms), bf16 is not None and float(bf16) <= timed[best])


def default_cache_path() -> Path:
    env = os.environ.get("INFERFORGE_DISPATCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "inferforge" / "weight_only_dispatch.json"


class TimingCache:
    """Measured timings per shape key, persisted as JSON at `path` (None: in memory only)."""

    def __init__(self, path: str | os.PathLike | None = None, entries: dict | None = None):
        self.path = None if path is None else Path(path)
        self.entries: dict[str, dict] = dict(entries or {})
        self.rebuilt_reason: str | None = None
        if self.path is not None and entries is None:
            self.entries = self._read()

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                raise ValueError(f"format is not {CACHE_FORMAT}")
            entries = data["entries"]
            if not isinstance(entries, dict) or not all(
                    isinstance(v, dict) and all(isinstance(t, (int, float)) for t in v.values())
                    for v in entries.values()):
                raise ValueError("entries must map shape keys to {candidate: milliseconds}")
            return entries
        except (OSError, ValueError, KeyError) as e:
            self.rebuilt_reason = f"{self.path}: unreadable dispatch cache ({e}); ignored, timings are measured again"
            log.warning(self.rebuilt_reason)
            return {}

    def get(self, key: ShapeKey) -> dict | None:
        return self.entries.get(key.text())

    def put(self, key: ShapeKey, timings_ms: dict) -> None:
        self.entries[key.text()] = {c: float(t) for c, t in timings_ms.items()}
        if self.path is not None:
            from inferforge.fileio import atomic_write_json

            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"format": CACHE_FORMAT, "entries": self.entries})


def _time_candidates_on_gpu(runners: dict[str, Callable[[], torch.Tensor]]) -> dict:
    """Median ms of CUDA-graph replays for each runner (launch overhead left out, as the kernel tuner)."""
    from triton.testing import do_bench_cudagraph

    timings = {}
    for name, fn in runners.items():
        try:
            timings[name] = float(do_bench_cudagraph(fn, rep=20))
        except Exception as e:  # noqa: BLE001 - a candidate that does not run here is left out, and said so
            log.warning("dispatch: candidate %s could not be timed (%s); left out", name, e)
    return timings


def _runners(module, x2: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The callables to time for one quantized module on activations x2 [M, K]."""
    dense = torch.randn(module.out_features, module.in_features, device=x2.device, dtype=x2.dtype)
    return {FUSED: lambda: run_candidate(module, x2, FUSED),
            DEQUANTIZE_CUBLAS: lambda: run_candidate(module, x2, DEQUANTIZE_CUBLAS),
            BF16: lambda: torch.nn.functional.linear(x2, dense)}


def module_format(module) -> tuple[str, int]:
    """("w8a16", K) for Int8WeightOnlyLinear, ("w4a16", group) for Int4WeightOnlyLinear."""
    if hasattr(module, "weight_int8") and hasattr(module, "scale"):
        return "w8a16", module.in_features
    return "w4a16", module.group_size


def run_candidate(module, x: torch.Tensor, candidate: str) -> torch.Tensor:
    """The module's matmul on x [..., K] (AWQ's input scaling already applied) by one candidate."""
    from inferforge.kernels import w4a16_matmul, w8a16_matmul
    from inferforge.kernels.weight_only_matmul import dequantize

    fmt, group = module_format(module)
    if candidate == FUSED:
        if fmt == "w8a16":
            return w8a16_matmul(x, module.weight_int8, module.scale, module.bias)
        return w4a16_matmul(x, module.packed, module.scales, module.zeros, module.bias, group_size=group,
                            layout=module.layout)
    if candidate != DEQUANTIZE_CUBLAS:
        raise ValueError(f"unknown candidate {candidate!r}; known: {', '.join(CANDIDATES)}")
    if fmt == "w8a16":
        dense = dequantize(module.weight_int8, module.scale, None, bits=8, group=group, dtype=x.dtype,
                           k=module.in_features)
    else:
        dense = dequantize(module.packed, module.scales, module.zeros, bits=4, group=group, dtype=x.dtype,
                           k=module.in_features, layout=module.layout)
    return torch.nn.functional.linear(x, dense, None if module.bias is None else module.bias.to(x.dtype))


class Dispatcher:
    """Chooses a candidate per shape key from `cache`, measuring unknown keys with `measure`
    (runners -> {name: ms}; CUDA-graph timing by default) and storing the result."""

    def __init__(self, cache: TimingCache | None = None, measure=None):
        self.cache = cache if cache is not None else TimingCache(default_cache_path())
        self.measure = measure or _time_candidates_on_gpu
        self._choices: dict[str, Choice] = {}

    def choice(self, key: ShapeKey, runners: Callable[[], dict] | None = None) -> Choice | None:
        """The choice for `key`; None when it is not cached and nothing may be measured (no runners)."""
        text = key.text()
        if text in self._choices:
            return self._choices[text]
        timings = self.cache.get(key)
        if timings is None:
            if runners is None:
                return None
            timings = self.measure(runners())
            if not any(c in timings for c in CANDIDATES):
                return None
            self.cache.put(key, timings)
        self._choices[text] = choose(timings)
        return self._choices[text]


_DISPATCHER: Dispatcher | None = None
_DEVICE_NAMES: dict[int, str] = {}     # device index -> name, looked up once (forwards run per layer per step)


def default_dispatcher() -> Dispatcher:
    global _DISPATCHER
    if _DISPATCHER is None:
        _DISPATCHER = Dispatcher()
    return _DISPATCHER


def shape_key(module, m: int, dtype: torch.dtype, gpu: str) -> ShapeKey:
    fmt, group = module_format(module)
    return ShapeKey(gpu, fmt, module.out_features, module.in_features, group, m_bucket(m), str(dtype).removeprefix("torch."))


def dispatch_forward(module, x: torch.Tensor, dispatcher: Dispatcher | None = None) -> torch.Tensor:
    """A weight-only module's matmul on a CUDA x [..., K] by the candidate measured fastest for its
    shape. Falls back to the fused path, without measuring, while a CUDA graph is captured or with
    INFERFORGE_AUTOTUNE=0 (the kernel tuner's switch) when the shape is not cached."""
    x2 = x.reshape(-1, module.in_features)
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    key = shape_key(module, x2.shape[0], x.dtype, _DEVICE_NAMES[index])
    may_measure = not torch.cuda.is_current_stream_capturing() and os.environ.get("INFERFORGE_AUTOTUNE") != "0"
    choice = (dispatcher or default_dispatcher()).choice(
        key, (lambda: _runners(module, x2.contiguous())) if may_measure else None)
    return run_candidate(module, x, choice.candidate if choice else FUSED)


def dispatch_report(model: torch.nn.Module, batch_sizes, *, gpu: str, dtype: torch.dtype = torch.bfloat16,
                    dispatcher: Dispatcher | None = None) -> list[dict]:
    """Per weight-only quantized layer of `model` and M in `batch_sizes`: the candidate it uses, its
    time and bf16's, the speed-up and whether bf16 is faster; timings from the dispatcher's cache
    (`candidate` None: not measured for this GPU yet)."""
    from inferforge.optimize.quantize import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    dispatcher = dispatcher or default_dispatcher()
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)):
            continue
        for m in batch_sizes:
            key = shape_key(module, m, dtype, gpu)
            choice = dispatcher.choice(key)
            rows.append({"layer": name, "format": key.fmt, "n": key.n, "k": key.k, "m": m, "m_bucket": key.m,
                         "candidate": choice and choice.candidate,
                         "ms": choice and choice.timings_ms.get(choice.candidate),
                         "bf16_ms": choice and choice.timings_ms.get(BF16),
                         "speedup": choice and choice.speedup,
                         "bf16_faster": bool(choice and choice.bf16_faster)})
    return rows


def render_dispatch_report(rows: list[dict]) -> str:
    """Plain-text lines: one per layer and batch size, then the layers where bf16 is faster."""
    lines, unmeasured = [], []
    for r in rows:
        if r["candidate"] is None:
            unmeasured.append(f"{r['layer']} M={r['m']}")
            continue
        speed = f"{r['speedup']:.2f}x vs bf16" if r["speedup"] else "no bf16 timing"
        flag = "  (bf16 is faster)" if r["bf16_faster"] else ""
        lines.append(f"{r['layer']} M={r['m']}: {r['candidate']} {r['ms']:.4f} ms, {speed}{flag}")
    if unmeasured:
        lines.append(f"not measured on this GPU yet ({len(unmeasured)} layer/batch case(s), timed on first use): "
                     + (", ".join(unmeasured[:8]) + (" ..." if len(unmeasured) > 8 else "")))
    slower = sorted({f"{r['layer']} M={r['m']}" for r in rows if r["bf16_faster"]})
    if slower:
        lines.append(f"bf16 is faster than every quantized candidate for {len(slower)} layer/batch case(s): "
                     + ", ".join(slower))
    return "\n".join(lines)
