"""Measured dispatch for `flash_attention`: never slower than PyTorch's best SDPA backend.

`bench/kernels/bench_attention.py --dispatch-table FILE` times the Triton kernel and each SDPA backend
(cuDNN, flash, efficient) per shape on a GPU and writes one row per shape. The package ships such a
table as `kernels/data/attention_dispatch.json`; `INFERFORGE_ATTENTION_DISPATCH_TABLE=FILE` points
elsewhere. When the table says, for this GPU and shape, that an SDPA backend beat the kernel,
`flash_attention` calls `scaled_dot_product_attention` under that backend instead and logs it once per
shape. Shapes the table has no row for run the kernel.

A row applies when the GPU name (as `torch.cuda.get_device_name`) and the torch and triton major.minor
versions match, and the shape key matches: dtype, head_dim, causal, n_heads, n_kv_heads and the
sequence-length bucket (the next power of two of the sequence length). Only what SDPA computes
identically, at the shapes the benchmark measures, is dispatched: dense input, seq_q == seq_k (SDPA's
causal mask is top-left aligned, ours bottom-right; the table rows are self-attention), no window, no
varlen or paged KV, no LSE requested, fp16/bf16. A table that cannot be read is logged once, naming the
file and the problem, and every shape then runs the kernel.

`INFERFORGE_ATTENTION_DISPATCH=kernel` (or `flash_attention(..., dispatch=False)`) always runs the
kernel; benchmarks use it to time the kernel itself. `auto` (the default) follows the table; any other
value is refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from inferforge.errors import UserInputError

log = logging.getLogger("inferforge.kernels.attention")

TABLE_ENV = "INFERFORGE_ATTENTION_DISPATCH_TABLE"
MODE_ENV = "INFERFORGE_ATTENTION_DISPATCH"
FORMAT_VERSION = 1
SHIPPED_TABLE = Path(__file__).parent / "data" / "attention_dispatch.json"
SDPA_BACKENDS = ("cudnn", "flash", "efficient")
MODES = ("auto", "kernel")
_LOGGED: set = set()


@dataclass(frozen=True)
class ShapeKey:
    dtype: str              # "bfloat16", "float16"
    head_dim: int
    causal: bool
    n_heads: int
    n_kv_heads: int
    seqlen_bucket: int      # next power of two of the sequence length


def seqlen_bucket(seq: int) -> int:
    return 1 << max(0, seq - 1).bit_length()


def major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def table_row(*, gpu: str, torch_version: str, triton_version: str, key: ShapeKey, kernel_ms: float,
              sdpa_ms: dict[str, float]) -> dict:
    """One row of the table: the kernel's time and every SDPA backend that ran, the best one named."""
    best = min(sdpa_ms, key=sdpa_ms.get) if sdpa_ms else None
    return {"gpu": gpu, "torch": torch_version, "triton": triton_version, **asdict(key), "window": False,
            "varlen": False, "kernel_ms": kernel_ms, "sdpa_ms": sdpa_ms, "best_sdpa": best,
            "best_sdpa_ms": sdpa_ms[best] if best else None}


def table_document(rows: list[dict], note: str) -> dict:
    return {"format": FORMAT_VERSION, "note": note, "rows": rows}


@lru_cache(maxsize=4)
def load_table(path: str) -> dict:
    """The rows of a table file by (gpu, torch major.minor, triton major.minor, ShapeKey); read once.
    A file that is missing or malformed gives no rows (every shape runs the kernel) and one warning."""
    try:
        return _read_table(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("flash_attention: the dispatch table %s cannot be used (%s: %s); every shape runs the Triton "
                    "kernel. Fix or regenerate it with bench_attention --dispatch-table, or unset %s",
                    path, type(e).__name__, e, TABLE_ENV)
        return {}


def _read_table(path: str) -> dict:
    with open(path) as f:
        document = json.load(f)
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise ValueError(f"table format {found!r}, expected {FORMAT_VERSION}")
    fields = ShapeKey.__dataclass_fields__
    rows = {}
    for row in document["rows"]:
        if row.get("window") or row.get("varlen"):
            continue            # such shapes never dispatch to SDPA
        key = ShapeKey(**{name: row[name] for name in fields})
        rows[(row["gpu"].strip().lower(), major_minor(row["torch"]), major_minor(row["triton"]), key)] = row
    return rows


def table_path() -> str:
    return os.environ.get(TABLE_ENV) or str(SHIPPED_TABLE)


def faster_sdpa_backend(gpu: str, key: ShapeKey, *, torch_version: str | None = None,
                        triton_version: str | None = None, path: str | None = None) -> tuple[str, dict] | None:
    """(backend name, row) when the table says that SDPA backend beat the kernel for this GPU and shape;
    None when the kernel won or there is no row (then the kernel runs)."""
    import triton

    rows = load_table(path or table_path())
    row = rows.get((gpu.strip().lower(), major_minor(torch_version or torch.__version__),
                    major_minor(triton_version or triton.__version__), key))
    if row is None or row["best_sdpa"] is None or row["best_sdpa_ms"] >= row["kernel_ms"]:
        return None
    return row["best_sdpa"], row


def sdpa_attention(q, k, v, *, causal: bool, sm_scale: float, backend: str | None) -> torch.Tensor:
    """`flash_attention`'s dense semantics through PyTorch's SDPA: q `[b, s, h, d]`, k/v `[b, s, h_kv, d]`
    (GQA by `enable_gqa`), output `[b, s, h, d]` contiguous. `backend` (cudnn, flash, efficient, math)
    restricts SDPA to that implementation; None lets PyTorch choose. Causal needs seq_q == seq_k."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    if causal and q.shape[1] != k.shape[1]:
        raise ValueError("SDPA's causal mask is top-left aligned: dispatch needs seq_q == seq_k")
    names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    kwargs = dict(is_causal=causal, scale=sm_scale, enable_gqa=q.shape[2] != k.shape[2])
    if backend is None:
        out = scaled_dot_product_attention(*args, **kwargs)
    else:
        with sdpa_kernel(names[backend]):
            out = scaled_dot_product_attention(*args, **kwargs)
    return out.transpose(1, 2).contiguous()


def dispatchable_key(q, k, *, causal, window, varlen, return_lse) -> ShapeKey | None:
    """The table key when SDPA can compute exactly this call, else None."""
    if varlen or return_lse or tuple(window) != (-1, -1) or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if q.shape[1] != k.shape[1]:     # causal: SDPA's mask differs; either way the rows are self-attention
        return None
    return ShapeKey(str(q.dtype).removeprefix("torch."), q.shape[3], bool(causal), q.shape[2], k.shape[2],
                    seqlen_bucket(q.shape[1]))


def maybe_sdpa(q, k, v, *, causal, sm_scale, window, varlen, return_lse) -> torch.Tensor | None:
    """Run the recorded faster SDPA backend for this call, or return None (run the kernel)."""
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise UserInputError(f"{MODE_ENV}={os.environ[MODE_ENV]!r} is not a dispatch mode: use 'auto' (the "
                             "measured table decides) or 'kernel' (always the Triton kernel)")
    if mode == "kernel" or not q.is_cuda or torch.compiler.is_compiling():
        return None
    key = dispatchable_key(q, k, causal=causal, window=window, varlen=varlen, return_lse=return_lse)
    if key is None:
        return None
    choice = faster_sdpa_backend(torch.cuda.get_device_name(q.device), key)
    if choice is None:
        return None
    backend, row = choice
    try:
        out = sdpa_attention(q, k, v, causal=causal, sm_scale=sm_scale, backend=backend)
    except RuntimeError as e:       # the backend refuses this input (strides, build): the kernel runs
        log_once(("failed", key), f"flash_attention: SDPA backend '{backend}' failed for {key}, running the "
                                  f"Triton kernel: {str(e).splitlines()[0][:200]}")
        return None
    log_once(key, f"flash_attention: SDPA backend '{backend}' for {key} (measured {row['best_sdpa_ms']:.3f} ms "
                  f"vs the Triton kernel's {row['kernel_ms']:.3f} ms on {row['gpu']}, {table_path()})")
    return out


def log_once(key, message: str) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(message)
