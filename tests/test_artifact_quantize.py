"""`inferforge quantize ARTIFACT --onnx`: quantize a tiny BERT's export artifact (seconds, no downloads)."""

import hashlib
import json
import shutil

import onnx
import pytest
from onnx import TensorProto, numpy_helper
from transformers import AutoTokenizer

import inferforge
from inferforge.cli import main
from inferforge.data import SentenceSplit, bucketed, read_sentences, split_sentences
from inferforge.fileio import sha256_file
from inferforge.manifest import verify_artifact, write_manifest
from inferforge.optimize.validate import cosine_rows

CAL, HELD = 16, 24
SIZES = ["--calibration-size", str(CAL), "--held-out-size", str(HELD)]


@pytest.fixture(scope="module")
def export_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    assert main(["export", "tests.factories:tiny_bert", "--output", str(out), "-q", "--name", "tiny", *SIZES]) == 0
    return out


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def quantize(artifact, out, *flags):
    return main(["quantize", str(artifact), "--onnx", "--output", str(out), "-q", "--json", *SIZES, *flags])


def weighted_matmuls(model):
    """MatMul nodes whose second input is (or is dequantized from) an initializer: 6 per layer."""
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def is_weight(name):
        node = producers.get(name)
        return name in inits or (node is not None and node.op_type == "DequantizeLinear" and node.input[0] in inits)
    return [n for n in model.graph.node if n.op_type in ("MatMul", "MatMulInteger") and is_weight(n.input[1])]


def test_dynamic_int8_from_an_export_artifact(export_artifact, tmp_path, capsys):
    parent_before = snapshot(export_artifact)
    out = tmp_path / "tiny-int8"
    assert quantize(export_artifact, out, "--method", "dynamic-int8") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and [s["name"] for s in report["steps"]] == ["quantize", "validate"]

    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 12 and "DynamicQuantizeLinear" in ops

    manifest = verify_artifact(out)
    parent = json.loads((export_artifact / "manifest.json").read_text())
    assert manifest["runtime"]["provider"] == "onnx-int8"
    assert manifest["parent"] == {"path": str(export_artifact.resolve()), "name": "tiny", "version": parent["version"],
                                  "manifest_sha256": sha256_file(export_artifact / "manifest.json"),
                                  "model_sha256": parent["files"]["model.onnx"]["sha256"]}
    assert manifest["source"] == parent["source"]
    # The same texts as a recipe run on the parent's tokenizer and max length: length buckets included.
    split = bucketed(split_sentences("demo", CAL, HELD), AutoTokenizer.from_pretrained(export_artifact), 128)
    calibration, held_out = split.calibration, list(split.held_out)
    quant = manifest["quantization"]
    assert quant["method"] == "dynamic-int8" and quant["calibration_sentences"] == CAL + CAL // 4 + CAL // 8
    assert quant["calibration_sha256"] == hashlib.sha256("\n".join(calibration).encode()).hexdigest()
    assert quant["held_out_buckets"] == {"short": HELD // 4, "ordinary": HELD, "long": HELD // 8}
    assert manifest["runtime"]["max_length"] == 128 and manifest["runtime"]["max_length_origin"].startswith("parent")
    assert manifest["steps"][0]["settings"]["method"] == "dynamic-int8"
    assert [c["name"] for c in manifest["checks"]] == [f"min cosine (held-out), {b}" for b in ("short", "ordinary", "long")]
    assert manifest["accuracy_passed"]
    # The report is portable: the parent by its directory name, no path of this machine.
    assert json.loads((out / "report.json").read_text())["parent"] == {**manifest["parent"], "path": "tiny-onnx"}
    for name in ("report.json", "report.md"):
        assert str(export_artifact.parent) not in (out / name).read_text()
    report_md = (out / "report.md").read_text()
    assert "| short | 6 |" in report_md and "Cosine similarity with onnx-fp32 model of the parent" in report_md

    # The gate compared the int8 model with the parent's fp32 ONNX model on the held-out texts.
    model, reference = inferforge.load(out), inferforge.load(export_artifact)
    cos = cosine_rows(reference(held_out), model(held_out))
    assert manifest["validation"]["min_cosine"] == pytest.approx(cos.min(), abs=1e-6)
    assert 0.99 < cos.min() < 1.0                                   # quantized: close, not identical
    assert snapshot(export_artifact) == parent_before               # the parent is untouched
    verify_artifact(export_artifact)


@pytest.mark.parametrize("calibrate", ["minmax", "entropy", "percentile"])
def test_static_qdq_from_an_export_artifact(export_artifact, tmp_path, capsys, calibrate):
    out = tmp_path / f"tiny-qdq-{calibrate}"
    assert quantize(export_artifact, out, "--method", "static-qdq", "--calibrate-method", calibrate,
                    "--min-cosine", "0.9") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["validation"]["min_cosine"] > 0.9

    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "MatMulInteger" not in ops
    matmuls = weighted_matmuls(model)
    assert len(matmuls) == 12
    for node in matmuls:
        # Both inputs come through DequantizeLinear: QDQ placement that TensorRT fuses into int8 MatMuls.
        act, weight = (producers[name] for name in node.input)
        assert act.op_type == weight.op_type == "DequantizeLinear"
        w_q, scale, zero = (inits[name] for name in weight.input)
        w_shape = numpy_helper.to_array(w_q).shape
        assert w_q.data_type == zero.data_type == TensorProto.INT8
        axis = next(a.i for a in weight.attribute if a.name == "axis")
        assert axis == 1 and numpy_helper.to_array(scale).shape == (w_shape[1],)   # per output channel
        assert not numpy_helper.to_array(zero).any()                               # symmetric
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) == 3:
            zp = inits[node.input[2]]
            assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any()

    manifest = inferforge.load(out).manifest
    assert manifest["quantization"]["method"] == "static-qdq"
    assert manifest["steps"][0]["settings"]["calibrate_method"] == calibrate
    assert manifest["parent"]["path"] == str(export_artifact.resolve())


def test_calibration_file_is_used_and_hashed(export_artifact, tmp_path, capsys):
    held = read_sentences("demo")[:HELD]
    texts = [f"calibration sentence number {i} about nothing in particular." for i in range(CAL)]
    cal = tmp_path / "cal.txt"
    cal.write_text("\n".join(texts + texts[:3]) + "\n")    # duplicates are dropped
    out = tmp_path / "q"
    assert quantize(export_artifact, out, "--calibration", str(cal), "--smoothquant-alpha", "off") == 0
    quant = json.loads(capsys.readouterr().out)["quantization"]
    # The file's texts calibrate (with short queries and long passages made from them, as in a recipe run).
    split = bucketed(SentenceSplit(tuple(texts), tuple(held)), AutoTokenizer.from_pretrained(export_artifact), 128)
    assert split.calibration[:CAL] == tuple(texts)
    assert quant["calibration_source"] == str(cal) and quant["calibration_sentences"] == len(split.calibration)
    assert quant["calibration_sha256"] == hashlib.sha256("\n".join(split.calibration).encode()).hexdigest()
    assert quant["held_out_sha256"] == hashlib.sha256("\n".join(split.held_out).encode()).hexdigest()


def test_missed_gate_exits_1_and_writes_only_a_failure_report(export_artifact, tmp_path, capsys):
    out = tmp_path / "strict"
    failed = tmp_path / "strict.failed"
    assert quantize(export_artifact, out, "--min-cosine", "1.0") == 1
    err = capsys.readouterr().err
    assert "missed: min cosine (held-out)" in err and "no artifact was written" in err
    assert f"report: {failed / 'report.md'}" in err
    assert [p.name for p in tmp_path.iterdir()] == ["strict.failed"]   # no artifact, no staging or scratch directory
    report = json.loads((failed / "report.json").read_text())
    assert report["passed"] is False and report["checks"][0]["measured"] < 1.0 and report["parent"]["name"] == "tiny"
    assert "Result: **FAIL**" in (failed / "report.md").read_text()

    assert quantize(export_artifact, out) == 0              # a passing run removes the stale failure report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict"]
    before = snapshot(out)
    assert quantize(export_artifact, out, "--min-cosine", "1.0") == 1   # an earlier artifact survives a failed run
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["strict", "strict.failed"]


def _without_model(export_artifact, tmp_path):
    art = tmp_path / "no-model"
    shutil.copytree(export_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "model.onnx").unlink()
    (art / "manifest.json").unlink()
    write_manifest(art, {k: v for k, v in manifest.items() if k not in ("format", "version", "files")})
    return art


def _tampered(export_artifact, tmp_path):
    art = tmp_path / "tampered"
    shutil.copytree(export_artifact, art)
    data = bytearray((art / "model.onnx").read_bytes())
    data[-1] ^= 1
    (art / "model.onnx").write_bytes(bytes(data))
    return art


def _edited_manifest(export_artifact, tmp_path):
    art = tmp_path / "edited"
    shutil.copytree(export_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["validation"]["min_cosine"] = 1.0
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return art


def _model_dir(export_artifact, tmp_path):
    (tmp_path / "hf").mkdir()
    shutil.copyfile(export_artifact / "config.json", tmp_path / "hf" / "config.json")
    return tmp_path / "hf"


def _causal_lm_dir(export_artifact, tmp_path):
    from tests.factories_llama import save_tiny_llama

    return save_tiny_llama(tmp_path / "llama")


def _causal_lm_artifact(export_artifact, tmp_path):
    from inferforge.artifact import package_checkpoint

    return package_checkpoint(_causal_lm_dir(export_artifact, tmp_path), tmp_path / "llama-art")


def _quantized(export_artifact, tmp_path):
    assert quantize(export_artifact, tmp_path / "int8") == 0
    return tmp_path / "int8"


@pytest.mark.parametrize("make_input, message", [
    (lambda a, t: t / "missing", "no such directory; --onnx needs an ONNX export artifact"),
    (_model_dir, "is a model directory, not an export artifact: export it first (`inferforge export"),
    (_causal_lm_dir, "is a causal LM, and --onnx quantizes ONNX encoder export artifacts"),
    (_causal_lm_artifact, "--config FORMAT"),
    (_without_model, "artifact holds no model.onnx; --onnx needs an ONNX export artifact"),
    (_tampered, "'model.onnx' does not match its sha256"),
    (_edited_manifest, "manifest.json was edited after the run"),
    (_quantized, "already quantized (onnx-int8); give the fp32 export artifact"),
], ids=["missing", "model-dir", "causal-lm-dir", "causal-lm-artifact", "no-model", "tampered", "edited-manifest",
        "quantized"])
def test_bad_inputs_are_clear_errors(export_artifact, tmp_path, capsys, make_input, message):
    source = make_input(export_artifact, tmp_path)
    out = tmp_path / "out"
    assert quantize(source, out) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ")
    assert not out.exists()


def test_onnx_with_config_or_inside_the_parent_is_refused(export_artifact, tmp_path, capsys):
    assert quantize(export_artifact, tmp_path / "o", "--config", "int4-g128") == 2
    assert "give one of them, not both" in capsys.readouterr().err
    assert quantize(export_artifact, export_artifact / "sub") == 2
    assert "overlaps the artifact being quantized" in capsys.readouterr().err
    assert not (export_artifact / "sub").exists()
    verify_artifact(export_artifact)

