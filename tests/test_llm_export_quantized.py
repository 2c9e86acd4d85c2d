"""`inferforge export QUANTIZED_ARTIFACT` end to end, as a user runs it (issue 11).

A tiny seeded Llama (hidden 128, group size 64) is quantized (int4 through `inferforge quantize`, w8a8
and fp8 through the python API with a 50% gate: a random model's logits are nearly flat), exported with
`inferforge export`, and the artifact is checked: its manifest links the quantized parent, records
both speeds and the opset it chose; `inferforge generate` / `inferforge.load` run it (fp8 with the
session config it records); bad flags are one line, exit 2.
"""

import hashlib
import json
import shutil

import pytest
import torch

from inferforge.cli import main
from tests.factories_llama import save_tiny_llama, save_word_text, save_word_tokenizer

# Quantized layers run their PyTorch references here, not the Triton interpreter (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quantized_layers_as_on_cpu")

GROUP = 64
PROMPT = "w5 w17 w42 w99 w7"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("qcli")
    model = save_tiny_llama(root / "m", hidden_size=128, intermediate_size=256, initializer_range=0.05)
    save_word_tokenizer(model)
    save_word_text(root / "cal.txt", lines=16, words=16)
    return root


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _manifest(path):
    from inferforge.manifest import verify_artifact

    return verify_artifact(path)


@pytest.fixture(scope="module")
def int4(root):
    """(quantized artifact, exported artifact, the export's stdout), both through the CLI."""
    import contextlib
    import io

    quant, out = root / "m-int4", root / "m-int4-onnx"
    assert main(["quantize", str(root / "m"), "--config", "int4-g128", "--group-size", str(GROUP), "--calibration",
                 str(root / "cal.txt"), "--num-samples", "4", "--seq-len", "32", "--no-gate", "--output", str(quant),
                 "-q"]) == 0
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export", str(quant), "--output", str(out), "-q"]) == 0
    return quant, out, stdout.getvalue()


@pytest.fixture(scope="module")
def qdq(root):
    """fmt -> its quantized artifact (python API, gate 50%), written once."""
    from inferforge.optimize.llm_quantize import quantize_checkpoint
    from inferforge.optimize.lm_eval import LMGate

    cache = {}

    def get(fmt):
        if fmt not in cache:
            cache[fmt] = root / f"m-{fmt}"
            quantize_checkpoint(root / "m", cache[fmt], fmt=fmt, calibration_file=root / "cal.txt", num_samples=4,
                                seq_len=16, gate=LMGate(min_top1_agreement=0.5))
        return cache[fmt]
    return get


@torch.no_grad()
def _reference_greedy(artifact, prompt: list[int], steps: int, eos: int = 2) -> list[int]:
    from inferforge.optimize.llm_quantize import load_as_transformers

    model, ids, out = load_as_transformers(artifact).eval(), torch.tensor([prompt]), []
    for _ in range(steps):
        out.append(int(model(ids).logits[0, -1].argmax()))
        if out[-1] == eos:
            break
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], 1)
    return out


def test_int4_manifest_links_parent_and_records_both_speeds(int4):
    quant, out, stdout = int4
    parent, manifest = _manifest(quant), _manifest(out)
    export = manifest["quantized_export"]
    assert export["format"] == "int4-g128" and export["op"] == "MatMulNBits" and export["bits"] == 4
    assert export["block_size"] == GROUP and export["layers"] == 2 * 7 + 1
    assert manifest["parent"]["manifest_sha256"] == parent["manifest_sha256"]
    assert manifest["parent"]["kind"] == "quantized-causal-lm" and manifest["parent"]["path"] == str(quant.resolve())
    assert manifest["parent_gate"]["gate"] == parent["gate"]
    assert manifest["lineage"][0]["version"] == parent["version"] and "source" in manifest["lineage"][-1]
    # Weight-only: validated against the quantized model's own arithmetic, tokens identical.
    assert manifest["validation"]["identical"] and manifest["validation"]["logits_atol"] == 1e-3
    for speed in (manifest["throughput"], manifest["throughput_float"]):
        assert speed["tokens_per_s"] > 0 and speed["batch"] == 1
    assert manifest["export"]["opset"] == 18 and manifest["export"]["opset_requested"] == "auto"
    assert "quantized: int4-g128 as MatMulNBits (opset 18); float32 graph" in stdout
    assert f"{manifest['throughput_float']['tokens_per_s']:.1f} tokens/s" in stdout
    config = json.loads((out / "ort_config.json").read_text())
    assert "ort_config.json" in manifest["files"] and config["session_options"]["config_entries"] == {}
    assert config["inferforge"]["quantized_export"]["op"] == "MatMulNBits" and config["opset"] == 18
    # The graph is int4 MatMulNBits, not fp32; manifest_sha256 is the parent's digest, as for any parent.
    assert manifest["export"]["dtype"] == "int4-g128" and manifest["runtime"]["dtype"] == "fp32"
    step = next(s for s in manifest["steps"] if s["name"] == "export")
    assert "(int4-g128 MatMulNBits, opset 18)" in step["summary"] and "fp32" not in step["summary"]
    assert "digest" not in manifest["parent"]
    assert manifest["parent"]["manifest_file_sha256"] == hashlib.sha256((quant / "manifest.json").read_bytes()).hexdigest()


def test_inspect_prints_both_speeds_of_a_quantized_export(int4, capsys):
    _, out, _ = int4
    manifest = _manifest(out)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"speed: {manifest['throughput']['tokens_per_s']:.1f} tokens/s at batch 1" in text
    assert (f"quantized: int4-g128 as MatMulNBits (opset 18); float32 graph "
            f"{manifest['throughput_float']['tokens_per_s']:.1f} tokens/s") in text


def test_generate_gives_the_quantized_models_greedy_tokens(int4, capsys):
    from transformers import AutoTokenizer

    quant, out, _ = int4
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "12", "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    prompt = AutoTokenizer.from_pretrained(str(out))(PROMPT)["input_ids"]
    assert tokens and tokens == _reference_greedy(quant, prompt, 12)


def test_w8a8_calibration_flag(qdq, root, tmp_path, monkeypatch, capsys):
    artifact = shutil.copytree(qdq("w8a8"), tmp_path / "elsewhere" / "m-w8a8")   # its cal.txt is not beside it
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["export", str(artifact), "--output", str(out), "-q"]) == 2
    assert "pass --calibration FILE" in _one_line(capsys.readouterr().err) and not out.exists()
    # Not a prefix of --calibration-size any more, and not a missing file.
    assert main(["export", str(artifact), "--calibration", str(tmp_path / "nope.txt"), "--output", str(out), "-q"]) == 2
    assert "--calibration" in _one_line(capsys.readouterr().err) and not out.exists()
    assert main(["export", str(artifact), "--calibration", str(root / "cal.txt"), "--output", str(out), "-q"]) == 0
    manifest = _manifest(out)
    export = manifest["quantized_export"]
    assert export["op"] == "QDQ" and export["activation_scales"].startswith("static per-tensor from cal.txt sha256 ")
    assert export["checks"][0]["passed"] and manifest["export"]["opset"] == 18
    assert manifest["validation"]["logits_atol"] == 5e-2      # against the static-QDQ PyTorch reference


def test_fp8_exports_at_opset_19_and_runs_with_its_session_config(qdq, root, capsys):
    import inferforge

    out = root / "m-fp8-onnx"
    assert main(["export", str(qdq("fp8")), "--output", str(out), "-q"]) == 0
    manifest = _manifest(out)
    assert manifest["export"]["opset"] == 19 and manifest["export"]["opset_requested"] == "auto"
    wanted = {"session.disable_quant_qdq": "1"}
    assert manifest["quantized_export"]["onnxruntime_session_config"] == wanted
    assert manifest["runtime"]["onnxruntime_session_config"] == wanted
    assert json.loads((out / "ort_config.json").read_text())["session_options"]["config_entries"] == wanted
    decoder = inferforge.load(out)
    assert decoder.model.session_config == wanted
    assert len(decoder.generate([[5, 6, 7]], max_new_tokens=4, stop_token_ids=[])[0]) == 4
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"]


def test_bad_flags_on_quantized_input_are_one_line(int4, qdq, root, tmp_path, capsys):
    quant, _, _ = int4
    cases = [
        ([str(qdq("fp8")), "--opset", "18"], "--opset 18: fp8 needs opset >= 19"),
        ([str(quant), "--fp16"], "--fp16 converts a float graph; a quantized artifact exports as it was quantized"),
        ([str(quant), "--calibration", str(root / "cal.txt")], "int4-g128 is weight-only, drop --calibration"),
        ([str(root / "m"), "--calibration", str(root / "cal.txt")], "not a quantized artifact, drop --calibration"),
        (["tests.factories:tiny_bert", "--calibration", str(root / "cal.txt")], "drop --calibration"),
    ]
    for args, message in cases:
        assert main(["export", *args, "--output", str(tmp_path / "out"), "-q"]) == 2, args
        assert message in _one_line(capsys.readouterr().err), args
    assert not (tmp_path / "out").exists()
