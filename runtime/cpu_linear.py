"""Dense float linears on the CPU: oneDNN's packed weights for batched steps.

`F.linear` on a `[out, in]` float32 weight is fast for one row (a decode step at batch 1 reads the
weight at close to the memory bandwidth) but slow for a few rows: on 2 cores of a Xeon with
AVX-512, torch 2.13, M = 8 rows ran at 11-15 GB/s of weight against 33-39 GB/s at M = 1. The same
product on a weight reordered once into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`,
run through `mkldnn._linear_pointwise`) ran at 17-20 GB/s at M = 8 and 13 GB/s against 7 GB/s for
the 32000-row LM head; but at M = 1 it was 10-30% slower than `F.linear` (about 50 us more a call).

So `PackedDenseLinear` keeps both: the dense weight for steps of at most `DENSE_MAX_ROWS` rows and
the packed copy for the rest (batched decode, prefill). That is a second copy of every projection
weight: `LLMEngine.from_pretrained(cpu_packed_linears=...)` turns it on by default on the CPU when
more than one sequence may run at once, and its KV-cache budget counts the copy (`packed_bytes`).
Measured in `scripts/bench_engine_cpu.py` (README: "Engine speed on the CPU").
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Steps of at most this many rows use the dense weight (F.linear was faster at M = 1 and 2 above).
DENSE_MAX_ROWS = 2
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


class PackedDenseLinear:
    """`x @ weight.T + bias` for `x` of shape `[rows, in]` (or `[..., in]`): `F.linear` on the dense
    `weight [out, in]` for up to DENSE_MAX_ROWS rows, else oneDNN on a packed copy of it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.packed_bytes = weight.numel() * weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= DENSE_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, self.in_features), self.packed, self.bias,
                                                 "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def __repr__(self) -> str:
        return f"PackedDenseLinear(in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype})"


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
    if requested is None and max_num_seqs == 1:
        log.info("dense linears not packed: max_num_seqs=1 decodes one row a step, where F.linear is faster")
        return
    try:
        extra = model.pack_dense_linears()
    except RuntimeError as e:           # a oneDNN build that can't reorder this dtype here
        if requested:
            raise UserInputError(f"cpu_packed_linears=True: oneDNN could not pack the weights ({e}); "
                                 "leave cpu_packed_linears unset (auto)") from None
        log.warning("dense linears not packed (oneDNN: %s); batched CPU steps use F.linear", e)
        return
    log.info("dense linears packed for batched CPU steps (oneDNN): %.1f MiB more weights; "
             "cpu_packed_linears=False saves it", extra / 2**20)
