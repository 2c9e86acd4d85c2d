"""`explain`'s measured column: the shipped H100 table (package data), a recorded table, which GPUs it
applies to, and the flag for formats whose measurements fall short of the roofline."""

import json
from pathlib import Path

import pytest

from inferforge.cli import main
from inferforge.optimize.explain import explain
from inferforge.optimize.explain_measured import load_table

LLAMA_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
            "num_hidden_layers": 32}
BENCH_JSON = Path(__file__).resolve().parents[1] / "bench" / "results" / "h100-2026-11-26-quant-matmul.json"


@pytest.fixture
def llama8b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return tmp_path


def test_shipped_table_matches_its_source():
    table, source = load_table(), json.loads(BENCH_JSON.read_text())
    assert table["source"] == "bench/results/h100-2026-11-26-quant-matmul.json"
    assert table["gpu"] == source["environment"]["gpu"] and table["date"] == source["environment"]["date"]
    assert len(table["rows"]) == len(source["rows"])
    for ours, theirs in zip(table["rows"], source["rows"], strict=True):
        assert (ours["format"], ours["m"], ours["n"], ours["k"]) == (theirs["format"], theirs["m"], theirs["n"], theirs["k"])
        assert ours["measured_speedup"] == pytest.approx(theirs["speedup"], abs=1e-4)
        assert ours["roofline_fraction"] == pytest.approx(theirs["speedup"] / theirs["predicted_speedup"], abs=1e-4)


def test_int4_at_batch_1_is_flagged_on_h100(llama8b):
    result = explain(llama8b, fmt="int4-g128", batch=1, gpu="h100")
    measured = result["measured"]
    assert measured["flagged"] and not measured["proxy"] and measured["gpu"] == "NVIDIA H100 80GB HBM3"
    assert any("gate/up_proj (14336x4096): 0.93x measured, slower than bf16" in r for r in measured["reasons"])
    assert any("q/o_proj (4096x4096): 1.11x measured against 3.55x predicted" in r for r in measured["reasons"])
    q = next(r for r in result["layers"] if r["layer"] == "q_proj")
    k = next(r for r in result["layers"] if r["layer"] == "k_proj")        # 1024 x 4096: not a measured shape
    assert q["measured_speedup"] == pytest.approx(1.1077, abs=1e-3)
    assert k["measured_speedup"] is None and k["measured_shape"] == "4096x4096"
    assert k["calibrated_speedup"] == pytest.approx(k["predicted_speedup"] * 0.3121, rel=1e-3)
    assert 0.9 < measured["calibrated_speedup"] < 1.3 < 3.3 < result["predicted_speedup"]


def test_fp8_at_4096_is_not_flagged(llama8b):
    measured = explain(llama8b, fmt="fp8", batch=4096, gpu="h100")["measured"]
    assert measured["flagged"] is False and measured["reasons"] == []
    assert 1.3 < measured["calibrated_speedup"] < 1.7


def test_h200_shows_h100_data_labelled_and_a100_none(llama8b):
    h200 = explain(llama8b, fmt="int8-weight-only", batch=64, gpu="h200")["measured"]
    assert h200["proxy"] and h200["label"] == "measured on NVIDIA H100 80GB HBM3, not on NVIDIA H200 SXM"
    assert h200["flagged"]
    a100 = explain(llama8b, fmt="int8-weight-only", batch=1, gpu="a100")["measured"]
    assert a100 == {"flagged": None, "note": "no kernel measurements for NVIDIA A100 SXM 80GB"}


def test_unmeasured_batch_is_said_not_interpolated(llama8b):
    measured = explain(llama8b, fmt="int4-g128", batch=8, gpu="h100")["measured"]
    assert measured["flagged"] is None and measured["note"] == "int4-g128 not measured at batch 8 (measured: 1, 16, 64, 256)"


def test_recorded_table(llama8b):
    recorded = {"gpu_key": "h100", "gpu": "Recorded H100", "date": "2026-12-01", "source": "test",
                "rows": [{"format": "w8a8", "m": 32, "layer": "x", "n": 4096, "k": 4096, "measured_speedup": 1.5,
                          "predicted_speedup": 1.6, "roofline_fraction": 1.5 / 1.6}]}
    result = explain(llama8b, fmt="w8a8", batch=32, gpu="h100", measured_tables=[recorded])
    assert result["measured"]["flagged"] is False and result["measured"]["gpu"] == "Recorded H100"
    for layer in result["layers"]:
        assert layer["calibrated_speedup"] == pytest.approx(layer["predicted_speedup"] * 1.5 / 1.6)
    recorded["rows"][0].update(measured_speedup=0.7, roofline_fraction=0.7 / 1.6)
    assert explain(llama8b, fmt="w8a8", batch=32, gpu="h100", measured_tables=[recorded])["measured"]["flagged"]


def test_cli_shows_measured_columns_and_flag(llama8b, capsys):
    assert main(["explain", str(llama8b), "--format", "int4-g128", "--batch", "1", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "calibrated" in out
    assert "does not pay: bf16 is faster" in " ".join(out.split())
    assert "FLAGGED: int4-g128 at batch 1 falls short of the roofline" in out
    assert "bench/results/h100-2026-11-26-quant-matmul.json" in out
    assert main(["explain", str(llama8b), "--format", "w8a8", "--batch", "1", "--gpu", "l40s"]) == 0
    assert "measured: no kernel measurements for NVIDIA L40S" in capsys.readouterr().out
