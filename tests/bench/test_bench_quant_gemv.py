"""CPU-side pieces of the quantized-matmul benchmark's decode grid (the timing itself needs a GPU)."""

from inferforge.bench.kernels.bench_quant_matmul import describe_config, to_markdown, weight_only_ms
from inferforge.kernels.weight_only_gemv import GemvConfig
from inferforge.kernels.weight_only_matmul import _DEQUANTIZE_FIRST, TileConfig


def test_decode_grid_and_path_names():
    assert weight_only_ms(False) == (1, 2, 4, 8, 16, 64, 256)
    assert set(weight_only_ms(True)) <= set(weight_only_ms(False)) and 1 in weight_only_ms(True)
    assert describe_config(GemvConfig(64, 128, 8, waves=2)) == "gemv 64x128 w8 waves2"
    assert describe_config(TileConfig(16, 64, 128)) == "16x64x128 w4 waves2"
    assert describe_config(_DEQUANTIZE_FIRST) == "dequantize + cuBLAS"


def test_report_rows_show_speedup_and_bandwidth():
    row = {"format": "int4-g128", "m": 1, "layer": "q/o_proj", "n": 4096, "k": 4096, "ms": 0.005, "bf16_ms": 0.015,
           "tile": "gemv 64x128 w8 waves4", "speedup": 3.0, "tflops": 6.7, "gbs": 1800.0, "predicted_speedup": 3.55}
    env = {"gpu": "NVIDIA H100", "device": "cuda", "torch": "t", "triton": "tr", "cuda": "c", "git_revision": "g",
           "date": "d"}
    text = to_markdown({"environment": env, "ceilings": {"copy_gbs": 3000.0, "bf16_tflops": 700.0, "int8_tops": 690.0},
                        "rows": [row]})
    assert "| int4-g128 | 1 | q/o_proj (4096x4096) | 0.005 | 0.015 | 3.00x | 3.55x | 6.7 | 1.8e+03 | 60% | gemv 64x128" in text
    assert "int4-g128 at M=1: 3.00x to 3.00x over bf16 (target 3.0x): met" in text
