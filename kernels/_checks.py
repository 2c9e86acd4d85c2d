"""One-line input checks that name the argument, what was expected and what was given."""

from __future__ import annotations

from collections import Counter

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_tensor(name: str, t, *, dims: int, layout: str) -> None:
    check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    check(t.dim() == dims, f"{name} must have {dims} dimensions {layout}, got shape {tuple(t.shape)}")


def check_dtype(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    check(t.dtype in dtypes, f"{name} must be one of {names}, got {str(t.dtype).removeprefix('torch.')}")


def check_same(names: str, *values, what: str) -> None:
    check(all(v == values[0] for v in values), f"{names} must have the same {what}, got {', '.join(map(str, values))}")


def check_last_dim_contiguous(name: str, t) -> None:
    check(t.shape[-1] <= 1 or t.stride(-1) == 1,
          f"{name} must be contiguous in its last dimension (stride 1), got strides {t.stride()}; "
          f"pass {name}.contiguous()")


# Tests set this to fill every kernel-written output with garbage (NaN for floats, the most negative
# value for integers) before launch, so an element the kernel forgets to write fails the comparison.
POISON_OUTPUTS = False


def new_output(shape, dtype, device) -> torch.Tensor:
    """torch.empty for a buffer a kernel fills completely; poisoned when POISON_OUTPUTS is set."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        if dtype.is_floating_point:
            t.fill_(float("nan"))
        else:
            t.fill_(torch.iinfo(dtype).min)
    return t


# How often each op ran its PyTorch reference because the Triton path was not available (a CPU tensor
# without TRITON_INTERPRET=1). The kernel tests assert it stays empty: a test whose kernel silently fell
# back would compare the reference with itself and pass whatever the kernel does.
REFERENCE_FALLBACKS: Counter[str] = Counter()


def reference_fallback(op: str) -> None:
    """Record that `op` ran its PyTorch reference instead of the Triton kernel."""
    REFERENCE_FALLBACKS[op] += 1
