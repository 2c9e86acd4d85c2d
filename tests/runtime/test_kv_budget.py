"""KV-cache sizing from a memory budget: the engine's choice, its errors, and agreement with plan()."""

import logging

import pytest
import torch

from inferforge.cli import main
from inferforge.errors import UserInputError
from inferforge.runtime.engine import LLMEngine
from inferforge.runtime.kv_budget import (
    CPU_KV_CAP_BYTES,
    CPU_LINEAR_FLAGS,
    activation_peak_formula,
    check_memory_options,
)
from inferforge.runtime.plan import plan
from tests.factories_llama import save_tiny_llama

MIB = 2**20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def long_window(tmp_path_factory):
    """The tiny model with a 131,072-token window: sized for the window, 8 sequences needed 4 GiB."""
    return save_tiny_llama(tmp_path_factory.mktemp("long"), max_position_embeddings=131072)


def _cache_bytes(engine) -> int:
    return sum(p.numel() * p.element_size() for p in (*engine.cache.k_pools, *engine.cache.v_pools))


def _load(path, **kwargs):
    return LLMEngine.from_pretrained(path, dtype=torch.float32, device="cpu", **kwargs)


def test_a_long_window_model_gets_what_the_budget_holds(long_window, caplog):
    with caplog.at_level(logging.INFO, logger="inferforge.runtime.engine"):
        engine = _load(long_window, memory_budget="64MiB")
    kv = engine.kv_plan
    per_token = 2 * 2 * 2 * 16 * 4                               # K and V, 2 layers, 2 KV heads x 16, fp32
    assert kv.kv_bytes_per_token == per_token and kv.activation_from == "formula"
    expected_blocks = (64 * MIB - kv.weight_bytes - kv.activation_peak_bytes) // (per_token * 16)
    assert engine.cache.num_blocks == kv.num_blocks == expected_blocks
    assert _cache_bytes(engine) == kv.kv_cache_bytes <= 64 * MIB - kv.weight_bytes
    # One sequence of the whole window needs 64 MiB of KV alone: the context shrank to what fits, with a log line.
    assert engine.max_context == kv.max_context == expected_blocks * 16 < 131072
    assert "lowered" in caplog.text and f"{kv.num_blocks} blocks x 16" in caplog.text


def test_the_default_cpu_budget_caps_the_cache(long_window):
    engine = _load(long_window)
    assert _cache_bytes(engine) <= CPU_KV_CAP_BYTES
    assert engine.kv_plan.budget_from.startswith("default")
    # Never more than max_num_seqs sequences of max_context need.
    small = _load(long_window, max_context=1000, max_num_seqs=3)
    assert small.cache.num_blocks == 3 * 63 and small.kv_plan.max_concurrent_at_max_context == 3


def test_a_budget_that_cannot_hold_one_sequence_is_refused(long_window):
    with pytest.raises(UserInputError, match=r"cannot hold one sequence of max_context 131072.*fp8") as info:
        _load(long_window, memory_budget="16MiB", max_context=131072)
    assert "--max-context" in str(info.value) and "weights" in str(info.value)
    with pytest.raises(UserInputError, match="cannot hold one sequence"):
        _load(long_window, memory_budget="1MiB")                # not even one block after the weights


def test_explicit_num_blocks_wins(long_window):
    engine = _load(long_window, num_blocks=5, memory_budget="1MiB")
    assert engine.cache.num_blocks == 5 and engine.kv_plan.budget_from == "num_blocks given"


@pytest.mark.parametrize("kwargs, match", [
    ({"memory_budget": "lots"}, "give a size"), ({"memory_budget": 0}, "more than 0"),
    ({"memory_utilization": 1.5}, r"in \(0, 1\]"), ({"memory_utilization": 0.5, "memory_budget": "1GiB"}, "not both"),
])
def test_bad_memory_options(kwargs, match):
    with pytest.raises(UserInputError, match=match):
        check_memory_options(kwargs.get("memory_budget"), kwargs.get("memory_utilization"))


@pytest.mark.parametrize("layout", ["copy", "dense", "onednn"])
@pytest.mark.parametrize("memory, max_context, seqs", [("6MiB", None, 8), ("3MiB", 200, 3), ("40MiB", 256, 8)])
def test_the_engine_allocates_what_plan_predicts(tiny, memory, max_context, seqs, layout):
    """For a pinned layout, plan(device="cpu", cpu_linears=...) counts what the CPU engine holds: the
    packed copy of float projections with "copy", the weights once with "dense" or "onednn" (an untied
    model), which is also what a GPU plan counts."""
    predicted = plan(tiny, memory=memory, reserve=0.0, kv_cache_dtype="fp32", weights_dtype="fp32",
                     max_context=max_context, concurrency=seqs, device="cpu", cpu_linears=layout)
    engine = _load(tiny, memory_budget=memory, max_context=max_context, max_num_seqs=seqs,
                   cpu_packed_linears=CPU_LINEAR_FLAGS[layout])
    gpu = plan(tiny, memory=memory, reserve=0.0, kv_cache_dtype="fp32", weights_dtype="fp32", max_context=max_context,
               concurrency=seqs)
    assert (predicted["packed_weight_bytes"] > 0) == (layout == "copy")
    assert (predicted["weight_bytes"] == gpu["weight_bytes"]) == (layout != "copy")
    assert engine.kv_plan.weight_bytes == predicted["weight_bytes"]
    assert engine.kv_plan.activation_peak_bytes == predicted["activation_peak_bytes"]
    assert engine.cache.num_blocks == predicted["engine"]["num_blocks"]


@pytest.mark.parametrize("seqs", [2, 8])
def test_plan_for_auto_on_the_cpu_bounds_every_layout(tiny, seqs):
    auto = plan(tiny, memory="8MiB", reserve=0.0, weights_dtype="fp32", concurrency=seqs, device="cpu")
    held = {asked: _load(tiny, memory_budget="8MiB", max_num_seqs=seqs, cpu_packed_linears=asked).kv_plan.weight_bytes
            for asked in (False, "onednn", None)}
    assert auto["weight_bytes"] >= max(held.values())
    copy = plan(tiny, memory="8MiB", reserve=0.0, weights_dtype="fp32", concurrency=seqs, device="cpu",
                cpu_linears="copy")
    assert auto["weight_bytes"] == (copy["weight_bytes"] if seqs > 3 else held[False])


def test_plan_refuses_cpu_linears_without_the_cpu(tiny):
    with pytest.raises(UserInputError, match="add --device cpu"):
        plan(tiny, memory="8MiB", cpu_linears="onednn")
    with pytest.raises(UserInputError, match="--cpu-linears must be one of"):
        plan(tiny, memory="8MiB", device="cpu", cpu_linears="mkl")


@pytest.mark.parametrize("seqs", [2, 8])
def test_plan_on_the_cpu_bounds_every_layout_of_a_tied_model(tmp_path, seqs):
    """With a tied LM head, oneDNN's layout packs the head while the embedding stays: one copy of it,
    which plan counts even where no projection copy is kept (3 sequences or fewer)."""
    tied = save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    predicted = plan(tied, memory="8MiB", reserve=0.0, kv_cache_dtype="fp32", weights_dtype="fp32",
                     concurrency=seqs, device="cpu")
    held = {asked: _load(tied, memory_budget="8MiB", max_num_seqs=seqs, cpu_packed_linears=asked).kv_plan.weight_bytes
            for asked in (False, True, "onednn")}
    assert held["onednn"] > held[False]
    assert predicted["weight_bytes"] == max(held["onednn"], held[True] if seqs > 3 else held[False])
    assert predicted["weight_bytes"] >= max(held["onednn"], held[False])


def test_activation_formula_grows_with_the_step():
    shape = dict(hidden=2048, intermediate=8192, n_heads=32, n_kv_heads=8, head_dim=64, vocab=128256, max_num_seqs=8,
                 act_bytes=2)
    small, large = (activation_peak_formula(step_tokens=t, **shape) for t in (1, 256))
    assert 0 < small < large


def test_unwritten_cache_slots_are_never_read(tiny):
    """The pools are not zero-filled: NaN in every slot must not change what the engine generates."""
    prompts = [[5, 6, 7, 8, 9, 10, 11] * 3, [3, 4], list(range(3, 40))]
    want = _load(tiny, num_blocks=64).generate(prompts, max_new_tokens=5)
    poisoned = _load(tiny, num_blocks=64)
    for pool in (*poisoned.cache.k_pools, *poisoned.cache.v_pools):
        pool.fill_(float("nan"))
    assert poisoned.generate(prompts, max_new_tokens=5) == want


@pytest.mark.parametrize("args, message", [
    (["--memory-budget", "lots"], "--memory-budget 'lots'"), (["--memory-budget", "0"], "more than 0"),
    (["--memory-utilization", "2"], "--memory-utilization must be"),
    (["--memory-utilization", "0.5", "--memory-budget", "1GiB"], "not both"),
])
def test_cli_memory_flags_are_checked(tiny, capsys, args, message):
    assert main(["generate", str(tiny), "--prompt", "hi", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_serve_memory_flag_is_checked(tiny, capsys):
    assert main(["serve", str(tiny), "--memory-budget", "lots"]) == 2
    assert "--memory-budget 'lots'" in capsys.readouterr().err


def test_cli_plan_prints_the_engine_blocks(tiny, capsys):
    assert main(["plan", str(tiny), "--memory", "8MiB", "--max-step-tokens", "64"]) == 0
    assert "the engine (--memory-budget" in capsys.readouterr().out
    assert main(["plan", str(tiny), "--memory", "8MiB", "--device", "cpu"]) == 0
    assert "MiB of packed CPU projections" in capsys.readouterr().out
    assert main(["plan", str(tiny), "--memory", "8MiB", "--max-step-tokens", "0"]) == 2


@pytest.mark.parametrize(("flag", "layout"), [("dense", "dense"), ("copy", "dense+copy"), ("onednn", "onednn")])
def test_cli_cpu_linears_pins_the_layout(tiny, flag, layout):
    import argparse

    from inferforge.runtime.kv_budget import add_memory_flags, memory_kwargs
    from inferforge.runtime.load import load_engine

    parser = argparse.ArgumentParser()
    add_memory_flags(parser)
    args = parser.parse_args(["--cpu-linears", flag, "--memory-budget", "8MiB"])
    engine = load_engine(tiny, command="generate", dtype=torch.float32, device="cpu", max_num_seqs=8,
                         **memory_kwargs(args))
    assert engine.cpu_linears["layout"] == layout and engine.cpu_linears["seconds"] is None
    assert "cpu_packed_linears" not in memory_kwargs(parser.parse_args([]))      # auto: the engine times


def test_cli_cpu_linears_rejects_other_values(tiny, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", str(tiny), "--prompt", "hi", "--cpu-linears", "mkl"])
    assert info.value.code == 2 and "--cpu-linears" in capsys.readouterr().err


def test_engine_flags_are_refused_for_an_exported_onnx_decoder(tmp_path):
    import json

    from inferforge.manifest import FORMAT
    from inferforge.runtime.load import load_engine

    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "kind": "onnx-causal-lm", "files": {}}))
    with pytest.raises(UserInputError, match="exported ONNX decoder.*--cpu-linears is for the PyTorch engine; drop it"):
        load_engine(tmp_path, command="generate", cpu_packed_linears="onednn")
    with pytest.raises(UserInputError, match="--memory-budget and --cpu-linears are for the PyTorch engine; drop them"):
        load_engine(tmp_path, command="generate", memory_budget=2**30, cpu_packed_linears="onednn")
    with pytest.raises(UserInputError, match="--memory-utilization is for"):
        load_engine(tmp_path, command="serve", memory_utilization=0.5)


@pytest.mark.parametrize(("names", "tied"), [(["lm_head.weight_int8", "lm_head.scale"], False), (["lm_head.weight"], False),
                                             ([], True)])
def test_plan_reads_a_tied_lm_head_from_the_weights_names(tmp_path, names, tied):
    import json

    from safetensors.torch import save_file

    from inferforge.runtime.plan import read_model_shape
    from tests.factories_llama import tiny_llama_config

    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config().to_dict()))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4), **{n: torch.zeros(4, 4) for n in names}},
              str(tmp_path / "model.safetensors"))
    assert read_model_shape(tmp_path).tied_lm_head is tied
