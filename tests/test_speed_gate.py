"""The speed gate (`quantize --config ... --min-speedup X --at-batch B`): the decision on recorded
timings, the CPU skip path through the command line, the failed path leaving no artifact (measurement
injected), flag and recipe validation."""

import json
import textwrap

import pytest
import torch

from inferforge.cli import main
from inferforge.errors import RecipeError, UserInputError
from inferforge.optimize import speed_gate
from inferforge.optimize.quantize import Int8WeightOnlyLinear
from inferforge.optimize.speed_gate import SpeedGate, decide
from inferforge.recipe import load_recipe
from tests.factories_llama import save_tiny_llama, save_word_text, save_word_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    path = save_tiny_llama(root / "tiny")
    save_word_tokenizer(path)
    save_word_text(root / "cal.txt")
    return path


def _quantize(path, out, *extra):
    return main(["quantize", str(path), "--config", "int8-weight-only", "--no-gate", "--output", str(out), "-q",
                 *extra])


def test_decision_on_recorded_timings():
    gate = SpeedGate(1.2, at_batch=4)
    # Recorded H100 medians, int8-weight-only: M=1 gate/up_proj passes 1.2, M=64 q/o_proj does not.
    passed = decide(gate, [0.0423, 0.0424, 0.0422], [0.0275, 0.0274, 0.0290], device="H100")
    assert passed["status"] == "passed" and passed["passed"] is True
    assert passed["measured"] == pytest.approx(0.0423 / 0.0275) and passed["at_batch"] == 4
    failed = decide(gate, [0.0147, 0.0146, 0.0150], [0.0178, 0.0179, 0.0170])
    assert failed["status"] == "failed" and failed["passed"] is False and failed["measured"] < 1
    # Medians, not means: one slow outlier of the quantized model does not decide.
    assert decide(gate, [1.0] * 5, [0.5, 0.5, 0.5, 0.5, 50.0])["passed"]
    assert decide(SpeedGate(2.0), [2.0, 2.0, 2.0], [1.0, 1.0, 1.0])["passed"]       # exactly at the limit
    with pytest.raises(ValueError):
        decide(gate, [1.0], [])


def test_skipped_is_never_passed():
    record = speed_gate.skipped(SpeedGate(1.2))
    assert record["status"] == "skipped" and record["passed"] is None
    assert record["reason"] == "speed gate needs a CUDA GPU; skipped"
    assert "SKIPPED" in speed_gate.describe_record(record) and "not counted as passed" in speed_gate.describe_record(record)


def test_evaluate_without_a_gpu_measures_nothing_and_skips(monkeypatch):
    monkeypatch.setattr(speed_gate, "cuda_available", lambda: False)
    record = speed_gate.evaluate(SpeedGate(1.2), None, None, vocab_size=8,
                                 measure=lambda *a, **k: pytest.fail("nothing is measured without a GPU"))
    assert record["status"] == "skipped" and record["passed"] is None


@pytest.mark.parametrize("kwargs", [{"min_speedup": 0}, {"min_speedup": -1.0}, {"min_speedup": True},
                                    {"min_speedup": float("inf")}, {"min_speedup": float("nan")},
                                    {"min_speedup": 1.2, "at_batch": 0}, {"min_speedup": 1.2, "at_batch": 1.5}])
def test_gate_validation(kwargs):
    with pytest.raises(UserInputError):
        SpeedGate(**kwargs)


def test_cpu_skip_path_through_the_cli(checkpoint, tmp_path, capsys):
    out = tmp_path / "q8"
    assert _quantize(checkpoint, out, "--min-speedup", "1.2", "--at-batch", "2") == 0
    printed = capsys.readouterr().out
    assert "speed gate: SKIPPED (speed gate needs a CUDA GPU; skipped; not counted as passed)" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["speed_gate"]
    assert record["status"] == "skipped" and record["passed"] is None and record["limit"] == 1.2
    assert record["at_batch"] == 2 and record["reason"] == "speed gate needs a CUDA GPU; skipped"
    assert all(c.get("kind") != "speed" for c in manifest["checks"])
    assert manifest["skipped_checks"] == [{"name": record["name"], "reason": record["reason"]}]
    assert "## Speed gate" in (out / "report.md").read_text() and "SKIPPED" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["speed_gate"]["status"] == "skipped"
    assert _quantize(checkpoint, tmp_path / "json", "--min-speedup", "1.2", "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["speed_gate"]["status"] == "skipped"
    assert json.loads(captured.out)["skipped_checks"][0]["reason"] == "speed gate needs a CUDA GPU; skipped"
    assert "speed gate: SKIPPED (speed gate needs a CUDA GPU; skipped" in captured.err


def _recorded_gpu(monkeypatch, bf16_ms, quant_ms, seen):
    def measure(gate, original, quantized, *, vocab_size):
        seen.append((gate, type(original.model.layers[0].self_attn.q_proj),
                     type(quantized.model.layers[0].self_attn.q_proj), vocab_size))
        return bf16_ms, quant_ms, "NVIDIA H100 80GB HBM3 (recorded)"
    monkeypatch.setattr(speed_gate, "cuda_available", lambda: True)
    monkeypatch.setattr(speed_gate, "measure_on_gpu", measure)


def test_a_missed_speed_gate_writes_no_artifact(checkpoint, tmp_path, capsys, monkeypatch):
    seen = []
    _recorded_gpu(monkeypatch, [0.0147, 0.0146, 0.0150], [0.0178, 0.0179, 0.0170], seen)
    out = tmp_path / "slow"
    assert _quantize(checkpoint, out, "--min-speedup", "1.2") == 1
    err = capsys.readouterr().err
    assert "speed gate: FAILED (0.83x over bf16 at batch 1, limit 1.2x" in err and "no artifact was written" in err
    assert "try w8a8 or fp8" in err
    assert not out.exists()
    failed = json.loads((tmp_path / "slow.failed" / "report.json").read_text())
    assert failed["speed_gate"]["status"] == "failed" and failed["speed_gate"]["measured"] == pytest.approx(0.0147 / 0.0178)
    assert "FAILED" in (tmp_path / "slow.failed" / "report.md").read_text()
    (gate, original_type, quantized_type, vocab), = seen
    assert gate.at_batch == 1 and original_type is torch.nn.Linear and quantized_type is Int8WeightOnlyLinear
    assert vocab == 256


def test_a_met_speed_gate_is_recorded_as_a_check(checkpoint, tmp_path, capsys, monkeypatch):
    """Also, on a (recorded) GPU the manifest and output carry the dispatcher's per-layer report."""
    from inferforge.kernels import weight_only_dispatch as wod

    _recorded_gpu(monkeypatch, [0.0423, 0.0424, 0.0422], [0.0275, 0.0274, 0.0290], [])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    cache = wod.TimingCache()
    model = json.loads((checkpoint / "config.json").read_text())
    hidden = model["hidden_size"]
    cache.put(wod.ShapeKey("GPU X", "w8a16", hidden, hidden, hidden, 1), {"fused": 1.0, "dequantize+cublas": 2.0, "bf16": 0.5})
    monkeypatch.setattr(wod, "_DISPATCHER", wod.Dispatcher(cache))
    out = tmp_path / "fast"
    assert _quantize(checkpoint, out, "--min-speedup", "1.2", "--at-batch", "1") == 0
    printed = capsys.readouterr().out
    assert "kernels per layer (measured on this GPU):" in printed and "bf16 is faster than every quantized" in printed
    assert "model.layers.0.self_attn.q_proj M=1: fused 1.0000 ms, 0.50x vs bf16  (bf16 is faster)" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    q_proj = [r for r in manifest["dispatch"] if r["layer"] == "model.layers.0.self_attn.q_proj"]
    assert q_proj == [{"layer": "model.layers.0.self_attn.q_proj", "format": "w8a16", "n": hidden, "k": hidden, "m": 1,
                       "m_bucket": 1, "candidate": "fused", "ms": 1.0, "bf16_ms": 0.5, "speedup": 0.5,
                       "bf16_faster": True}]
    assert manifest["speed_gate"]["status"] == "passed" and manifest["speed_gate"]["device"].startswith("NVIDIA H100")
    (check,) = [c for c in manifest["checks"] if c["kind"] == "speed"]
    assert check["passed"] and check["measured"] == pytest.approx(0.0423 / 0.0275) and check["limit"] == 1.2


@pytest.mark.parametrize("extra, message", [
    (["--at-batch", "4"], "--at-batch sets the batch size of the speed gate; add --min-speedup"),
    (["--min-speedup", "0"], "--min-speedup must be a number > 0"),
    (["--min-speedup", "1.2", "--at-batch", "0"], "--at-batch must be an integer >= 1"),
])
def test_flag_errors_exit_2(checkpoint, tmp_path, capsys, extra, message):
    assert _quantize(checkpoint, tmp_path / "x", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "x").exists()


def test_min_speedup_needs_config(checkpoint, tmp_path, capsys):
    assert main(["quantize", str(checkpoint), "--min-speedup", "1.2", "--output", str(tmp_path / "x"), "-q"]) == 2
    assert "--min-speedup gates a causal LM quantized with --config" in capsys.readouterr().err


RECIPE = textwrap.dedent("""\
    model: {model}
    output: {output}
    steps:
      - quantize:
          config: int8-weight-only
          gate: none
""") + "{extra}"


def test_recipe_speed_gate_keys(checkpoint, tmp_path, capsys):
    def recipe(extra):
        path = tmp_path / "r.yaml"
        path.write_text(RECIPE.format(model=checkpoint, output=tmp_path / "out", extra=extra))
        return path
    (step,) = load_recipe(recipe("      min_speedup: 1.3\n      at_batch: 8\n")).steps
    assert (step.min_speedup, step.at_batch) == (1.3, 8)
    with pytest.raises(RecipeError, match="at_batch sets the batch size of the speed gate"):
        load_recipe(recipe("      at_batch: 8\n"))
    with pytest.raises(RecipeError, match="min_speedup must be a number > 0"):
        load_recipe(recipe("      min_speedup: -1\n"))
    assert main(["optimize", str(recipe("      min_speedup: 1.3\n")), "-q"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["speed_gate"]["status"] == "skipped" and manifest["speed_gate"]["limit"] == 1.3


def test_bf16_copy_keeps_quantized_buffers():
    from torch import nn

    from inferforge.optimize.quantize import Int8WeightOnly, quantize

    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    quantize(model, Int8WeightOnly(skip=("2",)))
    copy = speed_gate._to_bf16_except_quantized(model, torch.device("cpu"))
    assert copy[0].scale.dtype == torch.float32 and copy[0].weight_int8.dtype == torch.int8
    assert copy[1].weight.dtype == torch.bfloat16 and copy[2].weight.dtype == torch.bfloat16
    assert model[1].weight.dtype == torch.float32          # the original is untouched
