"""`inferforge quantize MODEL --config ...` on a tiny Llama checkpoint, and `inferforge.load` of the artifact."""

import json

import pytest
import torch

from inferforge.cli import main
from inferforge.optimize.llm_quantize import load_as_transformers
from inferforge.optimize.quantize import Int8WeightOnlyLinear
from tests.factories_llama import save_tiny_llama, save_word_text, save_word_tokenizer

# Quantized layers run their PyTorch references here, not the Triton interpreter (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quantized_layers_as_on_cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    path = save_tiny_llama(root / "tiny")
    save_word_tokenizer(path)
    return path, save_word_text(root / "cal.txt")


def test_quantize_command_writes_a_loadable_artifact(checkpoint, tmp_path, capsys):
    path, cal = checkpoint
    out = tmp_path / "q8"
    code = main(["quantize", str(path), "--config", "int8-weight-only", "--calibration", str(cal), "--num-samples", "4",
                 "--seq-len", "16", "--skip", "lm_head", "--output", str(out), "--json", "-q"])
    assert code == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["kind"] == "quantized-causal-lm" and manifest["runtime"]["format"] == "int8-weight-only"
    assert manifest["quantization"]["skipped"] == ["lm_head"] and manifest["quantization"]["calibration_sha256"]
    assert manifest["validation"]["top1_agreement"] > 0.8 and manifest["validation"]["tokens"] == 2 * 15
    model = load_as_transformers(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8WeightOnlyLinear)
    ids = torch.randint(3, 256, (1, 10))
    from transformers import LlamaForCausalLM

    from inferforge.optimize import Int8WeightOnly, quantize

    reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    quantize(reference, Int8WeightOnly(skip=("lm_head",)))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    # The default gate ran (no limit was given) and the manifest says which limits it applied.
    assert manifest["gate"]["enabled"] and manifest["gate"]["limits"]["max_ppl_increase"] == 0.05
    assert {c["name"] for c in manifest["checks"]} == {"perplexity increase (held-out)", "top-1 agreement (held-out)",
                                                      "layers kept in float"}
    # Every file gets the usual permissions (the weights were once left 0600 by their temp file).
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["manifest.json"], modes
    # `inspect` reads a quantized LLM's manifest (it used to expect an encoder's runtime).
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "format int8-weight-only" in printed and "top1_agreement" in printed and "lowest SQNR" in printed


def test_gate_and_auto_skip(checkpoint, tmp_path, capsys):
    path, cal = checkpoint
    args = ["quantize", str(path), "--config", "int4-gptq", "--calibration", str(cal), "--num-samples", "4",
            "--seq-len", "16", "--group-size", "32", "--min-top1-agreement", "1.0", "-q"]
    assert main([*args, "--output", str(tmp_path / "strict")]) == 1
    err = capsys.readouterr().err
    assert "quantization gate missed: top-1 agreement" in err
    assert "--auto-skip keeps the most sensitive layers" in err and "auto_skip=True" not in err   # the flag typed
    assert not (tmp_path / "strict").exists()                      # no artifact for a failed gate
    # Item 4: auto-skip stops at half of the layers in float; still missing the gate, the run fails.
    assert main([*args, "--auto-skip", "--output", str(tmp_path / "mostly-float")]) == 1
    err = capsys.readouterr().err
    assert "not quantized enough: the gate is still missed" in err and "with 7 of 15 linear layers in float" in err
    assert "model.layers.1.mlp.down_proj" in err and "Try a milder format: int4-awq or int8-weight-only" in err
    assert not (tmp_path / "mostly-float").exists()
    # Passing with exactly half of the layers (7 of 15, rounded down) in float is allowed.
    args = ["quantize", str(path), "--config", "int4-g128", "--calibration", str(cal), "--num-samples", "4",
            "--seq-len", "16", "--group-size", "32", "--min-top1-agreement", "100%", "--max-ppl-increase", "0", "-q"]
    assert main([*args, "--auto-skip", "--output", str(tmp_path / "mixed"), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert len(manifest["quantization"]["auto_skipped"]) == 7 and manifest["validation"]["top1_agreement"] == 1.0
    assert manifest["quantization"]["layers_quantized"] == 8 and manifest["passed"]


def test_quantize_config_errors(checkpoint, tmp_path, capsys):
    path, cal = checkpoint
    assert main(["quantize", str(path), "--config", "w8a8", "--output", str(tmp_path / "x")]) == 2
    assert "needs --calibration FILE" in capsys.readouterr().err
    assert main(["quantize", str(path), "--config", "int4-g128", "--no-gate", "--output", str(tmp_path / "y"), "-q"]) == 2
    assert "in_features (64) is not a multiple of the group size (128)" in (err := capsys.readouterr().err)
    assert "--group-size" in err and "--skip" in err
    assert main(["quantize", str(path), "--config", "int8-weight-only", "--calibration", str(cal), "--num-samples",
                 "40", "--seq-len", "64", "--output", str(tmp_path / "z"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "60 were asked for (40 to calibrate, 20 held out for the gate): give more text or lower --num-samples / " \
           "--seq-len" in err


def _quantize(path, cal, out, *extra):
    return main(["quantize", str(path), "--config", "int8-weight-only", "--calibration", str(cal), "--num-samples",
                 "4", "--seq-len", "16", "--output", str(out), "-q", *extra])


def test_a_gate_is_on_without_flags_and_needs_held_out_text(checkpoint, tmp_path, capsys):
    """Item 3: no gate flag still gates; without --calibration the message says what to pass."""
    path, _ = checkpoint
    assert main(["quantize", str(path), "--config", "int8-weight-only", "--output", str(tmp_path / "x"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "checks a gate (perplexity increase <= 5%, top-1 agreement >= 90%) on held-out text" in err
    assert "pass --calibration FILE" in err and "or --no-gate" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_the_default_gate_rejects_a_broken_quantization(checkpoint, tmp_path, capsys, monkeypatch):
    """Item 3: int8 weights with scales 4x too large pass with no gate flags today; the default gate fails them."""
    import importlib

    from inferforge.optimize.quantize import Int8WeightOnly

    quantize_module = importlib.import_module("inferforge.optimize.quantize")

    real = quantize_module._HANDLERS[Int8WeightOnly]

    def broken(linear, config, name):
        layer = real(linear, config, name)
        layer.scale.mul_(4)
        return layer

    monkeypatch.setitem(quantize_module._HANDLERS, Int8WeightOnly, broken)
    path, cal = checkpoint
    assert _quantize(path, cal, tmp_path / "broken") == 1
    err = capsys.readouterr().err
    assert "quantization gate missed" in err and "(limits: perplexity increase <= 5%, top-1 agreement >= 90%)" in err
    assert "no artifact was written" in err and not (tmp_path / "broken").exists()


def test_no_gate_is_explicit_and_recorded(checkpoint, tmp_path, capsys):
    path, cal = checkpoint
    out = tmp_path / "nogate"
    assert main(["quantize", str(path), "--config", "int8-weight-only", "--no-gate", "--output", str(out), "-q",
                 "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["gate"]["enabled"] is False and "--no-gate" in manifest["gate"]["note"]
    assert [c["name"] for c in manifest["checks"]] == ["layers kept in float"]
    assert "**Off**" in (out / "report.md").read_text()
    assert main(["quantize", str(path), "--config", "int8-weight-only", "--no-gate", "--auto-skip", "--calibration",
                 str(cal), "--output", str(tmp_path / "y"), "-q"]) == 2
    assert "--no-gate turns the gate off" in capsys.readouterr().err


def test_percent_limits_on_the_command_line(checkpoint, tmp_path, capsys):
    """`--max-ppl-increase 2%` and `--min-top1-agreement 90%` as recipes take them; a limit given keeps the other default."""
    path, cal = checkpoint
    assert _quantize(path, cal, tmp_path / "pct", "--max-ppl-increase", "2%", "--json") == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["gate"]["limits"]["max_ppl_increase"] == pytest.approx(0.02)
    assert manifest["gate"]["limits"]["min_top1_agreement"] == 0.9
    assert _quantize(path, cal, tmp_path / "pct2", "--min-top1-agreement", "85%", "--json") == 0
    assert json.loads(capsys.readouterr().out)["gate"]["limits"]["min_top1_agreement"] == pytest.approx(0.85)
    with pytest.raises(SystemExit) as exit_info:
        _quantize(path, cal, tmp_path / "bad", "--max-ppl-increase", "2 percent")
    assert exit_info.value.code == 2 and "expected a share such as 0.05 or 5%" in capsys.readouterr().err


@pytest.mark.parametrize("skips, share, passes", [
    (["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"], "20%", True),   # 3 of 15 = 20%
    (["lm_head", "model.layers.0.self_attn.*"], "20%", False),                                         # 5 of 15
    (["model.layers.*"], None, False),                                                                 # 14 of 15 > 50%
])
def test_too_many_layers_in_float_fail(checkpoint, tmp_path, capsys, skips, share, passes):
    """Item 4: more than --max-float-share (default half) of the linear layers in float fails: exit 1, no artifact."""
    path, cal = checkpoint
    out = tmp_path / "out"
    extra = [a for s in skips for a in ("--skip", s)] + (["--max-float-share", share] if share else [])
    code = _quantize(path, cal, out, *extra)
    err = capsys.readouterr().err
    if passes:
        assert code == 0 and json.loads((out / "manifest.json").read_text())["quantization"]["float_share"] == 0.2
        return
    assert code == 1 and not out.exists()
    assert "not quantized enough" in err and "model.layers.0.self_attn.q_proj" in err
    assert "Try a milder format" in err and "--max-float-share" in err


def test_an_encoder_with_a_language_model_format_is_refused(tmp_path, capsys):
    """Item 5: a BERT directory with --config is refused (exit 2), never quantized with language-model metrics."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    out = tmp_path / "out"
    assert main(["quantize", str(bert), "--config", "int4-g128", "--no-gate", "--output", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "holds BertModel, not a causal LM" in err and "`inferforge quantize MODEL`" in err and "--onnx" in err
    assert "Traceback" not in err and not out.exists()


def test_a_causal_lm_the_engine_cannot_run_is_refused(tmp_path, capsys):
    neox = tmp_path / "neox"
    neox.mkdir()
    (neox / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    assert main(["quantize", str(neox), "--config", "int8-weight-only", "--no-gate", "--output", str(tmp_path / "o")]) == 2
    assert "model_type 'gpt_neox' is not supported" in capsys.readouterr().err


def test_help_describes_every_llm_flag():
    from inferforge.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command, flags in (("quantize", ("--num-samples", "--seq-len", "--max-ppl-increase", "--min-top1-agreement",
                                         "--no-gate", "--max-float-share")),
                           ("generate", ("--prompt", "--max-new-tokens", "--top-k", "--top-p", "--seed",
                                         "--kv-cache-dtype")),
                           ("bench", ("--batch-sizes", "--seq-len", "--iterations", "--output-len", "--scenario", "--rate",
                                      "--preset"))):
        actions = {s: a for a in sub[command]._actions for s in a.option_strings}
        for flag in flags:
            assert actions[flag].help, (command, flag)
    text = " ".join(sub["quantize"].format_help().split())
    assert "default 5% for int8-weight-only" in text and "15% for int4-*" in text and "default 90%" in text


def test_an_artifact_that_quantizes_nothing_fails(checkpoint, tmp_path, capsys):
    """Item 4: even where the float share allows it (100%), a run that quantizes no layer is not a quantized model."""
    path, _ = checkpoint
    out = tmp_path / "nothing"
    assert main(["quantize", str(path), "--config", "int8-weight-only", "--no-gate", "--skip", "*",
                 "--max-float-share", "100%", "--output", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "not quantized: all 15 linear layers would stay in float" in err and "milder format" in err
    assert not out.exists()


def test_a_skip_pattern_that_matches_nothing_is_refused(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    out = tmp_path / "typo"
    assert main(["quantize", str(path), "--config", "int8-weight-only", "--no-gate", "--skip", "model.layers",
                 "--output", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--skip 'model.layers' matches no linear layer" in err and "model.layers.0.*" in err
    assert not out.exists()
