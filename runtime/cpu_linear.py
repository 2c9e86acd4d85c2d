"""Dense float linears on the CPU: which weight layout each step reads, measured on this machine.

Three ways to compute `x @ weight.T` for a `[out, in]` float weight, and their speed differs by CPU:

- `F.linear` on the dense weight. On 2 cores of a Xeon with AVX-512 and AMX (torch 2.13) it read
  the weight at 33-39 GB/s at M = 1 row, but only 11-15 GB/s at M = 8. On 2 cores of an AMD EPYC
  with AVX-512 (torch 2.13, MKL 2024.2) it ran single-threaded: 14-16 GB/s at 1 row, 5-8 GB/s at
  2-16 rows, against 32 GB/s for a 2-thread `sum` over the same weights.
- oneDNN's blocked layout (`mkldnn._reorder_linear_weight` once, then `mkldnn._linear_pointwise`).
  Xeon: 17-20 GB/s at M = 8 and 13 GB/s against 7 GB/s for the 32000-row LM head, but 10-30% slower
  than `F.linear` at M = 1 (about 50 us more a call). EPYC: 20-24 GB/s at every row count from 1 to 16:
  streaming the 64 projections of a 16-layer, 1024-wide Llama took 32 ms at 1 row against 45 ms for
  `F.linear`, and 39 ms at 8 rows against 81 ms.
- MKL's packed SGEMM (`mkl._mkl_reorder_linear_weight(weight, M)` for one row count M, run through
  `mkl._mkl_linear`). Xeon, the same 960 MB of projections at M = 8: 55-58 ms a pass against oneDNN's
  62-70 ms and `F.linear`'s 91-105 ms; rows padded with zeros up to M cost the same as oneDNN's at 4
  rows. EPYC: 98 ms at 8 rows. For other row counts `mkl._mkl_linear` runs MKL's SGEMM on the dense
  weight (prefill chunks: on the Xeon 10-15% slower than oneDNN at 64 rows, as fast at 256).

So no layout is the fastest everywhere, and the engine measures. A `PackedDenseLinear` holds one of:

- "dense+copy": the dense weight for steps of at most `DENSE_MAX_ROWS` rows and one packed copy for
  larger ones: MKL's, packed for the engine's `max_num_seqs` rows (fewer are padded to it), when that
  is `MKL_MIN_ROWS`-`MKL_MAX_ROWS`, the weight float32 and MKL timed faster there than oneDNN (or the
  layout was asked for), else oneDNN's. That is a second copy of every
  projection weight (MKL's buffer is nominally larger, but only the packed weight's pages are ever
  written, measured as resident memory for weights of 1024 x 1024 and more; each buffer reserves at
  least about 7.5 MiB of address space, about 2x the weights in all, and tiny weights cost more than
  their bytes);
- "onednn": oneDNN's layout only, for every row count; the dense weight is dropped, so it costs no
  memory beyond the weights (an LM head tied to the embedding keeps the embedding, and so one copy).

`LLMEngine.from_pretrained(cpu_packed_linears=None)` (the default) times each candidate on the model's
own projections (`time_layouts`: passes over about SAMPLE_BYTES of them, more than a CPU's caches, at
1 row and at `max_num_seqs` rows, interleaved, the fastest of REPS) and keeps the fastest
(`choose_layout`); it logs the timings, and `engine.cpu_linears` keeps them. A timing reflects the
machine's load at that moment (on an oversubscribed CPU oneDNN's threads wait for a core, F.linear's
single thread does not), so two loads can choose differently, and with a `memory_budget` get a
different number of KV blocks: pin the layout for reproducible runs. `False` keeps
`F.linear` on the dense weights, `True` the dense weight and a copy, `"onednn"` oneDNN's layout only.
The KV-cache budget counts what is kept (`model_weight_bytes`); `plan()`, which runs no torch, counts
for auto the most any candidate adds (`runtime/plan.py: cpu_packed_bytes`), so where a lighter layout
wins it over-counts the weights (and under-counts the KV cache); for a pinned layout it counts exactly
what that layout adds. Measured end to end in `scripts/bench_engine_cpu.py` (README: "Engine speed on
a CPU").
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import torch
import torch.nn.functional as F

from inferforge.runtime.kv_budget import DENSE_MAX_ROWS, packs_by_default

log = logging.getLogger(__name__)

# Steps of at most DENSE_MAX_ROWS rows (3: F.linear was the fastest at M = 1-3 on the Xeon) use the dense
# weight in "dense+copy"; `packs_by_default` keeps the copy only when decode steps can be larger
# (runtime/kv_budget.py). MKL packs for a decode batch of this many rows (max_num_seqs); beyond it,
# padding a step up to the packed row count costs more compute than its weight reads save.
MKL_MIN_ROWS, MKL_MAX_ROWS = DENSE_MAX_ROWS + 1, 16
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# What `time_layouts` streams: enough projections to leave the caches (a 2-core EPYC's L3 is 32 MiB),
# few enough that their temporary packed copies stay small next to the weights.
SAMPLE_BYTES = 128 * 2**20
REPS = 3
# A layout that holds fewer bytes ("onednn" against "dense+copy"), or the dense weights left as they
# are ("dense" against "onednn"), keeps ties: the other must be this much faster to be chosen.
MARGIN = 0.05


def packing_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why dense linears can't be packed here (None when they can)."""
    if device.type != "cpu":
        return f"the engine runs on {device.type}, and packing is for the CPU"
    if dtype not in PACKABLE_DTYPES:
        return f"the weights are {dtype}; oneDNN packing here is for float32 and bfloat16"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN (mkldnn) linear"
    return None


def mkl_packing_available(dtype: torch.dtype) -> bool:
    return (dtype == torch.float32 and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


def mkl_packs_for(rows: int | None, dtype: torch.dtype) -> bool:
    """Whether a "dense+copy" copy for decode steps of `rows` rows would be MKL's (else oneDNN's)."""
    return rows is not None and MKL_MIN_ROWS <= rows <= MKL_MAX_ROWS and mkl_packing_available(dtype)


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedDenseLinear:
    """`x @ weight.T + bias` for `x` of shape `[rows, in]` (or `[..., in]`).

    `dense=True` ("dense+copy"): `F.linear` on the dense `weight [out, in]` for up to DENSE_MAX_ROWS
    rows, else a packed copy of it: MKL's for `batch_rows` rows (fewer are padded to it; more run
    MKL's SGEMM on the dense weight) when `batch_rows` is MKL_MIN_ROWS-MKL_MAX_ROWS and MKL can pack
    the weight, else oneDNN's. `dense=False` ("onednn"): oneDNN's layout for every row count, and no
    reference to the dense weight is kept (`weight` is None)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, batch_rows: int | None = None,
                 dense: bool = True):
        self.weight, self.bias = (weight if dense else None), bias
        self.out_features, self.in_features = weight.shape
        self.batch_rows = None
        if dense and mkl_packs_for(batch_rows, weight.dtype):
            try:
                self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, batch_rows)
                self.batch_rows = batch_rows
            except RuntimeError as e:    # an MKL build that can't pack here: oneDNN's layout instead
                log.debug("MKL could not pack a %s weight (%s); oneDNN packs it", tuple(weight.shape), e)
        if self.batch_rows is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.packed_bytes = weight.numel() * weight.element_size()

    @property
    def kind(self) -> str:
        """Which packed copy: "mkl" or "onednn"."""
        return "mkl" if self.batch_rows is not None else "onednn"

    @property
    def layout(self) -> str:
        return "dense+copy" if self.weight is not None else "onednn"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.weight is not None and rows <= DENSE_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        if self.batch_rows is not None:
            if rows < self.batch_rows:
                flat = torch.cat([flat, flat.new_zeros(self.batch_rows - rows, self.in_features)])
            out = torch.ops.mkl._mkl_linear(flat, self.packed, self.weight, self.bias, self.batch_rows)[:rows]
        else:
            out = _onednn(flat, self.packed, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def __repr__(self) -> str:
        rows = f", batch_rows={self.batch_rows}" if self.batch_rows is not None else ""
        return (f"PackedDenseLinear(in={self.in_features}, out={self.out_features}, dtype={self.packed.dtype}, "
                f"{self.layout}, {self.kind}{rows})")


# ---------------------------------------------------------------------- measuring the layouts
def sample_projections(model, limit: int = SAMPLE_BYTES) -> list[torch.Tensor]:
    """The model's dense projection weights, whole layers from the first, until `limit` bytes are
    reached (the LM head alone when no layer has a dense projection). A weight larger than a quarter
    of `limit` is cut to its first rows (a contiguous `[rows, in]` slice), so the sample stays near
    `limit` whatever the model's size."""
    from inferforge.runtime.llama import LAYER_PROJECTIONS

    def cut(w):
        row_bytes = w.shape[1] * w.element_size()
        return w[:max(1, (limit // 4) // row_bytes)] if w.numel() * w.element_size() > limit // 4 else w

    sample, total = [], 0
    for layer in model.layers:
        if total >= limit:
            break
        for name in LAYER_PROJECTIONS:
            w = layer[name]
            if isinstance(w, torch.Tensor):
                sample.append(cut(w))
                total += sample[-1].numel() * w.element_size()
    if not sample and isinstance(model.lm_head, torch.Tensor):
        sample.append(cut(model.lm_head))
    return sample


def time_layouts(weights: list[torch.Tensor], max_num_seqs: int, *, reps: int = REPS) -> dict[str, float]:
    """Seconds of one pass over `weights` for each way the engine could run them, the fastest of
    `reps` interleaved passes (one warm-up each). Keys "<path>@<rows>": dense@1 and onednn@1 always;
    with `max_num_seqs` > 1 also onednn@n, and dense@n (n <= DENSE_MAX_ROWS) or mkl@n (n rows packed
    for n, where MKL packs them) for n = max_num_seqs."""
    n = max_num_seqs
    dtype = weights[0].dtype
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    g = torch.Generator().manual_seed(0)          # leaves the caller's random state alone
    inputs = {(w.shape[1], rows): torch.randn(rows, w.shape[1], dtype=dtype, generator=g)
              for w in weights for rows in {1, n}}
    passes = {"dense@1": [lambda w=w: F.linear(inputs[w.shape[1], 1], w) for w in weights],
              "onednn@1": [lambda w=w, p=p: _onednn(inputs[w.shape[1], 1], p, None) for w, p in zip(weights, onednn)]}
    if n > 1:
        passes[f"onednn@{n}"] = [lambda w=w, p=p: _onednn(inputs[w.shape[1], n], p, None)
                                 for w, p in zip(weights, onednn)]
        if n <= DENSE_MAX_ROWS:
            passes[f"dense@{n}"] = [lambda w=w: F.linear(inputs[w.shape[1], n], w) for w in weights]
        elif mkl_packs_for(n, dtype):
            try:
                mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, n) for w in weights]
                passes[f"mkl@{n}"] = [lambda w=w, p=p: torch.ops.mkl._mkl_linear(inputs[w.shape[1], n], p, w, None, n)
                                      for w, p in zip(weights, mkl)]
            except RuntimeError as e:
                log.debug("MKL could not pack the sample (%s); not timed", e)
    best = dict.fromkeys(passes, float("inf"))
    with torch.inference_mode():
        for rep in range(reps + 1):
            for key, calls in passes.items():
                start = time.perf_counter()
                for call in calls:
                    call()
                if rep:                             # rep 0 warms up
                    best[key] = min(best[key], time.perf_counter() - start)
    return best


def choose_layout(seconds: dict[str, float], max_num_seqs: int) -> tuple[str, bool]:
    """("dense" | "dense+copy" | "onednn", whether the copy is MKL's) from `time_layouts`' timings:
    the layout whose passes at 1 row and at max_num_seqs rows take the least time in all. The
    candidates are "dense" and "onednn" when max_num_seqs <= DENSE_MAX_ROWS (dense keeps ties within
    MARGIN), else "dense+copy" (copy: the faster of MKL's and oneDNN's) and "onednn" (which keeps ties:
    it holds one copy fewer)."""
    n = max_num_seqs
    onednn = seconds["onednn@1"] + (seconds[f"onednn@{n}"] if n > 1 else 0.0)
    if not packs_by_default(n):
        dense = seconds["dense@1"] + (seconds[f"dense@{n}"] if n > 1 else 0.0)
        return ("onednn", False) if onednn < (1 - MARGIN) * dense else ("dense", False)
    mkl = f"mkl@{n}" in seconds and seconds[f"mkl@{n}"] < seconds[f"onednn@{n}"]
    copy = seconds["dense@1"] + min(seconds.get(f"mkl@{n}", float("inf")), seconds[f"onednn@{n}"])
    return ("onednn", False) if onednn <= (1 + MARGIN) * copy else ("dense+copy", mkl)


def _describe(seconds: dict[str, float], sample_bytes: int) -> str:
    return (f"one pass over {sample_bytes / 2**20:.1f} MiB of projections, as path@rows: "
            + ", ".join(f"{key} {s * 1e3:.1f} ms" for key, s in seconds.items()))


# ---------------------------------------------------------------------- the engine's choice
def check_cpu_packed_linears(value) -> None:
    from inferforge.errors import UserInputError

    if not (value is None or isinstance(value, bool) or (isinstance(value, str) and value == "onednn")):
        raise UserInputError(f"cpu_packed_linears must be True, False, 'onednn' or None (auto), got {value!r}")


def pack_dense_linears_if_asked(model, requested: bool | str | None, max_num_seqs: int) -> dict:
    """Apply `cpu_packed_linears` (see `LLMEngine.from_pretrained`, which checks its value first): None
    measures the layouts and keeps the fastest. Returns what was done: {"layout", "extra_bytes", "seconds" (measured, or None),
    "reason"}."""
    from inferforge.errors import UserInputError

    done = dict(layout="dense", extra_bytes=0, seconds=None, reason="")
    if requested is False:
        return {**done, "reason": "cpu_packed_linears=False"}
    why_not = packing_unavailable_reason(model.device, model.dtype)
    if why_not is not None:
        if requested is not None:
            raise UserInputError(f"cpu_packed_linears={requested!r} (--cpu-linears): {why_not}; leave it unset (auto)")
        return {**done, "reason": why_not}
    layout, mkl = ("onednn", False) if requested == "onednn" else ("dense+copy", True)
    sample = sample_projections(model)
    if not sample:                       # every projection and the LM head quantized
        if requested is not None:
            log.info("cpu_packed_linears=%r: no dense float projection to pack", requested)
        return {**done, "reason": "no dense float projection to pack"}
    if requested is None:
        try:
            seconds = time_layouts(sample, max_num_seqs)
        except RuntimeError as e:        # a oneDNN build that can't reorder this dtype here
            log.warning("dense linears not packed (oneDNN: %s); CPU steps use F.linear", e)
            return {**done, "reason": f"oneDNN: {e}"}
        layout, mkl = choose_layout(seconds, max_num_seqs)
        done["seconds"] = seconds
        measured = _describe(seconds, sum(w.numel() * w.element_size() for w in sample))
        if layout == "dense":
            log.info("float linears kept dense (F.linear) for max_num_seqs=%d: oneDNN's layout was not %.0f%% faster "
                     "(%s); cpu_packed_linears='onednn' or True packs anyway", max_num_seqs, 100 * MARGIN, measured)
            return {**done, "reason": "measured"}
    try:
        extra = model.pack_dense_linears(batch_rows=max_num_seqs if mkl else None, dense=layout != "onednn")
    except RuntimeError as e:           # a oneDNN build that can't reorder this dtype here
        if requested is not None:
            raise UserInputError(f"cpu_packed_linears={requested!r} (--cpu-linears): oneDNN could not pack the weights "
                                 f"({e}); leave it unset (auto)") from None
        log.warning("dense linears not packed (oneDNN: %s); CPU steps use F.linear", e)
        return {**done, "reason": f"oneDNN: {e}"}
    ops = [op for layer in model.layers for op in layer.values()] + [model.lm_head]
    kinds = Counter(op.kind for op in ops if isinstance(op, PackedDenseLinear))
    if layout == "onednn":
        what = (f"packed into oneDNN's layout alone, for every step (the dense weights dropped): "
                f"{extra / 2**20:.1f} MiB more weights")
    else:
        names = {"mkl": f"MKL, for {max_num_seqs}-row decode steps", "onednn": "oneDNN"}
        copies = ", ".join(names[k] if len(kinds) == 1 else f"{n} {names[k]}" for k, n in sorted(kinds.items()))
        what = (f"kept dense for steps of up to {DENSE_MAX_ROWS} rows, with a packed copy for batched CPU steps "
                f"({copies}): {extra / 2**20:.1f} MiB more weights; the dense or onednn layout saves it")
    why = (f"chosen by timing for max_num_seqs={max_num_seqs} ({measured})" if requested is None
           else f"asked by cpu_packed_linears={requested!r}")
    log.info("float linears %s; %s", what, why)
    return {**done, "layout": layout, "extra_bytes": extra, "reason": "measured" if requested is None else why}
