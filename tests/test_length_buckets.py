"""Length-aware validation: one gate per length bucket, the source model's max length kept and recorded."""

import json

import pytest

from inferforge import pipeline
from inferforge.cli import main
from inferforge.models import source_max_length
from inferforge.recipe import Gates, Targets, recipe_from_dict


def bucket(min_cosine, mean_cosine, n=10):
    return {"sentences": n, "min_cosine": min_cosine, "mean_cosine": mean_cosine, "p01_cosine": min_cosine,
            "tokens": [3, 9]}


def validation(**buckets):
    return {"sentences": 30, "min_cosine": min(b["min_cosine"] for b in buckets.values()),
            "mean_cosine": 0.995, "p01_cosine": 0.99, "worst": [], "buckets": buckets}


def test_every_length_bucket_has_its_own_gate():
    # Short queries miss the gate on their minimum although their mean and the other buckets pass.
    val = validation(short=bucket(0.983, 0.996), ordinary=bucket(0.995, 0.998), long=bucket(0.992, 0.997))
    checks = pipeline.check_results(Gates(min_cosine=0.99), Targets(), {"validation": val}, "onnx-int8")
    assert [(c["name"], c["bucket"], c["passed"]) for c in checks] == [
        ("min cosine (held-out), short", "short", False),
        ("min cosine (held-out), ordinary", "ordinary", True),
        ("min cosine (held-out), long", "long", True)]
    assert checks[0]["measured"] == 0.983 and all(c["limit"] == 0.99 and c["kind"] == "gate" for c in checks)
    # The mean gate, when set, is per bucket too.
    checks = pipeline.check_results(Gates(min_cosine=0.9, mean_cosine=0.997), Targets(), {"validation": val}, "x")
    assert [c["passed"] for c in checks if c["name"].startswith("mean")] == [False, True, True]


def test_a_long_bucket_below_the_gate_fails_the_run_even_when_its_mean_passes():
    val = validation(short=bucket(0.995, 0.998), ordinary=bucket(0.995, 0.998), long=bucket(0.989, 0.999))
    checks = pipeline.check_results(Gates(min_cosine=0.99), Targets(), {"validation": val}, "onnx-int8")
    assert [c["bucket"] for c in checks if not c["passed"]] == ["long"]


def test_max_length_comes_from_the_source_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1000000000000000019884624838656}))
    assert source_max_length(tmp_path) == (512, "config.json max_position_embeddings")
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    assert source_max_length(tmp_path) == (256, "sentence_bert_config.json max_seq_length")


def test_export_run_reports_every_bucket_and_keeps_the_models_max_length(tmp_path, capsys):
    out = tmp_path / "tiny-onnx"
    code = main(["export", "tests.factories:tiny_bert", "--output", str(out), "--json",
                 "--calibration-size", "16", "--held-out-size", "24", "--name", "tiny"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    val = report["validation"]
    assert {k: v["sentences"] for k, v in val["buckets"].items()} == {"short": 6, "ordinary": 24, "long": 3}
    assert val["sentences"] == 33 and val["max_length"] == 128
    assert val["buckets"]["short"]["tokens"][1] <= 12
    assert val["buckets"]["long"]["tokens"][1] == 128                # long inputs reach the model's limit
    assert [c["bucket"] for c in report["checks"]] == ["short", "ordinary", "long"]
    manifest = json.loads((out / "manifest.json").read_text())
    # tiny_bert: 128 position embeddings, tokenizer limit 512 -> 128.
    assert manifest["runtime"]["max_length"] == 128
    assert manifest["runtime"]["max_length_origin"] == "source model (config.json max_position_embeddings)"
    md = (out / "report.md").read_text()
    assert "| bucket | texts | tokens | min cosine | mean cosine |" in md
    assert "| short | 6 |" in md and "| long | 3 | " in md and "cut at 128 tokens" in md


def test_recipe_max_length_overrides_the_models(tmp_path):
    recipe = recipe_from_dict({"name": "tiny", "model": "tests.factories:tiny_bert", "steps": ["export", "validate"],
                               "data": {"calibration_size": 8, "held_out_size": 8, "max_length": 48},
                               "output": str(tmp_path / "o")})
    result = pipeline.run_recipe(recipe)
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["runtime"]["max_length"] == 48
    assert manifest["runtime"]["max_length_origin"] == "recipe data.max_length"
    assert result.report["validation"]["buckets"]["long"]["tokens"][1] == 48


@pytest.mark.parametrize("bad", [0, 9000])
def test_bad_max_length_is_refused(bad, tmp_path):
    from inferforge.errors import UserInputError

    with pytest.raises(UserInputError, match="max_length must be between 1 and 8192"):
        recipe_from_dict({"model": "tests.factories:tiny_bert", "steps": ["export"], "data": {"max_length": bad},
                          "output": str(tmp_path / "o")})


def test_command_summary_shows_each_bucket(capsys):
    from inferforge.cli import _print_summary

    val = validation(short=bucket(0.983, 0.996, n=80), ordinary=bucket(0.995, 0.998, n=320),
                     long=bucket(0.992, 0.997, n=40))
    val["max_length"] = 256
    checks = pipeline.check_results(Gates(min_cosine=0.99), Targets(), {"validation": val}, "onnx-int8")
    _print_summary({"validation": val, "checks": checks})
    out = capsys.readouterr().out
    assert "inputs up to 256 tokens" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 5}
    assert "80" in rows["short"] and "0.9830" in rows["short"] and "0.9960" in rows["short"]
    assert "320" in rows["ordinary"] and "0.9950" in rows["ordinary"]
    assert "min cosine (held-out), short" in out and "FAIL" in out
