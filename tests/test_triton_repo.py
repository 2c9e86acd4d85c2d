"""Triton model repositories (issue 11): every written config.pbtxt parses into Triton's own ModelConfig
message, carries the graph's names, types and dims, and each export adds a version."""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from inferforge.errors import ArtifactError, UserInputError
from inferforge.fileio import sha256_file
from inferforge.manifest import write_manifest
from inferforge.optimize.llm_export import export_decoder_onnx
from inferforge.optimize.triton_repo import sanitize_model_name, write_triton_repository
from tests.factories_llama import save_tiny_llama

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient is a dev dependency (pip install -e '.[dev]')")


def _config(model_dir):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _encoder_model(hidden=4, dtype=TensorProto.FLOAT):
    """input_ids, attention_mask int64 [batch, sequence] -> last_hidden_state [batch, sequence, hidden]."""
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, hidden)).astype(np_dtype), "embed")
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["states"], name="gather"),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=dtype, name="cast"),
             helper.make_node("Unsqueeze", ["mask_f", "axis"], ["mask3"], name="unsqueeze"),
             helper.make_node("Mul", ["states", "mask3"], ["last_hidden_state"], name="mul")]
    axis = numpy_helper.from_array(np.array([-1], np.int64), "axis")
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch_size", "sequence_length"])
              for n in ("input_ids", "attention_mask")]
    output = helper.make_tensor_value_info("last_hidden_state", dtype, ["batch_size", "sequence_length", hidden])
    model = helper.make_model(helper.make_graph(nodes, "encoder", inputs, [output], initializer=[table, axis]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _artifact(path, model=None, *, name="my encoder!", external=False):
    path.mkdir(parents=True)
    model = model or _encoder_model()
    if external:
        onnx.save_model(model, str(path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=64)
    else:
        onnx.save(model, str(path / "model.onnx"))
    write_manifest(path, {"name": name, "kind": "sentence-encoder"})
    return path


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


FEEDS = {"input_ids": np.array([[1, 5, 9], [2, 3, 0]], np.int64), "attention_mask": np.array([[1, 1, 1], [1, 1, 0]], np.int64)}


def test_encoder_repository_matches_triton_schema(tmp_path):
    artifact = _artifact(tmp_path / "art")
    version = write_triton_repository(artifact, tmp_path / "repo")
    assert version == tmp_path / "repo" / "my_encoder_" / "1"
    config = _config(version.parent)
    assert config.name == "my_encoder_" and config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("input_ids", "TYPE_INT64", [-1]), ("attention_mask", "TYPE_INT64", [-1])]
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [
        ("last_hidden_state", "TYPE_FP32", [-1, 4])]
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
        (1, "KIND_AUTO")]
    # The copy is the artifact's file, byte for byte, and ONNX Runtime runs it.
    assert sha256_file(version / "model.onnx") == sha256_file(artifact / "model.onnx")
    np.testing.assert_array_equal(_run(version / "model.onnx", FEEDS), _run(artifact / "model.onnx", FEEDS))
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["my_encoder_"]   # no staging left behind


def test_second_export_adds_a_version(tmp_path):
    artifact = _artifact(tmp_path / "art")
    first = write_triton_repository(artifact, tmp_path / "repo", name="enc")
    second = write_triton_repository(artifact, tmp_path / "repo", name="enc", instance_kind="cpu")
    assert (first.name, second.name) == ("1", "2") and (first / "model.onnx").is_file()
    assert sorted(p.name for p in second.parent.iterdir()) == ["1", "2", "config.pbtxt"]
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(_config(second.parent).instance_group[0].kind) == "KIND_CPU"
    (second.parent / "7").mkdir()      # versions are max + 1, not a count
    assert write_triton_repository(artifact, tmp_path / "repo", name="enc").name == "8"


@pytest.mark.parametrize("kind,dtype,expected", [("gpu", TensorProto.FLOAT, "KIND_GPU"),
                                                 ("cpu", TensorProto.FLOAT, "KIND_CPU"),
                                                 ("auto", TensorProto.FLOAT16, "KIND_GPU")])
def test_instance_kind(tmp_path, kind, dtype, expected):
    artifact = _artifact(tmp_path / "art", _encoder_model(dtype=dtype))
    config = _config(write_triton_repository(artifact, tmp_path / "repo", instance_kind=kind).parent)
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == expected
    assert model_config_pb2.DataType.Name(config.output[0].data_type) == (
        "TYPE_FP16" if dtype == TensorProto.FLOAT16 else "TYPE_FP32")


def test_auto_serves_integer_quantized_graphs_on_cpu(tmp_path):
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, ["batch_size", 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, ["batch_size", 3])
    w = numpy_helper.from_array(np.ones((4, 3), np.int8), "w")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "q", [a], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = _config(write_triton_repository(_artifact(tmp_path / "art", model), tmp_path / "repo").parent)
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
    assert [(model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in [*config.input, *config.output]] == [
        ("TYPE_UINT8", [4]), ("TYPE_INT32", [3])]


def test_no_batching_lists_full_shapes(tmp_path):
    config = _config(write_triton_repository(_artifact(tmp_path / "art"), tmp_path / "repo", max_batch_size=0).parent)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [list(i.dims) for i in config.input] == [[-1, -1], [-1, -1]] and list(config.output[0].dims) == [-1, -1, 4]


def test_external_data_is_copied_beside_the_graph(tmp_path):
    artifact = _artifact(tmp_path / "art", external=True)
    version = write_triton_repository(artifact, tmp_path / "repo")
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert sha256_file(version / "model.onnx_data") == sha256_file(artifact / "model.onnx_data")
    shutil.rmtree(artifact)     # the copy stands on its own
    np.testing.assert_allclose(_run(version / "model.onnx", FEEDS)[0, 0], _run_inline(FEEDS)[0, 0])


def _run_inline(feeds):
    session = ort.InferenceSession(_encoder_model().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_refusals(tmp_path):
    artifact = _artifact(tmp_path / "art")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="is a file"):
        write_triton_repository(artifact, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no model.onnx"):
        write_triton_repository(tmp_path / "empty", tmp_path / "repo")
    with pytest.raises(UserInputError, match="model name 'bad/name'"):
        write_triton_repository(artifact, tmp_path / "repo", name="bad/name")
    with pytest.raises(UserInputError, match="instance kind"):
        write_triton_repository(artifact, tmp_path / "repo", instance_kind="tpu")
    with pytest.raises(UserInputError, match="max_batch_size must be 0"):
        write_triton_repository(artifact, tmp_path / "repo", max_batch_size=-1)
    static = _encoder_model()
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(UserInputError, match="'input_ids' has no dynamic batch axis first; pass max_batch_size=0"):
        write_triton_repository(_artifact(tmp_path / "static", static), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    write_triton_repository(artifact, tmp_path / "repo", name="enc")
    other = _artifact(tmp_path / "other", _encoder_model(hidden=6))
    with pytest.raises(UserInputError, match="model 'enc' .* other inputs/outputs"):
        write_triton_repository(other, tmp_path / "repo", name="enc")
    assert sorted(p.name for p in (tmp_path / "repo" / "enc").iterdir()) == ["1", "config.pbtxt"]
    assert list(_config(tmp_path / "repo" / "enc").output[0].dims) == [-1, 4]


def test_changed_artifact_publishes_nothing(tmp_path):
    artifact = _artifact(tmp_path / "art")
    write_triton_repository(artifact, tmp_path / "repo", name="enc")
    model = onnx.load(str(artifact / "model.onnx"))
    model.doc_string = "edited after export"
    onnx.save(model, str(artifact / "model.onnx"))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        write_triton_repository(artifact, tmp_path / "repo", name="enc")
    assert sorted(p.name for p in (tmp_path / "repo" / "enc").iterdir()) == ["1", "config.pbtxt"]


def test_sanitize_model_name():
    assert sanitize_model_name("llama 3/8b:int4") == "llama_3_8b_int4"
    assert sanitize_model_name("..hidden") == "hidden" and sanitize_model_name("///") == "_"


@pytest.fixture(scope="module")
def decoder_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-decoder")
    out = root / "artifact"
    export_decoder_onnx(save_tiny_llama(root / "tiny"), out)
    write_manifest(out, {"name": "tiny-llama", "kind": "onnx-causal-lm"})
    return out


def test_decoder_with_past_repository(decoder_artifact, tmp_path):
    version = write_triton_repository(decoder_artifact, tmp_path / "repo", max_batch_size=4)
    text = (version.parent / "config.pbtxt").read_text()
    assert "stateless" in text and "past_key_values" in text
    config = _config(version.parent)
    assert config.name == "tiny-llama" and config.max_batch_size == 4
    inputs = {i.name: (model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input}
    assert inputs["input_ids"] == inputs["attention_mask"] == inputs["position_ids"] == ("TYPE_INT64", [-1])
    assert inputs["past_key_values.1.value"] == ("TYPE_FP32", [2, -1, 16]) and len(inputs) == 7
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs["logits"] == [-1, 256] and outputs["present.0.key"] == [2, -1, 16] and len(outputs) == 5
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    assert sha256_file(version / "model.onnx") == sha256_file(decoder_artifact / "model.onnx")


def test_cli_puts_an_existing_artifact_under_the_name_given(tmp_path, capsys):
    """`inferforge export ART --format triton --name N --max-batch B`: the model is N with max_batch_size B."""
    from inferforge.cli import main

    artifact = _artifact(tmp_path / "art")
    assert main(["export", str(artifact), "--format", "triton", "--repository", str(tmp_path / "repo"),
                 "--name", "served", "--max-batch", "3", "-q"]) == 0
    assert capsys.readouterr().out.strip() == f"triton: {tmp_path / 'repo' / 'served' / '1'}"
    assert _config(tmp_path / "repo" / "served").max_batch_size == 3
    assert main(["export", str(artifact), "--format", "triton", "--repository", str(tmp_path / "repo"),
                 "--max-sequence", "64"]) == 2
    assert "--max-sequence sizes TensorRT profiles; --format triton has none" in capsys.readouterr().err
