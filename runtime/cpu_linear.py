"""Dense float linears on the CPU: packed weights for batched steps.

`F.linear` on a `[out, in]` float32 weight is fast for one row (a decode step at batch 1 reads the
weight at close to the memory bandwidth) but slow for a few rows: on 2 cores of a Xeon with
AVX-512, torch 2.13, M = 8 rows ran at 11-15 GB/s of weight against 33-39 GB/s at M = 1. The same
product on a weight reordered once into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`,
run through `mkldnn._linear_pointwise`) ran at 17-20 GB/s at M = 8 and 13 GB/s against 7 GB/s for
the 32000-row LM head; but at M = 1 it was 10-30% slower than `F.linear` (about 50 us more a call).

MKL's packed SGEMM (`mkl._mkl_reorder_linear_weight(weight, M)`, run through `mkl._mkl_linear`)
packs a float32 weight for one row count M. Streaming the 65 projections of a 16-layer, 1024-wide
Llama (960 MB, so nothing stays in cache) at M = 8: 55-58 ms a pass against oneDNN's 62-70 ms and
`F.linear`'s 91-105 ms; rows padded with zeros up to M cost the same as oneDNN's at 4 rows. At 3
rows `F.linear` was the fastest (47 ms against 53-60 ms). For other row counts `mkl._mkl_linear`
runs MKL's SGEMM on the dense weight (as `F.linear` does: prefill chunks, 10-15% slower than
oneDNN at 64 rows, as fast at 256).

So `PackedDenseLinear` keeps the dense weight for steps of at most `DENSE_MAX_ROWS` rows and one
packed copy for the rest: MKL's, packed for the engine's `max_num_seqs` rows (its full decode batch;
fewer rows are padded to it), when that is `MKL_MIN_ROWS`-`MKL_MAX_ROWS` and the weight float32;
else oneDNN's. That is a second copy of every projection weight (MKL's buffer is nominally larger,
but only the packed weight's pages are ever written, measured as resident memory for weights of 1024 x 1024
and more; each buffer reserves at least about 7.5 MiB of address space, about 2x the weights in all,
and tiny weights cost more than their bytes):
`LLMEngine.from_pretrained(cpu_packed_linears=...)` turns it on by default on the CPU when more than
DENSE_MAX_ROWS sequences may run at once, and its KV-cache budget counts the copy (`packed_bytes`). Measured
end to end in `scripts/bench_engine_cpu.py` (README: "Engine speed on the CPU").
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F

from inferforge.runtime.kv_budget import DENSE_MAX_ROWS, packs_by_default

log = logging.getLogger(__name__)

# Steps of at most DENSE_MAX_ROWS rows (3: F.linear was the fastest at M = 1-3 above) use the dense
# weight; `packs_by_default` keeps the copy only when decode steps can be larger (runtime/kv_budget.py).
# MKL packs for a decode batch of this many rows (max_num_seqs); beyond it, padding a step up to the
# packed row count costs more compute than its weight reads save, and oneDNN packs instead.
MKL_MIN_ROWS, MKL_MAX_ROWS = DENSE_MAX_ROWS + 1, 16
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


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


class PackedDenseLinear:
    """`x @ weight.T + bias` for `x` of shape `[rows, in]` (or `[..., in]`): `F.linear` on the dense
    `weight [out, in]` for up to DENSE_MAX_ROWS rows, else a packed copy of it: MKL's for `batch_rows`
    rows (fewer are padded to it; more run MKL's SGEMM on the dense weight) when `batch_rows` is
    MKL_MIN_ROWS-MKL_MAX_ROWS and MKL can pack the weight, else oneDNN's."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, batch_rows: int | None = None):
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self.batch_rows = None
        if batch_rows is not None and MKL_MIN_ROWS <= batch_rows <= MKL_MAX_ROWS and mkl_packing_available(weight.dtype):
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
        return "mkl" if self.batch_rows is not None else "onednn"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= DENSE_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        if self.batch_rows is not None:
            if rows < self.batch_rows:
                flat = torch.cat([flat, flat.new_zeros(self.batch_rows - rows, self.in_features)])
            out = torch.ops.mkl._mkl_linear(flat, self.packed, self.weight, self.bias, self.batch_rows)[:rows]
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def __repr__(self) -> str:
        rows = f", batch_rows={self.batch_rows}" if self.batch_rows is not None else ""
        return (f"PackedDenseLinear(in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}, "
                f"{self.kind}{rows})")


def pack_dense_linears_if_asked(model, requested: bool | None, max_num_seqs: int) -> None:
    """Apply `cpu_packed_linears` (see `LLMEngine.from_pretrained`): None packs where it pays and is possible."""
    from inferforge.errors import UserInputError

    if requested is False:
        return
    why_not = packing_unavailable_reason(model.device, model.dtype)
    if why_not is not None:
        if requested:
            raise UserInputError(f"cpu_packed_linears=True: {why_not}; leave cpu_packed_linears unset (auto)")
        return
    if requested is None and not packs_by_default(max_num_seqs):
        log.info("dense linears not packed: max_num_seqs=%d decodes at most %d rows a step, where F.linear is the "
                 "fastest; cpu_packed_linears=True packs for prefill", max_num_seqs, max_num_seqs)
        return
    try:
        extra = model.pack_dense_linears(batch_rows=max_num_seqs)
    except RuntimeError as e:           # a oneDNN build that can't reorder this dtype here
        if requested:
            raise UserInputError(f"cpu_packed_linears=True: oneDNN could not pack the weights ({e}); "
                                 "leave cpu_packed_linears unset (auto)") from None
        log.warning("dense linears not packed (oneDNN: %s); batched CPU steps use F.linear", e)
        return
    ops = [op for layer in model.layers for op in layer.values()] + [model.lm_head]
    kinds = Counter(op.kind for op in ops if isinstance(op, PackedDenseLinear))
    names = {"mkl": f"MKL, for {max_num_seqs}-row decode steps", "onednn": "oneDNN"}
    layout = ", ".join(names[k] if len(kinds) == 1 else f"{n} {names[k]}" for k, n in sorted(kinds.items()))
    log.info("dense linears packed for batched CPU steps (%s): %.1f MiB more weights; cpu_packed_linears=False "
             "saves it", layout, extra / 2**20)
