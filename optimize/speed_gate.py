"""The speed gate: a quantized causal LM must be at least `min_speedup` times faster than bf16.

Measured on a CUDA GPU in one process: the original model in bf16 and the quantized model (its
float layers in bf16, its quantized buffers as stored) each run one forward of `at_batch`
sequences of one token without a KV cache, so every linear layer runs at M = `at_batch` as in a
decode step. The two are timed interleaved (bf16, quantized, bf16, ...) after a warm-up, which also
lets the kernel tuner and the weight-only dispatcher measure their shapes; the speed-up is
median(bf16 time) / median(quantized time).

Without a CUDA GPU nothing is measured: the gate's status is "skipped" with its reason, which the
command line, the report and the manifest show. A skipped gate is never counted as passed.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from inferforge.errors import UserInputError

SKIP_REASON = "speed gate needs a CUDA GPU; skipped"


def cuda_available() -> bool:
    """Whether the gate can measure (a seam for tests of the measured path on a CPU machine)."""
    return torch.cuda.is_available()


@dataclass(frozen=True)
class SpeedGate:
    min_speedup: float
    at_batch: int = 1
    warmup: int = 3
    repetitions: int = 15

    def __post_init__(self):
        if isinstance(self.min_speedup, bool) or not isinstance(self.min_speedup, (int, float)) \
                or not 0 < self.min_speedup < float("inf"):
            raise UserInputError(f"min_speedup must be a number > 0 (1.2: at least 1.2x faster than bf16), got "
                                 f"{self.min_speedup!r}")
        if isinstance(self.at_batch, bool) or not isinstance(self.at_batch, int) or self.at_batch < 1:
            raise UserInputError(f"at_batch must be an integer >= 1 (sequences per decode step), got {self.at_batch!r}")
        if self.repetitions < 3 or self.warmup < 0:
            raise UserInputError("the speed gate needs repetitions >= 3 and warmup >= 0")

    def describe(self) -> str:
        return f"speed-up over bf16 >= {self.min_speedup:g}x at batch {self.at_batch}"


def decide(gate: SpeedGate, bf16_ms: list[float], quantized_ms: list[float], *, device: str = "") -> dict:
    """The gate's record from the interleaved timings (milliseconds): medians, speed-up, status."""
    if len(bf16_ms) != len(quantized_ms) or not bf16_ms:
        raise ValueError("the speed gate needs as many bf16 as quantized timings, at least one")
    bf16, quant = statistics.median(bf16_ms), statistics.median(quantized_ms)
    speedup = bf16 / quant if quant > 0 else float("inf")
    return {"name": f"speed-up over bf16 at batch {gate.at_batch}", "kind": "speed",
            "status": "passed" if speedup >= gate.min_speedup else "failed", "passed": speedup >= gate.min_speedup,
            "measured": speedup, "op": ">=", "limit": gate.min_speedup, "at_batch": gate.at_batch,
            "bf16_ms": bf16, "quantized_ms": quant, "repetitions": len(bf16_ms), "device": device,
            "method": "interleaved forwards of at_batch one-token sequences, no KV cache; median ms"}


def skipped(gate: SpeedGate, reason: str = SKIP_REASON) -> dict:
    return {"name": f"speed-up over bf16 at batch {gate.at_batch}", "kind": "speed", "status": "skipped",
            "passed": None, "measured": None, "op": ">=", "limit": gate.min_speedup, "at_batch": gate.at_batch,
            "reason": reason}


def _to_bf16_except_quantized(model: torch.nn.Module, device) -> torch.nn.Module:
    """A copy of `model` on `device` with float parameters and buffers in bf16, except inside the
    quantized layers, whose scales and zero points must keep the dtype the kernels expect."""
    from inferforge.optimize.quantize import FP8Linear, Int4WeightOnlyLinear, Int8WeightOnlyLinear, W8A8Linear

    quantized_types = (Int8WeightOnlyLinear, Int4WeightOnlyLinear, W8A8Linear, FP8Linear)
    model = copy.deepcopy(model).to(device)
    for module in model.modules():
        if isinstance(module, quantized_types):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(module, name, b.to(torch.bfloat16))
    return model.eval()


def _time_forward_ms(model, inputs) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=inputs, use_cache=False)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure_on_gpu(gate: SpeedGate, original, quantized, *, vocab_size: int,
                   timer: Callable = _time_forward_ms) -> tuple[list[float], list[float], str]:
    """Interleaved forward times (ms) of the bf16 original and the quantized model on the current GPU,
    and the GPU's name."""
    device = torch.device("cuda")
    bf16 = _to_bf16_except_quantized(original, device)
    quant = _to_bf16_except_quantized(quantized, device)
    inputs = torch.randint(0, vocab_size, (gate.at_batch, 1), device=device)
    for _ in range(gate.warmup):
        timer(bf16, inputs)
        timer(quant, inputs)
    bf16_ms, quant_ms = [], []
    for _ in range(gate.repetitions):
        bf16_ms.append(timer(bf16, inputs))
        quant_ms.append(timer(quant, inputs))
    del bf16, quant
    torch.cuda.empty_cache()
    return bf16_ms, quant_ms, torch.cuda.get_device_name(device)


def evaluate(gate: SpeedGate, original, quantized, *, vocab_size: int, measure: Callable | None = None) -> dict:
    """The gate's record: "skipped" (with its reason) without a CUDA GPU, else "passed" or "failed"
    from `measure(gate, original, quantized, vocab_size=...)` -> (bf16 ms list, quantized ms list,
    device name); `measure_on_gpu` by default."""
    if not cuda_available():
        return skipped(gate)
    bf16_ms, quant_ms, device = (measure or measure_on_gpu)(gate, original, quantized, vocab_size=vocab_size)
    return decide(gate, bf16_ms, quant_ms, device=device)


def describe_record(record: dict) -> str:
    """One line for the command line and the report."""
    if record["status"] == "skipped":
        return f"speed gate: SKIPPED ({record['reason']}; not counted as passed)"
    verdict = "PASS" if record["passed"] else "FAILED"
    return (f"speed gate: {verdict} ({record['measured']:.2f}x over bf16 at batch {record['at_batch']}, limit "
            f"{record['limit']:g}x; bf16 {record['bf16_ms']:.3f} ms, quantized {record['quantized_ms']:.3f} ms, "
            f"median of {record['repetitions']} on {record['device']})")
