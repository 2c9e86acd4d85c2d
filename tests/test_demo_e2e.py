"""The default job on the real all-MiniLM-L6-v2 weights, as a user runs it: `inferforge optimize`."""

import json
import shutil

import numpy as np
import pytest

import inferforge
from inferforge.data import bucketed, split_sentences
from inferforge.encoder import TorchEncoder
from inferforge.errors import ArtifactError
from inferforge.fileio import sha256_file
from inferforge.models import demo_model_dir
from inferforge.optimize.validate import cosine_rows
from inferforge.recipe import builtin_recipe_path, load_recipe
from tests.conftest import run_cli


def test_default_job_writes_artifact_and_reports(demo_run):
    out, report, proc = demo_run
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "manifest.json", "report.md", "report.json", "tokenizer.json", "vocab.txt"} <= names
    assert json.loads((out / "report.json").read_text()) == report
    assert report["artifact"] == out.name                         # portable: the directory name, not this machine's path
    assert str(out.parent) not in (out / "report.md").read_text() + (out / "report.json").read_text()
    md = (out / "report.md").read_text()
    assert "## Latency" in md and "| onnx-int8 | 8 |" in md and "Result: **PASS**" in md
    assert "| bucket | texts | tokens | min cosine | mean cosine |" in md and "| short | 80 |" in md


def test_accuracy_gate_passes_on_held_out_sentences(demo_run):
    _, report, _ = demo_run
    val = report["validation"]
    # Short queries (1-3 words), the sentences, and passages up to the model's 256 tokens.
    assert {k: b["sentences"] for k, b in val["buckets"].items()} == {"short": 80, "ordinary": 320, "long": 40}
    assert val["sentences"] == 440 and val["max_length"] == 256
    assert val["buckets"]["short"]["tokens"][1] <= 10 and val["buckets"]["long"]["tokens"][1] == 256
    limits = load_recipe(builtin_recipe_path("demo")).gates
    for name, b in val["buckets"].items():
        assert b["min_cosine"] >= limits.min_cosine and b["mean_cosine"] >= limits.mean_cosine, name
    gates = [c for c in report["checks"] if c["kind"] == "gate"]
    assert [(c["name"].split(" (")[0], c["bucket"]) for c in gates] == [
        (stat, bucket) for bucket in ("short", "ordinary", "long") for stat in ("min cosine", "mean cosine")]
    assert all(c["passed"] for c in gates)
    assert {c["limit"] for c in gates} == {limits.min_cosine, limits.mean_cosine}


def test_benchmark_covers_every_provider_and_batch_size(demo_run):
    _, report, _ = demo_run
    bench = report["benchmark"]
    assert bench["seq_len"] == 128
    rows = {(r["provider"], r["batch_size"]) for r in bench["results"]}
    assert rows == {(p, b) for p in ("pytorch-fp32", "onnx-fp32", "onnx-int8") for b in (1, 8)}
    for r in bench["results"]:
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["samples"] == 30
    names = [c["name"] for c in report["checks"]]
    assert "onnx-int8 p50 speedup over onnx-fp32, batch 8" in names


def test_manifest_records_provenance(demo_run):
    out, report, _ = demo_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "minilm-int8" and len(manifest["version"]) == 12
    assert manifest["source"]["weights_sha256"] == sha256_file(demo_model_dir() / "model.safetensors")
    assert [s["name"] for s in manifest["steps"]] == ["export", "quantize", "validate", "bench"]
    for step in manifest["steps"]:
        assert step["duration_s"] > 0 and step["tools"]["onnxruntime"] and step["settings"] is not None
    assert manifest["recipe"]["steps"][1]["quantize"]["per_channel"] is True
    assert manifest["recipe"]["gates"] == {"min_cosine": 0.965, "mean_cosine": 0.98}
    # The source model's own limit (sentence-transformers cuts at 256), not a silent 128.
    assert manifest["runtime"]["max_length"] == 256
    assert manifest["runtime"]["max_length_origin"] == "source model (sentence_bert_config.json max_seq_length)"
    assert manifest["validation"] == report["validation"] and manifest["benchmark"] == report["benchmark"]
    assert {"python", "torch", "onnxruntime", "cpu"} <= set(manifest["environment"])
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}


def test_load_reproduces_the_validation_numbers(demo_run):
    out, report, _ = demo_run
    model = inferforge.load(out)
    torch_model = TorchEncoder(demo_model_dir(), max_length=256)
    held_out = list(bucketed(split_sentences("demo", 160, 320), torch_model.tokenizer, 256).held_out)
    reference = torch_model(held_out)
    cos = cosine_rows(reference, model(held_out))
    assert cos.min() == pytest.approx(report["validation"]["min_cosine"], abs=1e-6)
    assert cos.mean() == pytest.approx(report["validation"]["mean_cosine"], abs=1e-6)
    # Same call signature as the source: one string or a list in, [n, 384] float32 out.
    single = model("Just one sentence.")
    assert single.shape == (1, 384) and single.dtype == np.float32


def test_load_refuses_a_tampered_artifact(demo_run, tmp_path):
    out, _, _ = demo_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ArtifactError, match="'model.onnx' does not match its sha256"):
        inferforge.load(copy)
    proc = run_cli("inspect", copy)
    assert proc.returncode == 2 and "does not match its sha256" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_prints_the_manifest(demo_run):
    out, _, _ = demo_run
    proc = run_cli("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert "minilm-int8" in proc.stdout and "files verified" in proc.stdout and "quantize" in proc.stdout
    proc = run_cli("inspect", out, "--json")
    assert json.loads(proc.stdout)["name"] == "minilm-int8"


def test_bench_command_gates_on_targets(demo_run):
    out, _, _ = demo_run
    ok = run_cli("bench", out, "--batch-sizes", "1", "--iterations", "3", "--warmup", "1", "--target", "1:100000",
                 "--json", "-q")
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["checks"][0]["passed"] and result["benchmark"]["results"][0]["provider"] == "onnx-int8"
    missed = run_cli("bench", out, "--batch-sizes", "1", "--iterations", "3", "--warmup", "1", "--target", "1:0.001", "-q")
    assert missed.returncode == 1 and "FAILED" in missed.stderr
    bad = run_cli("bench", out, "--batch-sizes", "1", "--target", "8:10")
    assert bad.returncode == 2 and "--batch-sizes does not include" in bad.stderr
