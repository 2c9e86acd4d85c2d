"""`explain`'s measured column: the roofline prediction next to what the kernels reached on a GPU.

The shipped table (`optimize/data/measured_matmul_h100.json`, derived from
bench/results/h100-2026-11-26-quant-matmul.json) holds, per format, batch M and layer shape, the
measured speed-up over bf16 (cuBLAS) and `roofline_fraction` = measured / predicted speed-up.

Which GPUs it applies to: H100 data to the H100. The H200 has the same Hopper SMs with 1.4x the
memory bandwidth; H100 data are shown for it labelled "measured on H100", since no H200 was
measured, and the kernels' shortfall at small M is latency, not bytes (bench NOTES). A100 and L40S
get no measured column.

Per layer of the explained model at batch M (measured M only, never interpolated between batch sizes):
- `measured_speedup`: the measurement at the same (N, K), when the table has that shape;
- `calibrated_speedup`: the layer's roofline prediction times the `roofline_fraction` of the measured
  shape nearest in weight size (N x K).
A format is flagged when a measurement at this M reaches less than `SHORT_OF_ROOFLINE` (half) of its
predicted speed-up, or is slower than bf16 where the roofline predicts a gain.
"""

from __future__ import annotations

import json
import math
from importlib import resources

SHORT_OF_ROOFLINE = 0.5
_APPLIES = {"h100": ("h100", False), "h200": ("h100", True)}   # GPU -> (measured GPU key, measured elsewhere)


def load_table(name: str = "measured_matmul_h100.json") -> dict:
    """The shipped measurement table (package data of inferforge.optimize)."""
    return json.loads(resources.files("inferforge.optimize").joinpath("data", name).read_text(encoding="utf-8"))


def _nearest_shape(rows: list[dict], n: int, k: int) -> dict:
    return min(rows, key=lambda r: abs(math.log(r["n"] * r["k"]) - math.log(n * k)))


def calibrate(result: dict, gpu: str, tables: list[dict] | None = None) -> dict:
    """`result` (from `explain`) with the measured columns added in place; returns it.

    Adds per layer `measured_speedup`, `calibrated_speedup`, `measured_shape`; and `measured`: the
    table's source, GPU and date, whether it was measured on another GPU, the calibrated total
    speed-up, the measurements at this batch and `flagged` with its reasons (None when no table
    applies or the batch was not measured, with `note` saying why)."""
    tables = [load_table()] if tables is None else tables
    fmt, batch = result["format"], result["batch"]
    applies = _APPLIES.get(gpu)
    table = next((t for t in tables if applies and t["gpu_key"] == applies[0]), None)
    if table is None or not result.get("native", True):
        result["measured"] = {"flagged": None, "note": f"no kernel measurements for {result['gpu']}"}
        return result
    rows = [r for r in table["rows"] if r["format"] == fmt and r["m"] == batch]
    info = {"source": table["source"], "gpu": table["gpu"], "date": table["date"], "proxy": applies[1],
            "label": f"measured on {table['gpu']}" + (f", not on {result['gpu']}" if applies[1] else "")}
    if not rows:
        measured_m = sorted({r["m"] for r in table["rows"] if r["format"] == fmt})
        result["measured"] = {**info, "flagged": None, "rows": [],
                              "note": f"{fmt} not measured at batch {batch} (measured: "
                                      f"{', '.join(map(str, measured_m)) or 'none'})"}
        return result
    base_total = calibrated_time = 0.0
    for layer in result["layers"]:
        exact = next((r for r in rows if (r["n"], r["k"]) == (layer["n"], layer["k"])), None)
        near = exact or _nearest_shape(rows, layer["n"], layer["k"])
        layer["measured_speedup"] = exact and exact["measured_speedup"]
        layer["calibrated_speedup"] = layer["predicted_speedup"] * near["roofline_fraction"]
        layer["measured_shape"] = f"{near['n']}x{near['k']}"
        # The layer's bf16 roofline time over its calibrated speed-up: the format's calibrated time.
        base_total += layer["bf16_time_s"]
        calibrated_time += layer["bf16_time_s"] / layer["calibrated_speedup"]
    reasons = []
    for r in rows:
        if r["measured_speedup"] < 1.0 < r["predicted_speedup"]:
            reasons.append(f"{r['layer']} ({r['n']}x{r['k']}): {r['measured_speedup']:.2f}x measured, slower than "
                           f"bf16 where the roofline predicts {r['predicted_speedup']:.2f}x")
        elif r["roofline_fraction"] < SHORT_OF_ROOFLINE:
            reasons.append(f"{r['layer']} ({r['n']}x{r['k']}): {r['measured_speedup']:.2f}x measured against "
                           f"{r['predicted_speedup']:.2f}x predicted ({r['roofline_fraction']:.0%} of the roofline)")
    result["measured"] = {**info, "rows": rows, "calibrated_speedup": base_total / calibrated_time,
                          "flagged": bool(reasons), "reasons": reasons}
    return result
