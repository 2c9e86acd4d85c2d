import json

import pytest

from inferforge.cli import main
from inferforge.errors import UserInputError
from inferforge.runtime.plan import parse_bytes, plan
from tests.factories_llama import save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("24 GB") == 24 * 10**9 and parse_bytes(1024) == 1024
    with pytest.raises(UserInputError, match="give a size such as 80GiB"):
        parse_bytes("lots")


def test_plan_numbers_follow_the_formulas(tiny):
    result = plan(tiny, memory="8MiB", kv_cache_dtype="fp16", reserve=0.25)
    shape = result["model_shape"]
    assert (shape["layers"], shape["n_kv_heads"], shape["head_dim"]) == (2, 2, 16)
    # Parameters of the tiny Llama: embeddings + lm_head + 2 layers + final norm.
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert shape["parameters"] == 256 * 64 * 2 + 2 * per_layer + 64
    assert result["weight_bytes"] == shape["parameters"] * 4          # saved as float32
    assert result["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    # The activation peak of a 256-token step (runtime/kv_budget.py formula; float32 weights: 4 bytes):
    # residual, normed input, q/k/v, gate/up + SiLU product, float32 RoPE copies, 8 logits rows.
    activation = 256 * 4 * (3 * 64 + (4 + 2 * 2) * 16 + 4 * 128) + 256 * 4 * 3 * 4 * 16 + 8 * 256 * (4 + 4)
    assert result["activation_peak_bytes"] == activation
    budget = 8 * 2**20 * 0.75 - result["weight_bytes"] - activation
    assert result["kv_tokens"] == int(budget // result["kv_bytes_per_token"])
    rows = {r["concurrency"]: r["max_context"] for r in result["max_context_by_concurrency"]}
    assert rows[1] == 256                                              # capped at the model's window
    assert rows[128] == (result["kv_tokens"] // 128) // 16 * 16
    by_context = {r["context"]: r for r in result["max_concurrency_by_context"]}
    assert by_context[1024]["max_concurrency"] == result["kv_tokens"] // 1024
    assert by_context[1024]["beyond_model_window"]


def test_fp8_cache_doubles_the_tokens(tiny):
    bf16 = plan(tiny, memory="8MiB", kv_cache_dtype="bf16")
    fp8 = plan(tiny, memory="8MiB", kv_cache_dtype="fp8")
    assert fp8["kv_bytes_per_token"] * 2 == bf16["kv_bytes_per_token"]
    assert fp8["kv_tokens"] in (2 * bf16["kv_tokens"], 2 * bf16["kv_tokens"] + 1)


def test_weights_that_do_not_fit(tiny):
    with pytest.raises(UserInputError, match="do not fit in 100KiB"):
        plan(tiny, memory="100KiB")


def test_cli_plan_table_and_json(tiny, capsys):
    assert main(["plan", str(tiny), "--memory", "8MiB", "--kv-cache-dtype", "fp8", "--max-context", "100"]) == 0
    out = capsys.readouterr().out
    assert "largest context for a concurrency" in out and "KiB per token" in out
    assert main(["plan", str(tiny), "--memory", "8MiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache_dtype"] == "bf16"
    assert main(["plan", str(tiny.parent), "--memory", "8MiB"]) == 2
    assert "no config.json" in capsys.readouterr().err
