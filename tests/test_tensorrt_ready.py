"""TensorRT readiness (issue 11): planted problems are named by node and op type, profiles cover every
dynamic dimension of an exported decoder, and trtexec.sh carries the shapes."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from inferforge.errors import UserInputError
from inferforge.optimize.llm_export import export_decoder_onnx
from inferforge.optimize.tensorrt_profiles import graph_inputs, profile_problems
from inferforge.optimize.tensorrt_ready import (
    default_profiles,
    operator_table,
    readiness_report,
    write_tensorrt_files,
)
from tests.factories_llama import save_tiny_llama

FLOAT_PROFILE = {"x": {"min": [1, 4], "opt": [2, 4], "max": [4, 4]}}


def _save(tmp_path, nodes, *, inputs=None, outputs=None, initializers=(), opset=17, extra_opsets=(), name="model.onnx"):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "planted", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _has(findings, check, name, op_type):
    return any(f["check"] == check and f["name"] == name and f["op_type"] == op_type for f in findings)


def test_clean_float_graph_is_ready(tmp_path):
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="relu")])
    report = readiness_report(path, profiles=FLOAT_PROFILE)
    assert report["ready"] and report["errors"] == [] and report["warnings"] == []
    assert report["trt_version"] == operator_table()["trt_version"] and report["op_counts"] == {"Relu": 1}


def test_contrib_op_is_an_error_named_by_node(tmp_path):
    w = numpy_helper.from_array(np.ones(4, np.float32), "gamma")
    node = helper.make_node("SkipLayerNormalization", ["x", "x", "gamma"], ["y"], name="planted_skip",
                            domain="com.microsoft")
    report = readiness_report(_save(tmp_path, [node], initializers=[w], extra_opsets=["com.microsoft"]),
                              profiles=FLOAT_PROFILE)
    assert not report["ready"]
    assert _has(report["errors"], "contrib-op", "planted_skip", "SkipLayerNormalization")


@pytest.mark.parametrize("op_type", ["Unique", "MadeUpOp"])
def test_unsupported_op_is_an_error(tmp_path, op_type):
    node = helper.make_node(op_type, ["x"], ["y"], name="planted_op")
    report = readiness_report(_save(tmp_path, [node]), profiles=FLOAT_PROFILE)
    assert not report["ready"] and _has(report["errors"], "unsupported-op", "planted_op", op_type)


def test_matmul_integer_is_not_explicit_qdq(tmp_path):
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, ["batch_size", 4])
    w = numpy_helper.from_array(np.ones((4, 3), np.int8), "w")
    node = helper.make_node("MatMulInteger", ["a", "w"], ["y"], name="planted_mmi")
    path = _save(tmp_path, [node], inputs=[a], outputs=[helper.make_tensor_value_info("y", TensorProto.INT32, None)],
                 initializers=[w])
    report = readiness_report(path, profiles={"a": FLOAT_PROFILE["x"]})
    assert not report["ready"]
    assert _has(report["errors"], "non-qdq-quantization", "planted_mmi", "MatMulInteger")
    assert _has(report["errors"], "unsupported-op", "planted_mmi", "MatMulInteger")


def test_matmul_nbits_is_contrib_and_not_qdq(tmp_path):
    node = helper.make_node("MatMulNBits", ["x", "x"], ["y"], name="planted_nbits", domain="com.microsoft")
    report = readiness_report(_save(tmp_path, [node], extra_opsets=["com.microsoft"]), profiles=FLOAT_PROFILE)
    assert _has(report["errors"], "non-qdq-quantization", "planted_nbits", "MatMulNBits")
    assert _has(report["errors"], "contrib-op", "planted_nbits", "MatMulNBits")


def test_int64_initializer_and_cast_are_warnings(tmp_path):
    big = numpy_helper.from_array(np.array([2**40], np.int64), "planted_int64")
    nodes = [helper.make_node("Cast", ["x"], ["x64"], to=TensorProto.INT64, name="planted_cast"),
             helper.make_node("Add", ["x64", "planted_int64"], ["y"], name="add")]
    report = readiness_report(_save(tmp_path, nodes, initializers=[big]), profiles=FLOAT_PROFILE)
    assert report["ready"], report["errors"]
    assert _has(report["warnings"], "int64", "planted_int64", "initializer")
    assert _has(report["warnings"], "int64", "planted_cast", "Cast")
    beyond = [f for f in report["warnings"] if "beyond the INT32 range" in f["message"]]
    assert [f["name"] for f in beyond] == ["planted_int64"]


def test_double_is_narrowed_with_a_warning(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch_size", 4])
    report = readiness_report(_save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="relu64")], inputs=[x]),
                              profiles=FLOAT_PROFILE)
    assert report["ready"] and _has(report["warnings"], "input-type", "relu64", "Relu")


@pytest.mark.parametrize("opset", [8, 21])
def test_opset_outside_range_is_an_error(tmp_path, opset):
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="relu")], opset=opset)
    report = readiness_report(path, profiles=FLOAT_PROFILE)
    low, high = operator_table()["opset"]["min"], operator_table()["opset"]["max"]
    assert (low, high) == (9, 20)
    assert not report["ready"] and _has(report["errors"], "opset", "ai.onnx", "opset")


def test_input_type_outside_the_operator_types_is_an_error(tmp_path):
    a = helper.make_tensor_value_info("a", TensorProto.INT32, ["batch_size", 4])
    w = numpy_helper.from_array(np.ones((4, 3), np.int32), "w")
    node = helper.make_node("MatMul", ["a", "w"], ["y"], name="int_matmul")
    path = _save(tmp_path, [node], inputs=[a], initializers=[w],
                 outputs=[helper.make_tensor_value_info("y", TensorProto.INT32, None)])
    report = readiness_report(path, profiles={"a": FLOAT_PROFILE["x"]})
    assert _has(report["errors"], "input-type", "int_matmul", "MatMul")


@pytest.mark.parametrize("zero_point,dtype,ready", [(0, np.int8, True), (3, np.int8, False), (0, np.uint8, False)])
def test_qdq_needs_signed_zero_zero_points(tmp_path, zero_point, dtype, ready):
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zp = numpy_helper.from_array(np.array(zero_point, dtype), "zp")
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="planted_q"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="planted_dq")]
    report = readiness_report(_save(tmp_path, nodes, initializers=[scale, zp]), profiles=FLOAT_PROFILE)
    assert report["ready"] is ready
    if not ready:
        assert _has(report["errors"], "qdq-zero-point", "planted_q", "QuantizeLinear")


def test_profile_problems_are_errors(tmp_path):
    mask = helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch_size", "past + seq"])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch_size", "seq"])
    past = helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch_size", 2, "past"])
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"], name=f"id_{n}") for n in ("mask", "ids", "past")]
    outs = [helper.make_tensor_value_info(f"{n}_out", t, None)
            for n, t in (("mask", TensorProto.INT64), ("ids", TensorProto.INT64), ("past", TensorProto.FLOAT))]
    path = _save(tmp_path, nodes, inputs=[mask, ids, past], outputs=outs)
    good = {"mask": {"min": [1, 1], "opt": [2, 5], "max": [4, 12]},
            "ids": {"min": [1, 1], "opt": [2, 1], "max": [4, 4]},
            "past": {"min": [1, 2, 0], "opt": [2, 2, 4], "max": [4, 2, 8]}}
    assert readiness_report(path, profiles=good)["ready"]
    inputs = graph_inputs(onnx.load(str(path)))
    assert profile_problems(inputs, good) == []
    missing = {k: v for k, v in good.items() if k != "past"}
    assert any(n == "past" and "no profile" in p for n, p in profile_problems(inputs, missing))
    report = readiness_report(path, profiles=missing)
    assert not report["ready"] and _has(report["errors"], "profile", "past", "input")
    wrong_sum = {**good, "mask": {"min": [1, 1], "opt": [2, 6], "max": [4, 12]}}
    assert any(n == "mask" and "sum of its parts" in p for n, p in profile_problems(inputs, wrong_sum))
    wrong_static = {**good, "past": {"min": [1, 1, 0], "opt": [2, 2, 4], "max": [4, 2, 8]}}
    assert any(n == "past" and "static" in p for n, p in profile_problems(inputs, wrong_static))
    two_batches = {**good, "ids": {"min": [1, 1], "opt": [2, 1], "max": [8, 4]}}
    assert any(n == "ids" and "one range" in p for n, p in profile_problems(inputs, two_batches))
    assert profile_problems(inputs, {**good, "nope": good["ids"]}) == [
        ("nope", "the profile names an input the graph does not have")]
    reversed_range = {**good, "ids": {"min": [1, 4], "opt": [2, 1], "max": [4, 4]}}
    assert any("min <= opt <= max" in p for _, p in profile_problems(inputs, reversed_range))


def test_default_profiles_refuse_a_dim_they_cannot_size(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "width"])
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="relu")], inputs=[x])
    with pytest.raises(UserInputError, match="'x' axis 1 .*width"):
        default_profiles(path)


def test_encoder_profiles_tune_for_half_the_longest_input(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "sequence_length", 4])
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="relu")], inputs=[x])
    assert default_profiles(path, max_batch=8, max_sequence=128) == {
        "x": {"min": [1, 1, 4], "opt": [4, 64, 4], "max": [8, 128, 4]}}


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-decoder")
    export_decoder_onnx(save_tiny_llama(root / "tiny"), root / "onnx")
    return root / "onnx"


def test_decoder_profiles_cover_every_dynamic_dim(decoder_dir):
    profiles = default_profiles(decoder_dir / "model.onnx", max_batch=4, max_sequence=32, max_past=64)
    inputs = graph_inputs(onnx.load(str(decoder_dir / "model.onnx"), load_external_data=False))
    assert set(profiles) == {name for name, _, _ in inputs} and len(inputs) == 3 + 2 * 2
    assert profile_problems(inputs, profiles) == []
    assert profiles["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [4, 32]}
    assert profiles["past_key_values.1.value"] == {"min": [1, 2, 0, 16], "opt": [2, 2, 32, 16], "max": [4, 2, 64, 16]}
    for key in ("min", "opt", "max"):   # attention_mask spans past + new tokens at every point
        past = profiles["past_key_values.0.key"][key][2]
        assert profiles["attention_mask"][key][1] == past + profiles["input_ids"][key][1]
    report = readiness_report(decoder_dir / "model.onnx", profiles=profiles)
    assert report["ready"], report["errors"]
    assert report["opset"] == 18 and report["op_counts"]["MatMul"] > 0


def test_write_tensorrt_files(decoder_dir):
    profiles = default_profiles(decoder_dir / "model.onnx", max_batch=4, max_sequence=32, max_past=64)
    summary = write_tensorrt_files(decoder_dir, profiles=profiles)
    out = decoder_dir / "tensorrt"
    report = json.loads((out / "readiness.json").read_text())
    assert summary["ready"] is report["ready"] is True
    assert summary["errors"] == 0 and summary["warnings"] == len(report["warnings"]) > 0
    assert summary["trt_version"] == report["trt_version"] == "10.1"
    assert json.loads((out / "profiles.json").read_text()) == profiles
    script = (out / "trtexec.sh").read_text()
    assert "--onnx=../model.onnx" in script and "--saveEngine=model.plan" in script
    assert "--minShapes=input_ids:1x1,attention_mask:1x1,position_ids:1x1,past_key_values.0.key:1x2x0x16" in script
    assert "--optShapes=input_ids:2x1,attention_mask:2x33," in script
    assert "--maxShapes=input_ids:4x32,attention_mask:4x96," in script
    assert "--stronglyTyped" not in script and (out / "trtexec.sh").stat().st_mode & 0o100
    markdown = (out / "readiness.md").read_text()
    assert markdown.startswith("# TensorRT readiness: READY") and "`past_key_values.0.key` | 1x2x0x16" in markdown


def test_write_tensorrt_files_lists_offending_nodes(tmp_path):
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale"], ["q"], name="planted_q"),
             helper.make_node("DequantizeLinear", ["q", "scale"], ["y"], name="planted_dq")]
    _save(tmp_path, nodes, initializers=[numpy_helper.from_array(np.array(0.1, np.float32), "scale")])
    summary = write_tensorrt_files(tmp_path, profiles=FLOAT_PROFILE)
    assert summary["ready"] is False and summary["errors"] >= 1 and summary["precision_flag"] == "--stronglyTyped"
    markdown = (tmp_path / "tensorrt" / "readiness.md").read_text()
    assert "NOT READY" in markdown and "| error | qdq-zero-point | `planted_q` | QuantizeLinear |" in markdown
    assert "--stronglyTyped" in (tmp_path / "tensorrt" / "trtexec.sh").read_text()


def test_missing_graph_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="no such ONNX file"):
        readiness_report(tmp_path / "model.onnx", profiles={})
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="relu")])
    with pytest.raises(UserInputError, match="JSON object"):
        readiness_report(path, profiles={"x": [[1, 4], [2, 4], [4, 4]]})


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs the tensorrt package and a CUDA GPU")
def test_build_and_compare_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    from inferforge.optimize.tensorrt_ready import build_and_compare

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    path = _save(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], initializers=[w],
                 outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 3])])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result = build_and_compare(path, FLOAT_PROFILE, lambda feeds: {"y": session.run(None, feeds)[0]}, atol=1e-3)
    assert result["passed"], result


def test_profiles_stay_within_the_models_positions(tmp_path, decoder_dir):
    """An encoder with 128 positions gets sequences up to 128, not 512; a decoder's context (past + new,
    attention_mask's axis) ends at its positions; a hand-written profile beyond them is an error."""
    from inferforge.optimize.tensorrt_profiles import model_profiles

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "sequence_length", 4])
    encoder = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="relu")], inputs=[x])
    assert model_profiles(encoder, position_limit=128)["x"]["max"] == [8, 128, 4]
    assert model_profiles(encoder, position_limit=None)["x"]["max"] == [8, 512, 4]
    assert model_profiles(encoder, position_limit=128, max_batch=2, max_sequence=100)["x"]["max"] == [2, 100, 4]
    with pytest.raises(UserInputError, match="--max-sequence 129: the model takes 1 to 128 tokens"):
        model_profiles(encoder, position_limit=128, max_sequence=129)
    onnx_path = decoder_dir / "model.onnx"
    profiles = model_profiles(onnx_path, position_limit=64, max_batch=4)
    assert profiles["attention_mask"]["max"] == [4, 64] and profiles["input_ids"]["max"] == [4, 32]
    assert profiles["past_key_values.0.key"]["max"] == [4, 2, 32, 16]
    assert readiness_report(onnx_path, profiles=profiles, position_limit=64)["ready"]
    # The old sizing (past and new tokens each up to the context) lets attention_mask reach twice it.
    doubled = default_profiles(onnx_path, max_batch=4, max_sequence=64, max_past=64)
    report = readiness_report(onnx_path, profiles=doubled, position_limit=64)
    assert not report["ready"] and report["position_limit"] == 64
    flagged = [f for f in report["errors"] if f["check"] == "position-limit"]
    assert [f["name"] for f in flagged] == ["attention_mask"] and "up to 128, past the model's 64" in flagged[0]["message"]
    assert readiness_report(onnx_path, profiles=doubled)["ready"]       # no limit given: nothing to check against
    text = write_tensorrt_files(decoder_dir, profiles=doubled, position_limit=64)["error_summary"]
    assert text == "position-limit: 1 x input (e.g. attention_mask)"


def _encoder_artifact(path, *, positions=128, opset=17, contrib=False):
    from inferforge.manifest import write_manifest

    path.mkdir(parents=True)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", "sequence_length", 4])
    table = numpy_helper.from_array(np.ones((positions, 4), np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["g"], name="gather"),
             helper.make_node("Gelu" if contrib else "Relu", ["g"], ["y"], name="act",
                              **({"domain": "com.microsoft"} if contrib else {}))]
    _save(path, nodes, inputs=[ids], outputs=[out], initializers=[table], opset=opset,
          extra_opsets=["com.microsoft"] if contrib else ())
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": positions}))
    write_manifest(path, {"name": "enc", "kind": "sentence-encoder", "runtime": {"model": "model.onnx"}})
    return path


def test_tensorrt_copy_of_an_encoder_artifact_from_the_command_line(tmp_path, capsys):
    """`inferforge export ART --format tensorrt`: profiles bounded by config.json's positions, --name and
    --max-batch taken; an opset TensorRT cannot parse is refused up front; a graph that is not ready
    writes nothing, exits 1 and leaves the readiness report in OUT.failed/."""
    from inferforge.cli import main
    from inferforge.manifest import verify_artifact

    art = _encoder_artifact(tmp_path / "art")
    out = tmp_path / "trt"
    assert main(["export", str(art), "--format", "tensorrt", "--name", "enc-trt", "--max-batch", "2",
                 "--output", str(out), "-q"]) == 0
    manifest = verify_artifact(out)
    assert manifest["name"] == "enc-trt" and manifest["tensorrt"]["ready"] is True
    assert json.loads((out / "tensorrt" / "profiles.json").read_text())["input_ids"]["max"] == [2, 128]
    capsys.readouterr()
    assert main(["export", str(art), "--format", "tensorrt", "--max-sequence", "200", "--output", str(tmp_path / "x")]) == 2
    assert "--max-sequence 200: the model takes 1 to 128 tokens" in capsys.readouterr().err
    assert main(["export", str(art), "--format", "tensorrt", "--opset", "17", "--output", str(tmp_path / "x")]) == 2
    assert "--opset 17: " in (err := capsys.readouterr().err) and "is already an ONNX artifact" in err
    new = _encoder_artifact(tmp_path / "art21", opset=21)
    assert main(["export", str(new), "--format", "tensorrt", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--opset 21 with --format tensorrt: TensorRT 10.1 parses opsets 9 to 20" in err and len(err.splitlines()) == 1
    contrib = _encoder_artifact(tmp_path / "contrib", contrib=True)
    assert main(["export", str(contrib), "--format", "tensorrt", "--output", str(tmp_path / "x"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "TensorRT readiness: not ready, 1 errors (contrib-op: 1 x Gelu (e.g. act))" in err
    assert "no artifact written" in err and not (tmp_path / "x").exists()
    assert "# TensorRT readiness: NOT READY" in (tmp_path / "x.failed" / "report.md").read_text()
