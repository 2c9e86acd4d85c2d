"""KV-cache sizing from a memory budget: one accounting shared by `LLMEngine.from_pretrained` and `plan()`.

    kv_budget   = budget * (1 - reserve) - weights - activation_peak
    num_blocks  = min(kv_budget // (block_size * kv_bytes/token), max_num_seqs * ceil(max_context / block_size))

The budget is what the engine may use in all (weights + activations + KV cache), chosen as:
- `memory_budget="4GiB"` (or bytes): that much;
- `memory_utilization=0.9`: that fraction of the device's memory, as vLLM's gpu_memory_utilization:
  on CUDA of the GPU's total memory, less what other processes used before the weights loaded; on
  CPU of MemAvailable (/proc/meminfo) read before the weights loaded;
- neither: CUDA 0.9 as above; CPU half of MemAvailable, with the KV cache capped at 1 GiB.
An explicit `num_blocks` wins over all of these. The engine's reserve is 0 (its budget already is the
part of the device it owns); `inferforge plan --memory` is the device's whole memory and keeps 10%.

The activation peak is the transient memory of the largest step (`max_step_tokens` tokens). On CUDA
the engine measures it (torch.cuda.max_memory_allocated around a dummy prefill of that many tokens);
on CPU, and in `plan()`, it is this formula, T = max_step_tokens, R = min(T, max_num_seqs) logits rows,
a = bytes per activation element (4 for fp32 weights, else 2):

    activation_peak = T * a * (3 * hidden + (n_heads + 2 * n_kv_heads) * head_dim + 4 * intermediate)
                      + T * 4 * 3 * n_heads * head_dim         (float32 RoPE temporaries)
                      + R * vocab * (a + 4)                    (logits, and their float32 copy)

i.e. the residual stream, the normed input, the fused q/k/v output, the gate/up output with the SiLU
product and its temporary, plus RoPE's float32 copies and the logits.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from inferforge.errors import UserInputError

log = logging.getLogger(__name__)

# The CPU engine's packed copy of dense projections (runtime/cpu_linear.py), counted here so that plan()
# needs no torch: steps of at most DENSE_MAX_ROWS rows run F.linear on the dense weight (measured the
# fastest at 1-3 rows), so the copy is kept by default only when a decode step can have more rows.
DENSE_MAX_ROWS = 3


def packs_by_default(max_num_seqs: int) -> bool:
    """Whether "dense+copy" is a candidate of the timed layout choice (runtime/cpu_linear.py): only when
    a decode step can have more rows than the dense weight serves (below that the copy would serve
    prefill chunks only, for 2x the memory)."""
    return max_num_seqs > DENSE_MAX_ROWS


CPU_KV_CAP_BYTES = 2**30          # default on CPU: at most 1 GiB of KV cache
CPU_DEFAULT_FRACTION = 0.5        # default on CPU: half of MemAvailable
CUDA_DEFAULT_UTILIZATION = 0.9


@dataclass(frozen=True)
class KVPlan:
    """What the engine chose for its KV cache, and from which numbers (`engine.kv_plan`)."""

    budget_bytes: int               # what the engine may use in all; 0 when num_blocks was given
    budget_from: str                # how the budget was chosen
    weight_bytes: int
    activation_peak_bytes: int
    activation_from: str            # "measured (torch.cuda.max_memory_allocated)" or "formula"
    kv_bytes_per_token: int
    kv_budget_bytes: int
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_context: int

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_tokens * self.kv_bytes_per_token

    @property
    def max_concurrent_at_max_context(self) -> int:
        return self.num_blocks // blocks_for(self.max_context, self.block_size)

    def as_dict(self) -> dict:
        return {**asdict(self), "kv_tokens": self.kv_tokens, "kv_cache_bytes": self.kv_cache_bytes,
                "max_concurrent_at_max_context": self.max_concurrent_at_max_context}

    def describe(self) -> str:
        mib = 2**20
        return (f"KV cache: budget {self.budget_bytes / mib:.1f} MiB ({self.budget_from}); weights "
                f"{self.weight_bytes / mib:.1f} MiB, activation peak {self.activation_peak_bytes / mib:.1f} MiB "
                f"({self.activation_from}); {self.num_blocks} blocks x {self.block_size} = {self.kv_tokens} tokens "
                f"({self.kv_cache_bytes / mib:.1f} MiB), {self.max_concurrent_at_max_context} concurrent sequences "
                f"at max_context {self.max_context} (max_num_seqs {self.max_num_seqs})")


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def kv_bytes_per_token(layers: int, n_kv_heads: int, head_dim: int, dtype_bytes: float) -> int:
    """K and V, every layer: 2 * layers * n_kv_heads * head_dim * bytes."""
    return int(2 * layers * n_kv_heads * head_dim * dtype_bytes)


def activation_peak_formula(*, hidden: int, intermediate: int, n_heads: int, n_kv_heads: int, head_dim: int,
                            vocab: int, step_tokens: int, max_num_seqs: int, act_bytes: int) -> int:
    """The module docstring's formula for one step of `step_tokens` tokens."""
    rows = min(step_tokens, max_num_seqs)
    per_token = act_bytes * (3 * hidden + (n_heads + 2 * n_kv_heads) * head_dim + 4 * intermediate)
    return int(step_tokens * per_token + step_tokens * 4 * 3 * n_heads * head_dim + rows * vocab * (act_bytes + 4))


def kv_budget_bytes(budget_bytes: float, *, weight_bytes: int, activation_peak_bytes: int, reserve: float = 0.0) -> int:
    return int(budget_bytes * (1 - reserve) - weight_bytes - activation_peak_bytes)


def num_blocks_for(kv_budget: int, *, kv_per_token: int, block_size: int, max_num_seqs: int, max_context: int) -> int:
    """Whole blocks the KV budget holds, never more than `max_num_seqs` sequences of `max_context` need."""
    fit = max(kv_budget, 0) // (kv_per_token * block_size)
    return int(min(fit, max_num_seqs * blocks_for(max_context, block_size)))


def check_memory_options(memory_budget, memory_utilization) -> int | None:
    """Validates the two budget options; returns the budget in bytes (None when not given)."""
    from inferforge.runtime.plan import parse_bytes

    if memory_budget is not None and memory_utilization is not None:
        raise UserInputError("give memory_budget or memory_utilization, not both")
    if memory_utilization is not None and (isinstance(memory_utilization, bool) or
                                           not isinstance(memory_utilization, (int, float)) or
                                           not 0 < memory_utilization <= 1):
        raise UserInputError(f"memory_utilization must be a fraction in (0, 1], got {memory_utilization!r}")
    if memory_budget is None:
        return None
    try:
        budget = parse_bytes(memory_budget)
    except UserInputError:
        raise UserInputError(f"memory budget {memory_budget!r}: give a size such as 4GiB, 512MiB or a number "
                             "of bytes") from None
    if budget <= 0:
        raise UserInputError(f"memory budget must be more than 0 bytes, got {memory_budget!r}")
    return budget


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere psutil's available memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def device_memory_before_load(device) -> dict:
    """What the device has before the weights load: CUDA total and free bytes, or CPU MemAvailable."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"total": total, "free": free}
    return {"available": mem_available_bytes()}


def resolve_budget(device, before: dict, budget: int | None, utilization: float | None, *, weight_bytes: int,
                   activation_peak_bytes: int) -> tuple[int, str]:
    """The engine's total budget in bytes and a phrase saying how it was chosen."""
    gib = 2**30
    if budget is not None:
        return budget, "memory_budget"
    if device.type == "cuda":
        fraction = utilization if utilization is not None else CUDA_DEFAULT_UTILIZATION
        used_by_others = before["total"] - before["free"]
        how = "memory_utilization" if utilization is not None else "default"
        return (int(fraction * before["total"] - used_by_others),
                f"{how} {fraction:g} of {before['total'] / gib:.1f} GiB less {used_by_others / gib:.2f} GiB in use")
    available = before["available"]
    if utilization is not None:
        return int(utilization * available), f"memory_utilization {utilization:g} of MemAvailable {available / gib:.1f} GiB"
    capped = min(CPU_DEFAULT_FRACTION * available, weight_bytes + activation_peak_bytes + CPU_KV_CAP_BYTES)
    return int(capped), (f"default: {CPU_DEFAULT_FRACTION:g} of MemAvailable {available / gib:.1f} GiB, KV cache at "
                         f"most {CPU_KV_CAP_BYTES / gib:g} GiB")


def size_cache(*, budget_bytes: int, budget_from: str, weight_bytes: int, activation_peak_bytes: int,
               activation_from: str, kv_per_token: int, block_size: int, max_num_seqs: int, max_context: int,
               window: int, context_given: bool) -> KVPlan:
    """The engine's plan. When `max_context` was not given and one sequence of the model's window does
    not fit, the context shrinks to what fits (logged); a context the caller asked for that does not
    fit raises UserInputError with the numbers and the ways out."""
    kv_budget = kv_budget_bytes(budget_bytes, weight_bytes=weight_bytes, activation_peak_bytes=activation_peak_bytes)
    fit_tokens = max(kv_budget, 0) // (kv_per_token * block_size) * block_size
    if fit_tokens < max_context and not context_given and fit_tokens >= block_size:
        log.warning("the model's window (%d tokens) does not fit the KV budget; max_context lowered to %d",
                    window, fit_tokens)
        max_context = fit_tokens
    if fit_tokens < max_context:
        mib = 2**20
        raise UserInputError(
            f"the KV cache cannot hold one sequence of max_context {max_context} tokens: budget "
            f"{budget_bytes / mib:.1f} MiB ({budget_from}) - weights {weight_bytes / mib:.1f} MiB - activation peak "
            f"{activation_peak_bytes / mib:.1f} MiB ({activation_from}) leaves {kv_budget / mib:.1f} MiB = "
            f"{fit_tokens} tokens at {kv_per_token} bytes per token, {max_context} needed; give more memory "
            "(memory_budget / --memory-budget), a smaller max_context (--max-context), an fp8 or int8 KV cache "
            "(--kv-cache-dtype fp8), or fewer sequences at a time (max_num_seqs)")
    num_blocks = num_blocks_for(kv_budget, kv_per_token=kv_per_token, block_size=block_size,
                                max_num_seqs=max_num_seqs, max_context=max_context)
    return KVPlan(budget_bytes, budget_from, weight_bytes, activation_peak_bytes, activation_from, kv_per_token,
                  kv_budget, block_size, num_blocks, max_num_seqs, max_context)


# ---------------------------------------------------------------------- the engine's side
def model_weight_bytes(model) -> int:
    """Bytes of the loaded weights (dense tensors, quantized modules' tensors and the CPU's packed
    copies of dense projections), each storage once;
    the RoPE frequencies are not weights and are left out, as `plan()` counts them."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        elif isinstance(t, torch.nn.Module):
            for x in (*t.parameters(), *t.buffers()):
                add(x)
        elif hasattr(t, "packed_bytes"):         # runtime/cpu_linear.py: the dense weight (when kept) and its packed copy
            add(t.weight)
            add(t.bias)
            total += t.packed_bytes
        elif hasattr(t, "tensors"):              # kernels/cpu_packed.py: a quantized layer's packed CPU form
            for x in t.tensors():
                add(x)

    for t in (model.embed, model.norm, model.lm_head):
        add(t)
    for layer in model.layers:
        for t in layer.values():
            add(t)
    return total


def activation_peak_for(model, *, max_step_tokens: int, max_num_seqs: int) -> int:
    """The formula (module docstring) for a loaded model."""
    import torch

    s = model.spec
    return activation_peak_formula(hidden=s.hidden_size, intermediate=s.intermediate_size, n_heads=s.n_heads,
                                   n_kv_heads=s.n_kv_heads, head_dim=s.head_dim, vocab=s.vocab_size,
                                   step_tokens=max_step_tokens, max_num_seqs=max_num_seqs,
                                   act_bytes=4 if model.dtype == torch.float32 else 2)


def measure_activation_peak_cuda(model, *, max_step_tokens: int, max_num_seqs: int, kv_cache_dtype) -> int:
    """Peak bytes allocated by one dummy prefill step of `max_step_tokens` tokens (with min(T, max_num_seqs)
    logits rows) over what was allocated before it; its scratch KV cache is allocated before the
    measurement starts, so it is not counted."""
    import torch

    from inferforge.kernels import PagedKVCache
    from inferforge.runtime.llama import StepBatch

    s, device, tokens = model.spec, model.device, max_step_tokens
    block_size = 16
    scratch = PagedKVCache(num_layers=s.num_layers, num_blocks=blocks_for(tokens, block_size), n_kv_heads=s.n_kv_heads,
                           head_dim=s.head_dim, block_size=block_size, dtype=kv_cache_dtype, device=device)
    rows = min(tokens, max_num_seqs)
    batch = StepBatch(tokens=torch.zeros(tokens, dtype=torch.long, device=device),
                      positions=torch.arange(tokens, device=device),
                      slot_mapping=torch.arange(tokens, device=device), num_decode=0,
                      prefill=[(tokens, tokens, list(range(scratch.num_blocks)))],
                      logits_rows=torch.arange(tokens - rows, tokens, device=device))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        model.forward(batch, scratch)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del scratch, batch
    torch.cuda.empty_cache()
    return int(peak)


def plan_engine_cache(model, before: dict | None, *, budget: int | None, utilization: float | None,
                      num_blocks: int | None, block_size: int, max_num_seqs: int, max_context: int,
                      context_given: bool, max_step_tokens: int, cache_dtype) -> KVPlan:
    """`LLMEngine.from_pretrained`'s KV plan for a loaded model: `num_blocks` when given, else sized from
    the budget (`before`: `device_memory_before_load`, read before the weights loaded)."""
    import torch

    spec, device = model.spec, model.device
    per_token = kv_bytes_per_token(spec.num_layers, spec.n_kv_heads, spec.head_dim,
                                   torch.empty(0, dtype=cache_dtype).element_size())
    weights = model_weight_bytes(model)
    if num_blocks is not None:
        return KVPlan(0, "num_blocks given", weights, 0, "not measured", per_token, 0, block_size, num_blocks,
                      max_num_seqs, max_context)
    if device.type == "cuda":
        peak = measure_activation_peak_cuda(model, max_step_tokens=max_step_tokens, max_num_seqs=max_num_seqs,
                                            kv_cache_dtype=cache_dtype)
        peak_from = "measured (torch.cuda.max_memory_allocated)"
    else:
        peak, peak_from = activation_peak_for(model, max_step_tokens=max_step_tokens, max_num_seqs=max_num_seqs), "formula"
    total, how = resolve_budget(device, before, budget, utilization, weight_bytes=weights, activation_peak_bytes=peak)
    return size_cache(budget_bytes=total, budget_from=how, weight_bytes=weights, activation_peak_bytes=peak,
                      activation_from=peak_from, kv_per_token=per_token, block_size=block_size,
                      max_num_seqs=max_num_seqs, max_context=max_context, window=spec.max_position_embeddings,
                      context_given=context_given)


# ---------------------------------------------------------------------- command-line flags
CPU_LINEAR_FLAGS = {"auto": None, "dense": False, "copy": True, "onednn": "onednn"}   # --cpu-linears -> cpu_packed_linears
CPU_LAYOUT_FLAGS = {"dense": "dense", "dense+copy": "copy", "onednn": "onednn"}   # engine.cpu_linears layout -> --cpu-linears


def add_memory_flags(parser) -> None:
    """`--memory-budget`, `--memory-utilization` and `--cpu-linears` (the CPU weight layout, which sets
    the weights' memory) for the commands that build an engine."""
    parser.add_argument("--memory-budget", metavar="SIZE",
                        help="memory the engine may use (weights + activations + KV cache), e.g. 4GiB; the KV "
                             "cache gets what is left (default: 0.9 of the GPU, or on CPU half of MemAvailable "
                             "with at most 1 GiB of KV cache)")
    parser.add_argument("--memory-utilization", type=float, metavar="FRACTION",
                        help="fraction of the device's memory the engine may use, as vLLM's gpu_memory_utilization "
                             "(on CPU: of MemAvailable)")
    parser.add_argument("--cpu-linears", choices=list(CPU_LINEAR_FLAGS), default="auto",
                        help="how float projections run on a CPU: auto (default: timed at load, the fastest kept), "
                             "dense (F.linear), copy (dense weights plus a packed copy for batched steps), onednn "
                             "(oneDNN's layout only); pin one for repeatable KV-cache sizes")


def memory_kwargs(args) -> dict:
    """The engine keyword arguments for the flags, checked so a message names the flag; only those given
    (an exported ONNX decoder takes none)."""
    budget, utilization = getattr(args, "memory_budget", None), getattr(args, "memory_utilization", None)
    layout = CPU_LINEAR_FLAGS[getattr(args, "cpu_linears", None) or "auto"]
    pinned = {} if layout is None else {"cpu_packed_linears": layout}
    if budget is not None and utilization is not None:
        raise UserInputError("give --memory-budget or --memory-utilization, not both")
    if utilization is not None and not 0 < utilization <= 1:
        raise UserInputError(f"--memory-utilization must be a fraction in (0, 1], got {utilization}")
    if budget is not None:
        from inferforge.runtime.plan import parse_bytes

        try:
            size = parse_bytes(budget)
        except UserInputError:
            raise UserInputError(f"--memory-budget {budget!r}: give a size such as 4GiB, 512MiB or 2GB") from None
        if size <= 0:
            raise UserInputError(f"--memory-budget must be more than 0 bytes, got {budget!r}")
        return {"memory_budget": size, **pinned}
    return ({"memory_utilization": utilization} if utilization is not None else {}) | pinned
