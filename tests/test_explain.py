import json

import pytest

from inferforge.cli import main
from inferforge.errors import UserInputError
from inferforge.optimize.explain import GPUS, explain, predict

LLAMA_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
            "num_hidden_layers": 32}


@pytest.fixture
def llama8b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return tmp_path


def test_roofline_arithmetic():
    h100 = GPUS["h100"]
    p = predict(4096, 4096, 1, "bf16", h100)
    assert p["flops"] == 2 * 4096 * 4096
    assert p["bytes"] == 4096 * 2 + 4096 * 4096 * 2 + 4096 * 2
    assert p["bound"] == "memory" and p["ridge"] == pytest.approx(989e12 / 3.35e12)
    big = predict(4096, 4096, 8192, "bf16", h100)
    assert big["bound"] == "compute" and big["time_s"] == pytest.approx(big["flops"] / 989e12)


def test_weight_only_pays_at_batch_1_not_at_large_batch(llama8b):
    one = explain(llama8b, fmt="int4-g128", batch=1)
    assert 3.3 < one["predicted_speedup"] < 4.0            # ~4x fewer weight bytes, minus scales
    assert all(r["bound"] == "memory" for r in one["layers"])
    int8 = explain(llama8b, fmt="int8-weight-only", batch=1)
    assert 1.9 < int8["predicted_speedup"] <= 2.0
    big = explain(llama8b, fmt="int4-g128", batch=4096)
    assert big["predicted_speedup"] == pytest.approx(1.0, abs=0.02) and all(r["bound"] == "compute" for r in big["layers"])


def test_w8a8_pays_when_compute_bound(llama8b):
    assert explain(llama8b, fmt="w8a8", batch=4096)["predicted_speedup"] > 1.8


def test_bad_arguments(llama8b):
    with pytest.raises(UserInputError, match="format 'int3'"):
        explain(llama8b, fmt="int3", batch=1)
    with pytest.raises(UserInputError, match="gpu 'tpu'"):
        explain(llama8b, fmt="w8a8", batch=1, gpu="tpu")


def test_cli_explain(llama8b, capsys):
    assert main(["explain", str(llama8b), "--format", "int4-g128", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "down_proj" in out and "memory" in out and "predicted speed-up" in out
    assert main(["explain", str(llama8b), "--format", "w8a8", "--batch", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch"] == 16


def test_quantize_explain_flag(llama8b, capsys):
    assert main(["quantize", "--explain", str(llama8b), "--config", "int8-weight-only", "--batch", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "int8-weight-only"
    assert main(["quantize", "--explain", str(llama8b)]) == 2
    assert "--explain needs --config" in capsys.readouterr().err
