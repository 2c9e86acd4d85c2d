"""`explain` predicts a gain only for formats the GPU runs natively: fp8 needs fp8 tensor cores
(Hopper H100/H200, Ada L40S), which the A100 (Ampere) lacks; int8 tensor cores are on all four."""

import json

import pytest

from inferforge.cli import main
from inferforge.optimize.explain import FORMATS, GPUS, explain, native_on

LLAMA_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
            "num_hidden_layers": 32}
NATIVE = {("a100", "fp8"): False}     # every other (GPU, format) pair runs natively


@pytest.fixture
def llama8b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return tmp_path


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "bf16"])
def test_native_formats_per_gpu(llama8b, gpu, fmt):
    native = NATIVE.get((gpu, fmt), True)
    assert native_on(fmt, GPUS[gpu]) is native
    result = explain(llama8b, fmt=fmt, batch=4096, gpu=gpu)
    assert result["native"] is native
    if native:
        assert result["predicted_speedup"] > 0.9 and len(result["layers"]) == 7
    else:
        assert result["predicted_speedup"] is None and result["pays"] is False and result["layers"] == []
        assert "no fp8 tensor cores" in result["note"]


def test_fp8_on_a100_says_it_does_not_run_natively(llama8b, capsys):
    assert main(["explain", str(llama8b), "--format", "fp8", "--gpu", "a100", "--batch", "4096"]) == 0
    out = capsys.readouterr().out
    assert "no fp8 tensor cores" in out and "no gain" in out and "1.98x" not in out
    assert main(["quantize", "--explain", str(llama8b), "--config", "fp8", "--gpu", "a100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predicted_speedup"] is None


def test_fp8_pays_like_int8_where_it_is_native(llama8b):
    for gpu in ("h100", "h200", "l40s"):
        fp8 = explain(llama8b, fmt="fp8", batch=4096, gpu=gpu)["predicted_speedup"]
        assert fp8 == pytest.approx(explain(llama8b, fmt="w8a8", batch=4096, gpu=gpu)["predicted_speedup"])
        assert fp8 > 1.5


def test_corrupt_config_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{")
    assert main(["explain", str(tmp_path), "--format", "w8a8"]) == 2
    assert f"{tmp_path / 'config.json'} is not valid JSON" in capsys.readouterr().err
