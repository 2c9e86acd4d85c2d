"""The pipeline and CLI on a tiny random BERT built by a `module:function` factory (seconds, no downloads)."""

import json

import pytest

import inferforge
from inferforge import pipeline
from inferforge.cli import main
from inferforge.errors import ArtifactError, UserInputError
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


def test_quantize_command_gate_failure_exits_1_and_load_refuses(tmp_path, capsys):
    out = tmp_path / "tiny-int8"
    code = main(["quantize", "tests.factories:tiny_bert", "--output", str(out), "-q", "--min-cosine", "1.0",
                 "--smoothquant-alpha", "0.5", *SMALL])
    captured = capsys.readouterr()
    assert code == 1
    assert "missed: min cosine (held-out)" in captured.err and "required >= 1" in captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["accuracy_passed"] is False
    assert [s["name"] for s in manifest["steps"]] == ["export", "quantize", "validate"]
    assert manifest["steps"][1]["result"]["smoothquant_alpha"] == 0.5
    with pytest.raises(ArtifactError, match="failed its accuracy gate"):
        inferforge.load(out)
    assert inferforge.load(out, allow_failed=True)(["x"]).shape == (1, 64)


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
