"""What the other commands do with a student: a Llama student runs on the engine; an encoder student
exports to ONNX, quantizes and loads."""

import json

import pytest

import inferforge
from inferforge.cli import main
from inferforge.runtime.engine import LLMEngine
from tests.conftest import run_cli
from tests.distill_helpers import DOCS, save_tiny_bert
from tests.factories_llama import save_tiny_llama, save_word_text, save_word_tokenizer


def test_tiny_llama_distils_into_a_one_layer_student_the_engine_generates_from(tmp_path, capsys):
    teacher = save_tiny_llama(tmp_path / "llama", num_hidden_layers=2)
    save_word_tokenizer(teacher)
    text = save_word_text(tmp_path / "text.txt", lines=40, words=24)
    out = tmp_path / "student"
    rc = main(["distill", str(teacher), "--num-layers", "1", "--data", str(text), "--steps", "4", "--batch-size", "4",
               "--eval-every", "2", "--task-weight", "0.5", "--min-top1-agreement", "0", "--json", "-q",
               "--output", str(out)])
    assert rc == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["kind"] == "distilled-causal-lm" and manifest["distill"]["student"]["layer_map"] == [1]
    metrics = manifest["metrics"]
    assert 0 <= metrics["top1_agreement"] <= 1 and metrics["kl"] >= 0 and metrics["held_out_positions"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert {"loss_kl", "loss_task", "loss_hidden"} <= set(steps[0])   # decoders: KL + task + hidden MSE (weight 1)
    engine = inferforge.load(out)
    assert isinstance(engine, LLMEngine) and engine.manifest["kind"] == "distilled-causal-lm"
    (tokens,) = engine.generate([[1, 5, 6, 7]], max_new_tokens=5, stop_token_ids=[])
    assert len(tokens) == 5 and all(0 <= t < 256 for t in tokens)
    direct = LLMEngine.from_pretrained(out)
    assert direct.generate([[1, 5, 6, 7]], max_new_tokens=5, stop_token_ids=[]) == [tokens]


@pytest.mark.slow
def test_encoder_student_exports_quantizes_and_loads(tmp_path):
    teacher = save_tiny_bert(tmp_path / "bert", layers=2)
    student = tmp_path / "student"
    proc = run_cli("distill", teacher, "--layers", "1", "--data", DOCS, "--steps", "4", "--batch-size", "8",
                   "--max-length", "32", "-q", "--output", student)
    assert proc.returncode == 0, proc.stderr
    common = ["--sentences", DOCS, "--calibration-size", "40", "--held-out-size", "60", "--min-cosine", "0.5", "-q"]
    proc = run_cli("export", student, *common, "--output", tmp_path / "onnx")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("quantize", student, *common, "--output", tmp_path / "int8")
    assert proc.returncode == 0, proc.stderr
    for name, provider in (("onnx", "onnx-fp32"), ("int8", "onnx-int8")):
        model = inferforge.load(tmp_path / name)
        assert model.manifest["runtime"]["provider"] == provider
        assert model.manifest["source"]["weights_sha256"] == inferforge.load(student).manifest["files"][
            "model.safetensors"]["sha256"]
        assert model(["a short text"]).shape == (1, 32)
    proc = run_cli("bench", student, "--batch-sizes", "1", "--seq-len", "16", "--iterations", "3", "--warmup", "0",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["benchmark"]["results"][0]["provider"] == "pytorch-fp32"


@pytest.mark.parametrize("kind, route", [("distilled-encoder", "encoder"), ("distilled-causal-lm", "decoder")])
def test_export_routes_a_student_artifact_as_the_model_directory_it_is(tmp_path, kind, route):
    """A student is a Hugging Face model directory with a manifest: an encoder goes to the encoder export
    (the student directory as the model), a causal LM to the decoder export with the student as parent."""
    from argparse import Namespace

    from inferforge.export_cli import _route
    from inferforge.manifest import write_manifest
    from inferforge.optimize.llm_export_artifact import resolve_source

    student = save_tiny_bert(tmp_path / "s", layers=1) if route == "encoder" else save_tiny_llama(tmp_path / "s")
    manifest = write_manifest(student, {"name": "student", "kind": kind})
    assert _route(Namespace(model=str(student))) == route
    if route == "decoder":
        source = resolve_source(student)
        assert source.kind == kind and source.model_dir == student
        assert source.parent["kind"] == kind and source.parent["manifest_sha256"] == manifest["manifest_sha256"]
