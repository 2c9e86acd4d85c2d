"""Will it be faster? A roofline prediction per layer, before anything runs.

For a linear layer y[M, N] = x[M, K] W[N, K]^T at batch (tokens) M:
    work  = 2 M N K FLOPs
    bytes = activations read + weights read (at the format's bits) + scales + output written
    time  = max(work / compute peak of the format, bytes / memory bandwidth)
    arithmetic intensity = work / bytes; the layer is memory-bound below the GPU's ridge point
    (peak / bandwidth) and compute-bound above it.
Predicted speed-up of a format = time(bf16) / time(format). Weight-only formats compute at the
bf16 rate (they dequantize to bf16), W8A8 and FP8 at the int8 / fp8 tensor-core rate. These are
upper bounds: real kernels lose to launch overhead, dequantization work and imperfect overlap.

A format whose matmul the GPU has no tensor cores for (fp8 before Ada / Hopper: the A100) is not
predicted at all: the result says so (`native: false`, no speed-up), since an emulation's speed
depends on the emulation, not the roofline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inferforge.checkpoint_files import read_config
from inferforge.errors import UserInputError


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_tflops: float           # dense
    int8_tops: float             # dense int8 tensor cores
    hbm_tbs: float
    fp8_tflops: float | None     # dense fp8 (e4m3) tensor cores; None: the GPU has none
    architecture: str = ""

    def peak(self, rate: str) -> float | None:
        """Dense peak in FLOP/s for a compute rate ("bf16", "int8" or "fp8"); None when not native."""
        tera = {"bf16": self.bf16_tflops, "int8": self.int8_tops, "fp8": self.fp8_tflops}[rate]
        return None if tera is None else tera * 1e12


GPUS = {
    "h100": GPUSpec("NVIDIA H100 SXM", 989.0, 1979.0, 3.35, 1979.0, "Hopper"),
    "h200": GPUSpec("NVIDIA H200 SXM", 989.0, 1979.0, 4.8, 1979.0, "Hopper"),
    "a100": GPUSpec("NVIDIA A100 SXM 80GB", 312.0, 624.0, 2.04, None, "Ampere"),      # no fp8 tensor cores
    "l40s": GPUSpec("NVIDIA L40S", 362.0, 733.0, 0.864, 733.0, "Ada"),
}

# bits per weight, bytes per activation element read, compute rate ("bf16", "int8" or "fp8"), extra bytes per
# output channel
FORMATS = {
    "bf16": (16, 2, "bf16", 0),
    "int8-weight-only": (8, 2, "bf16", 4),
    "int4-g128": (4 + 64 / 128, 2, "bf16", 0),       # + fp32 scale and zero per 128 weights
    "w8a8": (8, 1, "int8", 4),
    "fp8": (8, 1, "fp8", 4),
}


def native_on(fmt: str, gpu: GPUSpec) -> bool:
    """Whether `gpu` has tensor cores for the matmul of `fmt`."""
    return gpu.peak(FORMATS[fmt][2]) is not None


def layer_shapes(config: dict) -> list[tuple[str, int, int]]:
    """(name, N, K) of one decoder layer's linears for a Llama-family config."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    inter = config["intermediate_size"]
    return [("q_proj", heads * head_dim, hidden), ("k_proj", kv, hidden), ("v_proj", kv, hidden),
            ("o_proj", hidden, heads * head_dim), ("gate_proj", inter, hidden), ("up_proj", inter, hidden),
            ("down_proj", hidden, inter)]


def predict(n: int, k: int, m: int, fmt: str, gpu: GPUSpec) -> dict:
    bits, act_bytes, rate, per_channel = FORMATS[fmt]
    work = 2.0 * m * n * k
    moved = m * k * act_bytes + n * k * bits / 8 + n * per_channel + m * n * 2
    if act_bytes == 1:
        moved += m * k * 3          # quantizing the activations first: read them in bf16, write 8 bits
    peak = gpu.peak(rate)
    if peak is None:
        raise UserInputError(f"{gpu.name} has no {rate} tensor cores: {fmt} does not run natively on it")
    time = max(work / peak, moved / (gpu.hbm_tbs * 1e12))
    ridge = peak / (gpu.hbm_tbs * 1e12)
    intensity = work / moved
    return {"flops": work, "bytes": moved, "intensity": intensity, "ridge": ridge,
            "bound": "memory" if intensity < ridge else "compute", "time_s": time}


def explain(model_dir: str | Path, *, fmt: str, batch: int, gpu: str = "h100", measured_tables=None) -> dict:
    """Per layer of one decoder block (repeated num_hidden_layers times): intensity, bound and the
    predicted speed-up of `fmt` over bf16 at `batch` tokens; next to it, where kernel measurements
    exist for the GPU, the measured and calibrated speed-ups and a flag when the measurements fall short
    of the roofline (`explain_measured.calibrate`; `measured_tables`: the shipped table by default)."""
    from inferforge.optimize.explain_measured import calibrate

    if fmt not in FORMATS or fmt == "bf16":
        raise UserInputError(f"format {fmt!r}: choose one of {', '.join(f for f in FORMATS if f != 'bf16')}")
    if gpu not in GPUS:
        raise UserInputError(f"gpu {gpu!r}: choose one of {', '.join(GPUS)}")
    if batch < 1:
        raise UserInputError(f"batch must be >= 1, got {batch}")
    config = read_config(model_dir, what="a Hugging Face decoder directory")
    try:
        shapes = layer_shapes(config)
    except KeyError as e:
        raise UserInputError(f"{Path(model_dir) / 'config.json'}: missing {e.args[0]}; is this a decoder "
                             "(Llama, Mistral, Qwen2) config?") from None
    spec = GPUS[gpu]
    if not native_on(fmt, spec):
        rate = FORMATS[fmt][2]
        return calibrate({"gpu": spec.name, "format": fmt, "batch": batch, "native": False, "layers": [],
                "predicted_speedup": None, "num_hidden_layers": config.get("num_hidden_layers"), "pays": False,
                "note": f"{spec.name} ({spec.architecture}) has no {rate} tensor cores, so {fmt} does not run "
                        "natively on it and no gain is predicted; on this GPU choose w8a8 or a weight-only format"},
                         gpu, measured_tables)
    rows, base_total, fmt_total = [], 0.0, 0.0
    for name, n, k in shapes:
        base, quant = predict(n, k, batch, "bf16", spec), predict(n, k, batch, fmt, spec)
        base_total += base["time_s"]
        fmt_total += quant["time_s"]
        rows.append({"layer": name, "n": n, "k": k, "bf16_intensity": base["intensity"], "bf16_bound": base["bound"],
                     "intensity": quant["intensity"], "ridge": quant["ridge"], "bound": quant["bound"],
                     "predicted_speedup": base["time_s"] / quant["time_s"], "bf16_time_s": base["time_s"]})
    return calibrate({"gpu": spec.name, "format": fmt, "batch": batch, "native": True, "layers": rows,
                      "predicted_speedup": base_total / fmt_total, "num_hidden_layers": config["num_hidden_layers"],
                      "pays": base_total / fmt_total > 1.0}, gpu, measured_tables)
