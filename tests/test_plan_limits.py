"""`plan` refuses numbers that cannot be planned for (with the flag's name), sizes a config-only
directory from its config and says so, and never plans from a truncated checkpoint."""

import json
import shutil

import pytest

from inferforge.cli import main
from inferforge.errors import UserInputError
from inferforge.runtime.plan import plan, read_model_shape
from tests.factories_llama import save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("plan") / "tiny")


@pytest.mark.parametrize("kwargs, flag", [({"concurrency": -4}, "--concurrency"), ({"concurrency": 0}, "--concurrency"),
                                          ({"max_context": -20}, "--max-context"), ({"max_context": -5}, "--max-context"),
                                          ({"max_context": 0}, "--max-context"), ({"block_size": 0}, "block_size"),
                                          ({"reserve": -0.1}, "--reserve"), ({"reserve": 1.0}, "--reserve"),
                                          ({"memory": "0GiB"}, "--memory"), ({"memory": "lots"}, "--memory"),
                                          ({"kv_cache_dtype": "fp4"}, "--kv-cache-dtype"),
                                          ({"weights_dtype": "fp4"}, "--weights-dtype")])
def test_values_that_cannot_be_planned_for_are_refused(tiny, kwargs, flag):
    args = {"memory": "8MiB", **kwargs}
    with pytest.raises(UserInputError, match=flag):
        plan(tiny, **args)


@pytest.mark.parametrize("flag, value", [("--concurrency", "-4"), ("--concurrency", "0"), ("--max-context", "-20"),
                                         ("--max-context", "-5")])
def test_cli_refuses_them_with_exit_2(tiny, capsys, flag, value):
    assert main(["plan", str(tiny), "--memory", "8MiB", flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_every_number_in_a_plan_is_positive(tiny):
    result = plan(tiny, memory="8MiB", concurrency=3, max_context=100)
    assert [r["concurrency"] for r in result["max_context_by_concurrency"]] == [1, 3, 8, 32, 128]
    assert 100 in [r["context"] for r in result["max_concurrency_by_context"]]
    assert all(r["max_context"] > 0 for r in result["max_context_by_concurrency"][:2])
    assert all(r["max_concurrency"] >= 0 for r in result["max_concurrency_by_context"])


def test_config_only_directory_is_sized_from_the_config(tiny, tmp_path, capsys):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny / "config.json", config_only / "config.json")
    stored, counted = read_model_shape(tiny), read_model_shape(config_only)
    assert counted.parameters == stored.parameters          # the count matches the real checkpoint's tensors
    assert counted.weight_bytes == stored.weight_bytes       # float32, as config.json says
    assert (stored.weights_from, counted.weights_from) == ("safetensors headers", "config.json")
    result = plan(config_only, memory="8MiB")
    assert result["weights_from"] == "config.json" and result["weight_bytes"] == stored.weight_bytes
    assert main(["plan", str(config_only), "--memory", "8MiB"]) == 0
    assert "computed from" in capsys.readouterr().out


def test_config_only_counts_tied_embeddings_once_and_defaults_to_bf16(tiny, tmp_path):
    config = json.loads((tiny / "config.json").read_text())
    config.update(tie_word_embeddings=True)
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = read_model_shape(tmp_path)
    assert shape.parameters == read_model_shape(tiny).parameters - config["vocab_size"] * config["hidden_size"]
    assert shape.weights_dtype == "bf16" and shape.weight_bytes == shape.parameters * 2


def test_config_only_without_the_sizes_names_the_missing_key(tiny, tmp_path):
    config = json.loads((tiny / "config.json").read_text())
    del config["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="intermediate_size"):
        plan(tmp_path, memory="8MiB")


@pytest.mark.parametrize("keep", [4, 100, "half"])
def test_truncated_checkpoint_is_not_planned(tiny, tmp_path, keep):
    cut = tmp_path / "cut"
    shutil.copytree(tiny, cut)
    weights = cut / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    with pytest.raises(UserInputError, match="model.safetensors.*truncated"):
        plan(cut, memory="8MiB")
