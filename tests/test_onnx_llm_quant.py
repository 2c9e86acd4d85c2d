"""`export_quantized_graph`: quantized-causal-lm artifacts as ONNX (MatMulNBits, static QDQ), checked in ONNX Runtime CPU.

A tiny seeded Llama (hidden 64, intermediate 128, group size 32) is quantized per format, exported,
and the rewritten graph is run with past key/values: logits against the export's `reference` on two
prompt lengths at batch 2 (prompt, then one more token from `present.*`), greedy tokens for the
weight-only formats, the ops each quantized layer became, and what a corrupted graph does.
"""

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from inferforge.errors import ArtifactError, GateFailed, UserInputError
from inferforge.optimize.onnx_llm_quant import export_quantized_graph
from inferforge.optimize.onnx_quant_graph import matmul_node_name
from tests.factories_llama import save_tiny_llama, save_word_text, save_word_tokenizer

# Quantized layers run their PyTorch references here, not the Triton interpreter (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("quantized_layers_as_on_cpu")

GROUP = 32
PROMPT_LENGTHS = (5, 11)
# Every linear layer of the tiny Llama: 7 per decoder layer, 2 layers, and lm_head.
LAYERS = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                              "mlp.down_proj")] + ["lm_head"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("qexport")
    path = save_tiny_llama(root / "tiny", initializer_range=0.05)
    save_word_tokenizer(path)
    # 8 lines of 16 words: 6 sequences of 16 tokens (4 calibrate, 2 held out), and a short drift snapshot.
    return root, path, save_word_text(root / "cal.txt", lines=8, words=16)


@pytest.fixture(scope="module")
def exported(checkpoint):
    """fmt -> (artifact dir, QuantizedGraph), quantized and exported once per module."""
    from inferforge.optimize.llm_quantize import quantize_checkpoint
    from inferforge.optimize.lm_eval import LMGate

    root, path, cal = checkpoint
    cache = {}

    def get(fmt):
        if fmt not in cache:
            artifact = root / f"artifact-{fmt}"
            # w8a8 / fp8: the artifact's gate (min top-1 agreement 50%) is the limit the export's
            # static-vs-dynamic check applies; a tiny random model's logits are nearly flat.
            gate = LMGate(min_top1_agreement=0.5) if fmt in ("w8a8", "fp8") else None
            quantize_checkpoint(path, artifact, fmt=fmt, calibration_file=cal, num_samples=4, seq_len=16,
                                gate=gate, group_size=GROUP)
            cache[fmt] = artifact, export_quantized_graph(artifact, root / f"work-{fmt}")
        return cache[fmt]
    return get


def session(graph, onnx_path=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in graph.manifest["quantized_export"].get("onnxruntime_session_config", {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(onnx_path or graph.onnx_path), options, providers=["CPUExecutionProvider"])


def ort_step(sess, ids: np.ndarray, past: dict | None, past_len: int):
    """One decoder call: logits [batch, seq, vocab] and the present key/values as the next past."""
    batch, seq = ids.shape
    feed = {"input_ids": ids, "attention_mask": np.ones((batch, past_len + seq), np.int64),
            "position_ids": np.tile(np.arange(past_len, past_len + seq), (batch, 1))}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            kv_heads, head_dim = inp.shape[1], inp.shape[3]
            feed[inp.name] = past[inp.name] if past else np.zeros((batch, kv_heads, 0, head_dim), np.float32)
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(names, feed)))
    present = {n.replace("present.", "past_key_values."): v for n, v in outputs.items() if n.startswith("present.")}
    return outputs["logits"], present


@torch.no_grad()
def reference_steps(model, prompt: np.ndarray, next_ids: np.ndarray):
    out = model(input_ids=torch.from_numpy(prompt), use_cache=True)
    mask = torch.ones(prompt.shape[0], prompt.shape[1] + 1, dtype=torch.long)
    step = model(input_ids=torch.from_numpy(next_ids), attention_mask=mask, past_key_values=out.past_key_values,
                 use_cache=True)
    return out.logits.numpy(), step.logits.numpy()


def position_diffs(graph, onnx_path=None) -> np.ndarray:
    """Per position, the largest |ONNX - reference| logit difference: prompts of two lengths at batch 2,
    then one step with past."""
    sess, diffs = session(graph, onnx_path), []
    rng = np.random.default_rng(1)
    for length in PROMPT_LENGTHS:
        prompt = rng.integers(3, 256, (2, length)).astype(np.int64)
        next_ids = rng.integers(3, 256, (2, 1)).astype(np.int64)
        logits, present = ort_step(sess, prompt, None, 0)
        step_logits, _ = ort_step(sess, next_ids, present, length)
        want, want_step = reference_steps(graph.reference, prompt, next_ids)
        assert logits.shape == want.shape and step_logits.shape == want_step.shape
        diffs += [np.abs(logits - want).max(-1).ravel(), np.abs(step_logits - want_step).max(-1).ravel()]
    return np.concatenate(diffs)


def max_logit_diff(graph, onnx_path=None) -> float:
    return float(position_diffs(graph, onnx_path).max())


def ort_greedy(sess, prompt: list[int], steps: int) -> list[int]:
    ids, past, past_len, out = np.array([prompt], np.int64), None, 0, []
    for _ in range(steps):
        logits, past = ort_step(sess, ids, past, past_len)
        past_len += ids.shape[1]
        out.append(int(logits[0, -1].argmax()))
        ids = np.array([[out[-1]]], np.int64)
    return out


@torch.no_grad()
def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def weight_names(onnx_path, layers) -> dict[str, str]:
    model = onnx.load(str(onnx_path), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    return {layer: nodes[matmul_node_name(layer)].input[1] for layer in layers}


def graph_parts(onnx_path):
    model = onnx.load(str(onnx_path))
    return model, {t.name: t for t in model.graph.initializer}, [n for n in model.graph.node]


@pytest.mark.parametrize("fmt", ["int4-g128", "int4-awq", "int8-weight-only"])
def test_weight_only_export_matches_reference(exported, fmt):
    from inferforge.optimize.llm_quantize import load_as_transformers

    artifact, graph = exported(fmt)
    assert graph.exact_tokens and graph.logits_atol <= 1e-3
    model, inits, nodes = graph_parts(graph.onnx_path)
    nbits = {n.name: n for n in nodes if n.op_type == "MatMulNBits"}
    by_name = {n.name: n for n in nodes}
    bits = 8 if fmt == "int8-weight-only" else 4
    for layer in LAYERS:
        k, n = graph.reference.get_submodule(layer).in_features, graph.reference.get_submodule(layer).out_features
        prefix = matmul_node_name(layer)[: -len("/MatMul")]
        if bits == 8:   # int8 weights [K, N], a scale per output channel, into the float MatMul; x stays float
            dq, matmul = by_name[f"{prefix}/weight/DequantizeLinear"], by_name[f"{prefix}/MatMul"]
            weight = inits[dq.input[0]]
            assert weight.data_type == onnx.TensorProto.INT8 and list(weight.dims) == [k, n]
            assert {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 1}
            assert list(inits[dq.input[1]].dims) == [n] and matmul.input[1] == dq.output[0]
            assert f"{prefix}/input/QuantizeLinear" not in by_name
            continue
        node = nbits[prefix + "/MatMulNBits"]   # every int4 layer became MatMulNBits, with the artifact's block size
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "com.microsoft" and attrs["bits"] == 4
        assert attrs["block_size"] == GROUP and attrs["K"] == k
        assert len(node.input) == 4      # asymmetric int4 keeps zero points
    assert len(nbits) == (0 if bits == 8 else len(LAYERS))
    assert sum(n.name.endswith("proj/MatMul") for n in nodes) == (len(LAYERS) - 1 if bits == 8 else 0)
    float_weights = weight_names(graph.float_onnx_path, LAYERS)
    assert not set(float_weights.values()) & set(inits)   # no float weight of a quantized layer remains
    divs = [n for n in nodes if n.name.endswith("/input_scale/Div")]
    assert len(divs) == (len(LAYERS) if fmt == "int4-awq" else 0)
    assert graph.onnx_path.stat().st_size < (0.5 if bits == 4 else 0.7) * graph.float_onnx_path.stat().st_size
    # The reference is the artifact's quantized model (its CPU arithmetic), and ONNX matches it.
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(graph.reference(ids).logits, load_as_transformers(artifact)(ids).logits,
                                   atol=1e-4, rtol=0)
    assert max_logit_diff(graph) <= graph.logits_atol
    prompt = [1, 17, 42, 99, 5]
    assert ort_greedy(session(graph), prompt, 16) == reference_greedy(graph.reference, prompt, 16)
    export = graph.manifest["quantized_export"]
    assert export["op"] == ("DequantizeLinear+MatMul" if bits == 8 else "MatMulNBits")
    assert export["layers"] == len(LAYERS) and export["layers_float"] == 0
    assert export["bits"] == bits and export["zero_points"] == (bits == 4)
    # int8: without the recorded session entry ONNX Runtime's QDQ fusion quantizes activations.
    assert export.get("onnxruntime_session_config") == ({"session.disable_quant_qdq": "1"} if bits == 8 else None)


def test_manifest_names_parent_gate_and_lineage(exported):
    artifact, graph = exported("int4-g128")
    parent = json.loads((artifact / "manifest.json").read_text())
    record = graph.manifest
    assert record["quantized_export"]["block_size"] == GROUP and record["quantized_export"]["format"] == "int4-g128"
    assert record["parent"]["version"] == parent["version"] and record["parent"]["manifest_sha256"] == parent["manifest_sha256"]
    assert "digest" not in record["parent"]
    assert record["parent"]["manifest_file_sha256"] == hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()
    assert record["parent"]["kind"] == "quantized-causal-lm" and record["parent"]["path"] == str(artifact.resolve())
    assert record["parent_gate"]["checks"] == parent["checks"] and record["parent_gate"]["gate"] == parent["gate"]
    first, source = record["lineage"]
    assert first["version"] == parent["version"] and first["steps"] == ["quantize"]
    assert first["data"]["quantization.calibration_sha256"] == parent["quantization"]["calibration_sha256"]
    assert source["source"]["weights_sha256"] == parent["source"]["weights_sha256"]


def test_planted_corruption_is_caught(exported, tmp_path):
    _, graph = exported("int4-g128")
    assert max_logit_diff(graph) <= graph.logits_atol
    model = onnx.load(str(graph.onnx_path))
    packed = next(t for t in model.graph.initializer if t.name == "lm_head.qweight")
    raw = bytearray(packed.raw_data)
    raw[100] ^= 0xFF                  # one byte: two int4 codes of one lm_head row
    packed.raw_data = bytes(raw)
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    assert max_logit_diff(graph, tmp_path / "model.onnx") > 10 * graph.logits_atol


@pytest.mark.parametrize("fmt", ["w8a8", "fp8"])
def test_qdq_export_matches_static_reference(exported, checkpoint, fmt):
    root, _, cal = checkpoint
    artifact, graph = exported(fmt)
    assert not graph.exact_tokens
    model, inits, nodes = graph_parts(graph.onnx_path)
    elem = onnx.TensorProto.INT8 if fmt == "w8a8" else onnx.TensorProto.FLOAT8E4M3FN
    by_name = {n.name: n for n in nodes}
    for layer in LAYERS:
        prefix = matmul_node_name(layer)[: -len("/MatMul")]
        quant, dequant = by_name[f"{prefix}/input/QuantizeLinear"], by_name[f"{prefix}/input/DequantizeLinear"]
        weight_dq, matmul = by_name[f"{prefix}/weight/DequantizeLinear"], by_name[f"{prefix}/MatMul"]
        assert matmul.input == [dequant.output[0], weight_dq.output[0]] and dequant.input[0] == quant.output[0]
        scale = onnx.numpy_helper.to_array(inits[quant.input[1]])
        assert scale.shape == () and scale > 0                       # a constant per-tensor activation scale
        weight = inits[weight_dq.input[0]]
        assert weight.data_type == elem and list(weight.dims) == [graph.reference.get_submodule(layer).in_features,
                                                                  graph.reference.get_submodule(layer).out_features]
        assert inits[quant.input[2]].data_type == elem and not any(inits[quant.input[2]].raw_data)   # zero point 0
        smooth = by_name.get(f"{prefix}/smooth/Mul")
        assert (smooth is not None) == (fmt == "w8a8")
        if fmt == "w8a8":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in weight_dq.attribute}
            assert attrs["axis"] == 1 and list(inits[weight_dq.input[1]].dims) == [weight.dims[1]]
    float_weights = weight_names(graph.float_onnx_path, LAYERS)
    assert not set(float_weights.values()) & set(inits)
    diffs = position_diffs(graph)
    assert diffs.max() <= graph.logits_atol
    # Same arithmetic: only a value on a rounding boundary may round differently, in few positions.
    assert (diffs <= 1e-4).mean() >= 0.9, diffs
    export = graph.manifest["quantized_export"]
    assert export["op"] == "QDQ" and export["layers"] == len(LAYERS)
    # No --calibration: the artifact's own calibration file was found beside it, unchanged.
    assert export["activation_scales"].startswith("static per-tensor from cal.txt sha256 ")
    check = export["checks"][0]
    assert check["passed"] and check["limit"] == 0.5
    assert check["measured"] == export["static_vs_dynamic"]["top1_agreement"]
    if fmt == "fp8":
        assert export["onnxruntime_session_config"] == {"session.disable_quant_qdq": "1"}


def test_static_scales_that_lose_agreement_fail_the_gate(exported, checkpoint, monkeypatch, tmp_path):
    import inferforge.optimize.onnx_quant_reference as reference

    artifact, _ = exported("w8a8")
    collect = reference.collect_static_scales
    # Scales 1000x too small clip nearly every activation: the static model stops agreeing.
    monkeypatch.setattr(reference, "collect_static_scales",
                        lambda *a, **k: {n: s / 1000 for n, s in collect(*a, **k).items()})
    with pytest.raises(GateFailed, match=r"static activation scales .* below its gate's 50\.00%"):
        export_quantized_graph(artifact, tmp_path / "work")


def test_missing_calibration_for_w8a8(exported, tmp_path, monkeypatch):
    artifact, _ = exported("w8a8")
    moved = tmp_path / "elsewhere" / artifact.name
    shutil.copytree(artifact, moved)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match=r"static activation scales.*'cal\.txt'.*pass --calibration FILE$") as e:
        export_quantized_graph(moved, tmp_path / "work")
    assert "\n" not in str(e.value)
    # A file of that name with other text does not pass for it (its sequences hash differently).
    save_word_text(moved.parent / "cal.txt", lines=8, words=16, seed=5)
    with pytest.raises(UserInputError, match="pass --calibration FILE"):
        export_quantized_graph(moved, tmp_path / "work")
    with pytest.raises(UserInputError, match="--calibration .*no such file"):
        export_quantized_graph(moved, tmp_path / "work", calibration=tmp_path / "nope.txt")


def test_bad_inputs(checkpoint, exported, tmp_path):
    from inferforge.artifact import package_checkpoint
    from inferforge.manifest import write_manifest

    _, path, _ = checkpoint
    with pytest.raises(ArtifactError, match="no manifest.json"):
        export_quantized_graph(path, tmp_path / "w")        # a checkpoint directory, not an artifact
    packaged = package_checkpoint(path, tmp_path / "packaged")
    with pytest.raises(UserInputError, match="a 'causal-lm' artifact, not a quantized-causal-lm") as e:
        export_quantized_graph(packaged, tmp_path / "w")
    assert "\n" not in str(e.value)
    # A group size MatMulNBits cannot take (an artifact from another tool or version).
    artifact, _ = exported("int4-g128")
    odd = tmp_path / "odd"
    shutil.copytree(artifact, odd)
    meta = json.loads((odd / "quantization.json").read_text())
    meta["layers"]["model.layers.0.mlp.up_proj"]["group_size"] = 24
    (odd / "quantization.json").write_text(json.dumps(meta))
    manifest = json.loads((odd / "manifest.json").read_text())
    write_manifest(odd, {k: v for k, v in manifest.items() if k not in ("format", "version", "files", "manifest_sha256")})
    with pytest.raises(UserInputError, match="group size 24 cannot be exported as MatMulNBits.*power of two >= 16"):
        export_quantized_graph(odd, tmp_path / "w")
    fp8, _ = exported("fp8")
    with pytest.raises(UserInputError, match="opset >= 19"):
        export_quantized_graph(fp8, tmp_path / "w", opset=18)
