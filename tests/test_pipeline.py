"""The pipeline and CLI on a tiny random BERT built by a `module:function` factory (seconds, no downloads)."""

import json

import pytest

import inferforge
from inferforge import pipeline
from inferforge.cli import main
from inferforge.errors import ArtifactError, GateFailed, UserInputError
from inferforge.recipe import ExportConfig, recipe_from_dict

SMALL = ["--calibration-size", "16", "--held-out-size", "24", "--name", "tiny"]


def tiny_recipe(out, **extra):
    return recipe_from_dict({"name": "tiny", "model": "tests.factories:tiny_bert", "steps": ["export", "validate"],
                             "data": {"calibration_size": 8, "held_out_size": 8}, "output": str(out), **extra})


def test_export_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "tiny-onnx"
    code = main(["export", "tests.factories:tiny_bert", "--output", str(out), "--json", "-q", *SMALL])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"]
    assert report["validation"]["min_cosine"] > 0.9999          # fp32 export: same model
    model = inferforge.load(out)
    emb = model(["a sentence", "another, longer sentence"])
    assert emb.shape == (2, 64)
    assert abs(float((emb ** 2).sum(1)[0]) - 1) < 1e-5          # L2-normalized
    assert model.manifest["source"]["model"] == "tests.factories:tiny_bert"


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_failed_gate_keeps_the_earlier_artifact_and_writes_a_failed_report(tmp_path, capsys):
    out = tmp_path / "tiny-int8"
    quantize = ["quantize", "tests.factories:tiny_bert", "--output", str(out), "-q", "--smoothquant-alpha", "0.5", *SMALL]
    assert main([*quantize, "--min-cosine", "0.5"]) == 0
    before = snapshot(out)
    capsys.readouterr()

    code = main([*quantize, "--min-cosine", "1.0"])            # stricter: a quantized model cannot reach 1.0
    captured = capsys.readouterr()
    assert code == 1
    assert "missed: min cosine (held-out)" in captured.err and "required >= 1" in captured.err
    failed = tmp_path / "tiny-int8.failed"
    assert f"report: {failed / 'report.md'}" in captured.err and f"{out} is unchanged" in captured.err
    assert snapshot(out) == before                               # the earlier artifact, byte for byte
    inferforge.load(out)                                         # and it still verifies
    assert sorted(p.name for p in failed.iterdir()) == ["report.json", "report.md"]
    report = json.loads((failed / "report.json").read_text())
    assert report["passed"] is False and report["accuracy_passed"] is False and report["artifact"] is None
    assert [s["name"] for s in report["steps"]] == ["export", "quantize", "validate"]
    assert report["checks"][0]["measured"] < 1.0 and report["checks"][0]["passed"] is False
    md = (failed / "report.md").read_text()
    assert "Result: **FAIL**" in md and "none written" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-int8", "tiny-int8.failed"]   # no staging left
    with pytest.raises(ArtifactError, match="the reports of a run that missed a gate or target, not an artifact"):
        inferforge.load(failed)

    assert main([*quantize, "--min-cosine", "0.5"]) == 0        # a passing run removes the stale failure report
    assert not failed.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-int8"]


def test_failed_gate_with_no_earlier_artifact_writes_nothing_at_the_output(tmp_path, capsys):
    out = tmp_path / "tiny-int8"
    code = main(["quantize", "tests.factories:tiny_bert", "--output", str(out), "-q", "--min-cosine", "1.0", "--json",
                 *SMALL])
    assert code == 1 and not out.exists()
    printed = json.loads(capsys.readouterr().out)                # --json still prints the failed run's report
    assert printed == json.loads((tmp_path / "tiny-int8.failed" / "report.json").read_text())
    with pytest.raises(ArtifactError, match="not a directory"):
        inferforge.load(out)


def bench_recipe(out, **extra):
    return tiny_recipe(out, steps=["export", "validate", {"bench": {"batch_sizes": [1], "seq_len": 16, "warmup": 1,
                                                                     "iterations": 3}}], **extra)


def test_missed_latency_target_publishes_nothing(tmp_path):
    out = tmp_path / "art"
    assert pipeline.run_recipe(tiny_recipe(out)).passed
    before = snapshot(out)
    # A target nothing can meet: 1 microsecond.
    result = pipeline.run_recipe(bench_recipe(out, targets={"latency": [{"batch_size": 1, "max_ms": 0.001}]}))
    assert not result.passed and result.failure_report == tmp_path / "art.failed"
    assert [c["kind"] for c in result.failures] == ["target"] and result.report["accuracy_passed"]
    assert snapshot(out) == before
    report = json.loads((tmp_path / "art.failed" / "report.json").read_text())
    assert report["benchmark"]["results"] and report["checks"][-1]["limit"] == 0.001
    with pytest.raises(GateFailed, match="art.failed/report.md"):
        pipeline.raise_on_failure(result)


def test_failed_gate_stops_the_run_before_the_benchmark(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from inferforge.progress import Progress
    from inferforge.recipe import BenchConfig

    def must_not_run(ctx, cfg):
        raise AssertionError("bench ran after a failed gate")

    monkeypatch.setitem(pipeline._RUNNERS, BenchConfig, must_not_run)
    stream = io.StringIO()
    progress = Progress(console=Console(file=stream, width=300, color_system=None))
    recipe = tiny_recipe(tmp_path / "art", steps=["export", {"quantize": {"smoothquant_alpha": 0.5}}, "validate",
                                                 {"bench": {"batch_sizes": [1]}}], gates={"min_cosine": 1.0})
    result = pipeline.run_recipe(recipe, progress=progress)
    assert not result.passed and not (tmp_path / "art").exists()
    lines = stream.getvalue().splitlines()
    validate = next(line for line in lines if "validate" in line)
    first = result.failures[0]                                    # (one per length bucket, where there are buckets)
    name, measured = first["name"], first["measured"]
    assert name.startswith("min cosine (held-out)")
    # A measurement that rounds to the limit at 6 digits prints with the digits that tell them apart.
    shown = pipeline.check_numbers(measured, 1.0)[0]
    assert float(shown) < 1.0 or measured >= 1.0
    assert validate.startswith("✗") and f"gate missed: {name} measured {shown}" in validate
    assert "required >= 1" in validate
    assert all(line.startswith("✓") for line in lines if "export" in line or "quantize" in line)
    assert any("skipped: bench (the accuracy gate failed)" in line for line in lines)
    report = json.loads((tmp_path / "art.failed" / "report.json").read_text())
    assert report["skipped_steps"] == ["bench"] and report["benchmark"] is None
    assert report["validation"]["min_cosine"] == min(c["measured"] for c in result.failures) < 1.0
    md = (tmp_path / "art.failed" / "report.md").read_text()
    assert "Not run because the accuracy gate failed: bench." in md
    assert f"| {name} | {measured:.6g} | >= 1 | FAIL |" in md
    assert f"gate missed: {name} measured {shown}" in report["steps"][-1]["summary"]


def test_recipe_artifact_records_the_sentences_sha256(tmp_path):
    import hashlib

    from transformers import AutoTokenizer

    from inferforge.data import bucketed, split_sentences
    from inferforge.models import demo_model_dir

    out = tmp_path / "art"
    pipeline.run_recipe(tiny_recipe(out))
    data = json.loads((out / "manifest.json").read_text())["data"]
    # The texts actually used: 8 sentences each, plus the short queries and long passages made from them.
    split = bucketed(split_sentences("demo", 8, 8), AutoTokenizer.from_pretrained(demo_model_dir()), 128)
    assert data["calibration_sentences"] == len(split.calibration) == 11 and data["held_out_sentences"] == 11
    assert data["calibration_sha256"] == hashlib.sha256("\n".join(split.calibration).encode()).hexdigest()
    assert data["held_out_sha256"] == hashlib.sha256("\n".join(split.held_out).encode()).hexdigest()


def test_recipe_output_and_model_are_relative_to_the_recipe_file_and_reports_are_portable(tmp_path, monkeypatch):
    from tests.factories import tiny_bert

    project = tmp_path / "project"
    model, tokenizer = tiny_bert()
    model.save_pretrained(project / "models" / "tiny")
    tokenizer.save_pretrained(project / "models" / "tiny")
    recipe = project / "recipes" / "tiny.yaml"
    recipe.parent.mkdir()
    recipe.write_text("model: ../models/tiny\nsteps: [export, validate]\n"
                      "data: {calibration_size: 8, held_out_size: 8}\noutput: ../runs/tiny\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["optimize", str(recipe), "-q", "--json"]) == 0
    out = project / "runs" / "tiny"                               # beside the recipe, not in the working directory
    assert (out / "manifest.json").is_file() and not any(elsewhere.iterdir())
    for name in ("report.json", "report.md"):
        assert str(tmp_path) not in (out / name).read_text()     # no path of the machine that made it
    report = json.loads((out / "report.json").read_text())
    assert report["artifact"] == "tiny" and report["source"]["model"] == "../models/tiny"
    manifest = inferforge.load(out).manifest
    assert manifest["source"]["path"] == str((project / "models" / "tiny").resolve())   # for bench --compare-source
    assert main(["optimize", str(recipe), "-q", "--output", "here"]) == 0   # --output: the working directory
    assert (elsewhere / "here" / "manifest.json").is_file()


def test_factory_with_wrong_return_type(tmp_path, capsys):
    code = main(["export", "tests.factories:not_a_pair", "--output", str(tmp_path / "o"), "-q", *SMALL])
    assert code == 2
    assert "must return (model, tokenizer)" in capsys.readouterr().err


def test_refuses_to_overwrite_a_directory_that_is_not_an_artifact(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code = main(["export", "tests.factories:tiny_bert", "--output", str(out), "-q", *SMALL])
    assert code == 2 and "not an inferforge artifact" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_interrupted_run_leaves_the_earlier_artifact_untouched(tmp_path, monkeypatch):
    out = tmp_path / "art"
    first = pipeline.run_recipe(tiny_recipe(out))
    assert first.passed
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(ctx, cfg):
        (ctx.staging / "model.onnx").write_bytes(b"half")   # partial output in the staging directory
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline._RUNNERS, ExportConfig, interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_recipe(tiny_recipe(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]   # no staging or scratch directories left
    inferforge.load(out)                                            # still verifies


def test_too_few_sentences_is_a_clear_error(tmp_path):
    text = tmp_path / "few.txt"
    text.write_text("one sentence\nanother one\n")
    with pytest.raises(UserInputError, match="2 distinct sentences, but calibration_size"):
        pipeline.run_recipe(tiny_recipe(tmp_path / "o", data={"sentences": str(text)}))


@pytest.mark.parametrize("calibrate", ["minmax", "percentile", "entropy"])
def test_static_qdq_quantization(tmp_path, capsys, calibrate):
    import onnx

    out = tmp_path / f"qdq-{calibrate}"
    code = main(["quantize", "tests.factories:tiny_bert", "--output", str(out), "-q", "--min-cosine", "0.5",
                 "--method", "static-qdq", "--calibrate-method", calibrate, "--json", *SMALL])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["validation"]["min_cosine"] > 0.5
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "MatMulInteger" not in ops
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"][1]["result"]["calibrate_method"] == calibrate


def test_failed_export_check_publishes_nothing_and_reports_the_measurement(tmp_path, capsys):
    out = tmp_path / "art"
    assert pipeline.run_recipe(tiny_recipe(out)).passed
    before = snapshot(out)
    # No export matches PyTorch to 1e-12: the export step's own gate fails, validate is not run.
    result = pipeline.run_recipe(tiny_recipe(out, steps=[{"export": {"atol": 1e-12}}, "validate"]))
    assert not result.passed and snapshot(out) == before
    (check,) = result.failures
    assert check["name"] == "ONNX Runtime vs PyTorch max abs diff (export)" and check["limit"] == 1e-12
    assert check["measured"] > 1e-12
    report = json.loads((tmp_path / "art.failed" / "report.json").read_text())
    assert report["skipped_steps"] == ["validate"] and report["checks"] == [check]
    assert "the export is not faithful" in report["steps"][0]["summary"]


def test_a_missed_target_marks_the_bench_step_failed(tmp_path):
    """The bench step's progress line shows the miss (as the validate step's does), not a check mark."""
    import io

    from rich.console import Console

    from inferforge.progress import Progress

    stream = io.StringIO()
    progress = Progress(console=Console(file=stream, width=300, color_system=None))
    recipe = tiny_recipe(tmp_path / "art", steps=["export", "validate", {"bench": {"batch_sizes": [1], "iterations": 3,
                                                                                   "warmup": 0}}],
                         targets={"latency": [{"batch_size": 1, "percentile": "p50", "max_ms": 1e-6}]})
    result = pipeline.run_recipe(recipe, progress=progress)
    assert not result.passed and not (tmp_path / "art").exists()
    bench_line = next(line for line in stream.getvalue().splitlines() if " bench " in line)
    assert bench_line.lstrip().startswith("✗") and "target missed: onnx-fp32 p50 latency, batch 1 (ms)" in bench_line
    validate_line = next(line for line in stream.getvalue().splitlines() if " validate " in line)
    assert validate_line.lstrip().startswith("✓")


def test_a_factory_module_is_found_from_the_working_directory():
    """The `inferforge` script, unlike `python -m`, does not put the working directory on sys.path."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = "from inferforge.models import check_model_spec; check_model_spec('tests.factories:tiny_bert')"
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_missed_checks_print_limits_with_the_digits_they_have():
    """A limit of 0.9999999 prints as itself, not 'required >= 1', and a measurement just below it prints
    differently from it."""
    from inferforge.pipeline import check_line, missed_message

    check = {"name": "min cosine", "measured": 0.99999984, "op": ">=", "limit": 0.9999999, "passed": False}
    assert check_line(check) == "min cosine: measured 0.9999998, required >= 0.9999999"
    assert missed_message([check, {**check, "name": "ok", "passed": True}]) == (
        "missed: min cosine: measured 0.9999998, required >= 0.9999999")
    assert check_line({**check, "measured": 0.912345678, "limit": 0.99}) == (
        "min cosine: measured 0.912346, required >= 0.99")
