"""The shipped model.onnx runs the fast graph in a plain ONNX Runtime session, ort_config.json records
how to open it, and the word-embedding table can be stored as int8 (tiny random BERTs, no downloads)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import inferforge
from inferforge import pipeline
from inferforge.cli import main
from inferforge.encoder import DEFAULT_SESSION_OPTIONS
from inferforge.errors import ArtifactError
from inferforge.optimize.embedding_quant import quantize_word_embeddings
from inferforge.optimize.export import export_onnx
from inferforge.optimize.onnx_quantize import SettingError, quantize_dynamic_int8
from inferforge.optimize.ort_fusions import block_skip_layer_norm_fusion_file, fused_op_counts, residual_adds
from inferforge.ort_config import ORT_CONFIG_NAME, read_session_options
from inferforge.recipe import QuantizeConfig, recipe_from_dict
from tests.factories import tiny_bert

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hello world.", "Short.",
             "A somewhat longer sentence, with punctuation; and clauses that go on for a while."]


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    """(fp32 path, int8 path, tokenizer): the int8 model as ONNX Runtime's quantizer writes it."""
    model, tokenizer = tiny_bert()
    src = tmp_path_factory.mktemp("tiny-src")
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    fp32 = export_onnx(src, tmp_path_factory.mktemp("tiny-onnx"), opset=17)
    int8 = fp32.parent / "int8.onnx"
    quantize_dynamic_int8(fp32, int8)
    return fp32, int8, tokenizer


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny-int8"
    recipe = recipe_from_dict({"name": "tiny", "model": "tests.factories:tiny_bert",
                               "steps": ["export", {"quantize": {"smoothquant_alpha": 0.5, "embeddings": "int8"}},
                                         "validate"],
                               "data": {"calibration_size": 8, "held_out_size": 8}, "gates": {"min_cosine": 0.5},
                               "output": str(out)})
    result = pipeline.run_recipe(recipe)
    assert result.passed
    return out


def batch(tokenizer, texts=SENTENCES):
    enc = tokenizer(texts, padding=True, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


def test_the_rewrite_keeps_the_slow_fusion_from_matching_and_the_outputs_bit_identical(tiny_int8, tmp_path):
    _, int8, tokenizer = tiny_int8
    assert fused_op_counts(int8, work_dir=tmp_path).get("SkipLayerNormalization", 0) > 0   # the problem, as quantized
    rewritten = tmp_path / "rewritten.onnx"
    rewritten.write_bytes(int8.read_bytes())
    count = block_skip_layer_norm_fusion_file(rewritten)
    assert count == len(residual_adds(onnx.load(str(int8)))) == 5     # 2 per layer, 2 layers, and the embeddings
    assert block_skip_layer_norm_fusion_file(rewritten) == count       # idempotent
    assert "SkipLayerNormalization" not in fused_op_counts(rewritten, work_dir=tmp_path)
    # Same graph as inferforge's old session (the fusion disabled), same numbers.
    assert fused_op_counts(rewritten, work_dir=tmp_path) == fused_op_counts(
        rewritten, disabled_optimizers=["SkipLayerNormFusion"], work_dir=tmp_path)
    b = batch(tokenizer)
    plain = ort.InferenceSession(str(rewritten), providers=["CPUExecutionProvider"]).run(None, b)[0]
    before = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"],
                                  disabled_optimizers=["SkipLayerNormFusion"]).run(None, b)[0]
    np.testing.assert_array_equal(plain, before)


def test_shipped_model_is_the_fast_graph_in_a_plain_session_and_matches_load(tiny_artifact, tmp_path):
    path = tiny_artifact / "model.onnx"
    ops = fused_op_counts(path, work_dir=tmp_path)
    assert "SkipLayerNormalization" not in ops and ops.get("Sum", 0) > 0
    model = inferforge.load(tiny_artifact)
    b = model.tokenize(SENTENCES)
    plain = ort.InferenceSession(str(path)).run(None, {i.name: b[i.name] for i in
                                                       ort.InferenceSession(str(path)).get_inputs()})[0]
    np.testing.assert_array_equal(plain, model.hidden_states(b))


def test_ort_config_is_written_in_optimum_layout_and_read_by_load(tiny_artifact):
    config = json.loads((tiny_artifact / ORT_CONFIG_NAME).read_text())
    manifest = inferforge.load(tiny_artifact).manifest
    assert ORT_CONFIG_NAME in manifest["files"]
    assert config["session_options"] == manifest["runtime"]["session_options"]
    assert config["session_options"]["disabled_optimizers"] == []
    assert config["opset"] == 17 and config["optimization"]["optimization_level"] == 99
    assert config["quantization"]["operators_to_quantize"] == ["MatMul"] and not config["quantization"]["is_static"]
    assert config["inferforge"]["embeddings"]["tensor"] == "embeddings.word_embeddings.weight"
    assert read_session_options(tiny_artifact, manifest) == config["session_options"]
    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTConfig

    loaded = ORTConfig.from_pretrained(tiny_artifact)
    assert loaded.optimization.disable_skip_layer_norm_fusion and loaded.quantization.per_channel


def test_session_options_fall_back_for_older_artifacts_and_bad_ones_are_refused(tmp_path):
    assert read_session_options(tmp_path, {"runtime": {}}) == DEFAULT_SESSION_OPTIONS
    assert DEFAULT_SESSION_OPTIONS["disabled_optimizers"] == ["SkipLayerNormFusion"]
    older = read_session_options(tmp_path, {"runtime": {"onnxruntime_disabled_optimizers": ["GeluFusion"]}})
    assert older["disabled_optimizers"] == ["GeluFusion"]
    (tmp_path / ORT_CONFIG_NAME).write_text(json.dumps({"session_options": {"threads_please": 3}}))
    with pytest.raises(ArtifactError, match="unknown session option 'threads_please'"):
        read_session_options(tmp_path, {})
    (tmp_path / ORT_CONFIG_NAME).write_text(json.dumps({"session_options": {"graph_optimization_level": "MAX"}}))
    with pytest.raises(ArtifactError, match="graph_optimization_level 'MAX'"):
        read_session_options(tmp_path, {})


def test_int8_embeddings_shrink_the_model_gather_int8_and_stay_close(tiny_int8, tmp_path):
    _, int8, tokenizer = tiny_int8
    out = tmp_path / "emb.onnx"
    record = quantize_word_embeddings(int8, out)
    # The tiny BERT's file is mostly its 30522 x 64 table: about 4x smaller.
    assert record["file_bytes"]["after"] < 0.4 * record["file_bytes"]["before"] == 0.4 * int8.stat().st_size
    assert record["table_bytes"]["int8"] < 0.27 * record["table_bytes"]["float32"]
    model = onnx.load(str(out))
    inits = {i.name: i for i in model.graph.initializer}
    assert "embeddings.word_embeddings.weight" not in inits
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
    assert [inits[n.input[0]].data_type for n in gathers] == [onnx.TensorProto.INT8, onnx.TensorProto.FLOAT]
    b = batch(tokenizer)
    ref = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, b)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, b)[0]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.02
    with pytest.raises(SettingError, match="no Gather of a float32"):
        quantize_word_embeddings(out, tmp_path / "twice.onnx")      # already int8: nothing left to quantize


def test_pipeline_records_and_gates_int8_embeddings(tiny_artifact):
    manifest = inferforge.load(tiny_artifact).manifest
    quantize = next(s for s in manifest["steps"] if s["name"] == "quantize")
    emb = quantize["result"]["embeddings"]
    assert quantize["settings"]["embeddings"] == "int8" and emb["scheme"].startswith("int8")
    assert emb["file_bytes"]["after"] < emb["file_bytes"]["before"]
    assert (tiny_artifact / "model.onnx").stat().st_size == quantize["result"]["size_bytes"]["int8"]
    assert emb["calibration_min_cosine"] > 0.5
    assert manifest["validation"]["min_cosine"] > 0.5 and manifest["accuracy_passed"]


def test_int8_embeddings_are_refused_where_they_do_not_apply(capsys, tmp_path):
    with pytest.raises(ValueError, match="embeddings: int8 is implemented for method dynamic-int8"):
        QuantizeConfig(method="static-qdq", embeddings="int8")
    with pytest.raises(ValueError, match="embeddings must be 'float' or 'int8'"):
        QuantizeConfig(embeddings="int4")
    assert main(["quantize", "some-llama", "--config", "int8-weight-only", "--quantize-embeddings"]) == 2
    assert "--quantize-embeddings applies to the ONNX int8 path" in capsys.readouterr().err
    code = main(["quantize", "tests.factories:tiny_bert", "--method", "static-qdq", "--quantize-embeddings", "-q",
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "embeddings: int8 is implemented for method dynamic-int8" in capsys.readouterr().err


def test_a_model_without_input_ids_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(SettingError, match="needs a graph input named 'input_ids'"):
        quantize_word_embeddings(path)


def test_quantize_onnx_artifact_with_int8_embeddings_from_the_command_line(tmp_path, capsys):
    small = ["--calibration-size", "8", "--held-out-size", "8", "-q"]
    assert main(["export", "tests.factories:tiny_bert", "--output", str(tmp_path / "fp32"), *small]) == 0
    out = tmp_path / "int8"
    assert main(["quantize", str(tmp_path / "fp32"), "--onnx", "--quantize-embeddings", "--smoothquant-alpha", "off",
                 "--min-cosine", "0.5", "--output", str(out), *small]) == 0
    model = inferforge.load(out)
    assert (out / "model.onnx").stat().st_size < 0.5 * (tmp_path / "fp32" / "model.onnx").stat().st_size
    config = json.loads((out / ORT_CONFIG_NAME).read_text())
    assert config["inferforge"]["embeddings"]["shape"] == [30522, 64]
    assert model(["a sentence"]).shape == (1, 64)


def test_each_row_gets_its_own_scale_and_half_a_step_of_error(tiny_int8, tmp_path):
    """Per-row symmetric int8: scale = max|row| / 127 for every row (shape [vocab, 1]), so each row's
    largest element maps to +-127 and no element is off by more than half a step, max|row| / 254."""
    from onnx import numpy_helper

    from inferforge.optimize.embedding_quant import quantize_rows

    rng = np.random.default_rng(0)
    table = (rng.standard_normal((6, 5)) * np.array([[1e-3], [0.1], [1.0], [10.0], [3.0], [0.0]])).astype(np.float32)
    q, scale = quantize_rows(table)
    row_max = np.abs(table).max(axis=1)
    assert q.dtype == np.int8 and scale.shape == (6, 1)
    np.testing.assert_allclose(scale[:5, 0], row_max[:5] / 127, rtol=1e-6)
    assert np.abs(q[:5]).max(axis=1).tolist() == [127] * 5 and not q[5].any()
    error = np.abs(q.astype(np.float32) * scale - table).max(axis=1)
    assert np.all(error <= row_max / 254 * (1 + 1e-5))
    # The graph's scale table: one float per token, from that token's row of the float table.
    _, int8, _ = tiny_int8
    float_table = numpy_helper.to_array(next(i for i in onnx.load(str(int8)).graph.initializer
                                             if i.name == "embeddings.word_embeddings.weight"))
    out = tmp_path / "emb.onnx"
    record = quantize_word_embeddings(int8, out)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    written = inits["embeddings.word_embeddings.weight_row_scale"]
    assert written.shape == (float_table.shape[0], 1)
    np.testing.assert_allclose(written[:, 0], np.maximum(np.abs(float_table).max(axis=1) / 127,
                                                         np.finfo(np.float32).tiny), rtol=1e-6)
    assert record["max_abs_error"] <= np.abs(float_table).max() / 254 * (1 + 1e-5)
