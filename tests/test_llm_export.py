"""`inferforge export` of Llama / Qwen2 / Mistral checkpoints to ONNX decoder artifacts: greedy tokens
identical to transformers (batched, left-padded, through the past), validation that fails on a planted
mismatch and writes nothing, fp16 and external data, load / generate / bench on the artifact, and
one-line errors for bad input. One export per architecture, shared by the module."""

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from inferforge.cli import main
from inferforge.errors import GateFailed, UserInputError
from tests.factories_llama import save_word_tokenizer

ARCHS = ("llama", "qwen2", "mistral")
DIMS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, initializer_range=0.05)


def save_tiny(path: Path, arch: str, seed: int = 0) -> Path:
    """A seeded random tiny checkpoint of `arch` with a word tokenizer; Qwen2 has q/k/v biases."""
    import transformers

    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "mistral": ("MistralConfig", "MistralForCausalLM")}[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**DIMS)).eval()
    if arch == "qwen2":   # biases start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    save_word_tokenizer(path)
    return Path(path)


def _state(artifact: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(json.loads((artifact / "manifest.json").read_text())["source"]["path"])
                         / "model.safetensors"))


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: save_tiny(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """arch -> artifact directory; Mistral's weights go to model.onnx_data (threshold forced low)."""
    from inferforge.optimize.llm_export_artifact import export_llm

    root = tmp_path_factory.mktemp("onnx")
    return {arch: (export_llm(checkpoints[arch], root / arch, external_data_threshold=1024 if arch == "mistral"
                              else None), root / arch) for arch in ARCHS}


def _transformers_greedy(model_dir, prompts, steps=16):
    from transformers import AutoModelForCausalLM

    from inferforge.optimize.onnx_decoder import left_pad

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids, mask, _ = left_pad(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_transformers_batched_through_the_past(exported, checkpoints, arch, monkeypatch):
    import inferforge
    from inferforge.optimize.onnx_decoder import DecoderSession

    manifest, out = exported[arch]
    assert manifest["kind"] == "onnx-causal-lm" and manifest["validation"]["identical"] is True
    assert manifest["validation"]["greedy_steps"] == 16
    decoder = inferforge.load(out)
    assert type(decoder).__name__ == "OnnxDecoder" and decoder.provider == "CPUExecutionProvider"
    calls = []
    real_run = DecoderSession.run

    def run(self, input_ids, *args):
        calls.append(tuple(input_ids.shape))
        return real_run(self, input_ids, *args)

    monkeypatch.setattr(DecoderSession, "run", run)
    prompts = [[5, 6], [7, 8, 9, 10, 11], list(range(20, 31))]
    tokens = decoder.generate(prompts, max_new_tokens=16, stop_token_ids=[])
    assert tokens == _transformers_greedy(checkpoints[arch], prompts)
    # One prefill of the left-padded batch, then one token per row per step: the prefix never runs again.
    assert calls == [(3, 11)] + [(3, 1)] * 15
    assert [decoder.generate([p], max_new_tokens=16, stop_token_ids=[])[0] for p in prompts] == tokens


def test_manifest_records_exporter_validation_speed_and_source(exported, checkpoints):
    from inferforge.models import weights_sha256

    manifest, out = exported["qwen2"]
    export = manifest["export"]
    assert export["opset"] == 18 and export["dtype"] == "fp32"
    assert set(export["exporter"]) >= {"optimum", "onnx", "onnxruntime", "torch", "transformers"}
    assert all(export["exporter"][k] for k in ("onnx", "onnxruntime", "torch", "transformers"))
    cases = manifest["validation"]["cases"]
    assert [c["lengths"] for c in cases] == [[1], [7], [33], [1, 7, 33]]
    assert all(0 <= c["logits_max_abs_diff"] <= c["logits_limit"] < 1e-3 for c in cases)
    assert manifest["throughput"]["tokens_per_s"] > 0 and manifest["throughput"]["batch"] == 1
    assert manifest["source"]["weights_sha256"] == weights_sha256(checkpoints["qwen2"])
    assert manifest["runtime"] == {"engine": "inferforge.optimize.onnx_decoder.OnnxDecoder", "model": "model.onnx",
                                   "model_type": "qwen2", "dtype": "fp32", "external_data": None,
                                   "onnxruntime_session_config": {}}
    assert manifest["parent"] is None
    assert {"tokenizer.json", "config.json", "model.onnx", "ort_config.json"} <= set(manifest["files"])
    assert json.loads((out / "ort_config.json").read_text())["inferforge"] == {"quantized_export": None}


def test_external_data_is_written_and_loads(exported):
    import inferforge

    manifest, out = exported["mistral"]
    assert manifest["runtime"]["external_data"] == "model.onnx_data"
    weights = sum(p.numel() for name, p in _state(out).items()) * 4
    assert (out / "model.onnx_data").stat().st_size >= 0.9 * weights > 3 * (out / "model.onnx").stat().st_size
    assert "model.onnx_data" in manifest["files"]
    assert len(inferforge.load(out).generate([[5, 6, 7]], max_new_tokens=3, stop_token_ids=[])[0]) == 3


def _scaled_graph(src: Path, dst: Path, factor=1.05, node="/model/layers.0/self_attn/k_proj/MatMul") -> Path:
    """The graph at `src` with the weight of the MatMul `node` scaled by `factor`."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    weight = next(n.input[1] for n in model.graph.node if n.name == node)
    tensor = next(t for t in model.graph.initializer if t.name == weight)
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), tensor.name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def test_validation_names_the_output_that_differs(exported, checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    from inferforge.optimize.onnx_decoder import validate_decoder
    from inferforge.runtime.llama import LlamaSpec

    _, out = exported["llama"]
    spec = LlamaSpec.from_config(json.loads((out / "config.json").read_text()))
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    assert validate_decoder(out / "model.onnx", reference, spec)["identical"]
    bad = _scaled_graph(out / "model.onnx", tmp_path / "bad" / "model.onnx")
    with pytest.raises(GateFailed, match=r"ONNX Runtime vs PyTorch: (logits|present\.\d\.(key|value)) differs by "
                                         r"[0-9.e-]+ \(limit [0-9.e-]+\) at batch 1, prompt lengths \[1\]"):
        validate_decoder(bad, reference, spec)


def test_greedy_tokens_that_differ_fail_unless_only_agreement_is_asked(exported, checkpoints):
    """A reference whose logits pass a loose absolute limit but whose argmax differs: with exact_tokens the
    greedy check fails naming the step and both tokens; without, the agreement is recorded."""
    from transformers import AutoModelForCausalLM

    from inferforge.optimize.onnx_decoder import validate_decoder
    from inferforge.runtime.llama import LlamaSpec

    _, out = exported["llama"]
    spec = LlamaSpec.from_config(json.loads((out / "config.json").read_text()))
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    with torch.no_grad():
        reference.lm_head.weight.neg_()
    with pytest.raises(GateFailed, match=r"greedy tokens differ from PyTorch's at step 0 of prompt 0 \(batch 1, "
                                         r"prompt lengths \[7\], through past_key_values\): ONNX \d+ vs PyTorch \d+"):
        validate_decoder(out / "model.onnx", reference, spec, logits_atol=1e3)
    report = validate_decoder(out / "model.onnx", reference, spec, logits_atol=1e3, exact_tokens=False)
    assert not report["identical"] and all(g["agreement"] < 0.5 for g in report["greedy"])


def test_a_difference_in_a_later_batch_row_fails_validation(exported, checkpoints, monkeypatch):
    """Every row of the batched greedy run is compared, not the first: PyTorch's tokens changed in the
    last row only fail the gate, naming that row."""
    from transformers import AutoModelForCausalLM

    from inferforge.optimize import onnx_decoder_validate
    from inferforge.runtime.llama import LlamaSpec

    _, out = exported["llama"]
    spec = LlamaSpec.from_config(json.loads((out / "config.json").read_text()))
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    real = onnx_decoder_validate.torch_greedy

    def last_row_differs(model, prompts, steps):
        tokens = real(model, prompts, steps)
        if len(prompts) > 1:
            tokens[-1][3] = (tokens[-1][3] + 1) % spec.vocab_size
        return tokens

    monkeypatch.setattr(onnx_decoder_validate, "torch_greedy", last_row_differs)
    with pytest.raises(GateFailed, match=r"greedy tokens differ from PyTorch's at step 3 of prompt 2 \(batch 3"):
        onnx_decoder_validate.validate_decoder(out / "model.onnx", reference, spec)
    report = onnx_decoder_validate.validate_decoder(out / "model.onnx", reference, spec, exact_tokens=False)
    assert report["greedy"][0]["identical"] and not report["greedy"][1]["identical"]
    assert report["greedy"][1]["agreement"] == 1 - 1 / (3 * report["greedy_steps"])


def test_planted_mismatch_writes_nothing_and_keeps_the_earlier_artifact(exported, checkpoints, tmp_path, monkeypatch):
    from inferforge.manifest import verify_artifact
    from inferforge.optimize import llm_export
    from inferforge.optimize.llm_export_artifact import export_llm

    _, good = exported["llama"]
    out = tmp_path / "art"
    shutil.copytree(good, out)
    before = verify_artifact(out)["manifest_sha256"]
    real = llm_export.export_decoder_onnx

    def planted(model_dir, out_dir, **kwargs):
        path = real(model_dir, out_dir, **kwargs)
        return _scaled_graph(path, path, factor=1.02, node="/lm_head/MatMul")

    monkeypatch.setattr(llm_export, "export_decoder_onnx", planted)
    with pytest.raises(GateFailed, match="logits differs by") as failure:
        export_llm(checkpoints["llama"], out)
    assert "no artifact written" in str(failure.value)
    assert verify_artifact(out)["manifest_sha256"] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "art.failed"]
    assert json.loads((tmp_path / "art.failed" / "report.json").read_text())["passed"] is False


def test_cli_exports_an_artifact_and_generate_runs_it(checkpoints, exported, tmp_path, capsys):
    from inferforge.artifact import package_checkpoint
    from inferforge.manifest import read_manifest

    parent = package_checkpoint(checkpoints["llama"], tmp_path / "llama-art")
    out = tmp_path / "llama-onnx"
    assert main(["export", str(parent), "--output", str(out), "-q"]) == 0
    assert f"artifact: {out}" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["name"] == "llama-art"        # the model folder's name, not the output's
    assert manifest["parent"]["name"] == "llama" and manifest["parent"]["kind"] == "causal-lm"
    assert manifest["parent"]["version"] == read_manifest(parent)["version"]
    assert main(["generate", str(out), "--prompt", "w5 w6 w7", "--max-new-tokens", "6", "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    # The tokenizer adds <s>: the prompt is [1, 5, 6, 7]; EOS (2) may end the greedy run early.
    expected = _transformers_greedy(checkpoints["llama"], [[1, 5, 6, 7]], steps=6)[0]
    assert result["tokens"] == expected[:len(result["tokens"])] and result["prompt_tokens"] == 4
    assert len(result["tokens"]) == 6 or result["tokens"][-1] == 2


def test_serving_bench_runs_in_process(exported, tmp_path, capsys):
    _, out = exported["llama"]
    code = main(["bench", str(out), "--scenario", "server", "--rate", "50", "--num-requests", "5", "--input-len", "6",
                 "--output-len", "4", "--warmup", "0", "--max-num-seqs", "3", "--target", "e2el_ms:mean:1e9",
                 "-o", str(tmp_path / "run"), "--json", "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["completed"] == 5 and report["failed"] == 0
    assert report["target"] == {"backend": "onnxruntime", "provider": "CPUExecutionProvider", "model": out.name,
                                "path": str(out.resolve())}


def test_requests_join_and_leave_between_steps(exported):
    import inferforge

    _, out = exported["qwen2"]
    decoder = inferforge.load(out, max_num_seqs=2)
    prompts = {0: [5, 6, 7], 1: [9], 2: list(range(30, 42)), 3: [4, 4]}
    lengths = {0: 6, 1: 3, 2: 5, 3: 4}
    alone = {i: decoder.generate([p], max_new_tokens=lengths[i], stop_token_ids=[])[0] for i, p in prompts.items()}
    got = {i: [] for i in prompts}
    decoder.add_request(0, prompts[0], max_new_tokens=lengths[0], stop_token_ids=[])
    for step in range(40):
        if step == 2:          # join while request 0 decodes; request 2 waits for a free row
            for i in (1, 2):
                decoder.add_request(i, prompts[i], max_new_tokens=lengths[i], stop_token_ids=[])
        if step == 3:
            decoder.add_request(3, prompts[3], max_new_tokens=lengths[3], stop_token_ids=[])
        for request_id, token in decoder.step():
            got[request_id].append(token)
        if step > 3 and not decoder.has_unfinished():
            break
    assert got == alone and not decoder.has_unfinished()
    decoder.add_request(7, [5, 6], max_new_tokens=5)
    decoder.step()
    assert decoder.stats()["running"] == 1 and decoder.abort(7) and decoder.stats()["running"] == 0


def test_sampling_is_seeded_and_unsupported_options_are_refused(exported):
    import inferforge

    _, out = exported["llama"]
    decoder = inferforge.load(out)
    first = decoder.generate([[5, 6], [7]], max_new_tokens=8, temperature=1.0, top_k=50, seed=3, stop_token_ids=[])
    assert first == decoder.generate([[5, 6], [7]], max_new_tokens=8, temperature=1.0, top_k=50, seed=3,
                                     stop_token_ids=[])
    assert first != decoder.generate([[5, 6], [7]], max_new_tokens=8, temperature=1.0, top_k=50, seed=4,
                                     stop_token_ids=[])
    with pytest.raises(UserInputError, match="sliding_window is not available"):
        decoder.generate([[5]], max_new_tokens=2, sliding_window=16)
    with pytest.raises(UserInputError, match="context window"):
        decoder.generate([[5] * 250], max_new_tokens=10)
    with pytest.raises(UserInputError, match="KV cache in fp32, fixed at export"):
        inferforge.load(out, kv_cache_dtype="fp16")


def test_no_prompts_give_no_outputs_as_the_engine_does(exported):
    """`generate([])` is `[]` (LLMEngine.generate too); its arguments are still checked."""
    import inferforge

    _, out = exported["llama"]
    decoder = inferforge.load(out)
    assert decoder.generate([], max_new_tokens=4) == [] and decoder.generate((), max_new_tokens=1) == []
    with pytest.raises(UserInputError, match="max_new_tokens must be >= 1"):
        decoder.generate([], max_new_tokens=0)
    assert len(decoder.generate([[5]], max_new_tokens=2, stop_token_ids=[])[0]) == 2


def test_fp16_export_validates_with_identical_greedy_tokens(checkpoints, tmp_path):
    import onnx

    from inferforge.optimize.llm_export_artifact import export_llm

    manifest = export_llm(checkpoints["llama"], tmp_path / "fp16", fp16=True)
    assert manifest["export"]["dtype"] == "fp16" and manifest["validation"]["dtype"] == "fp16"
    assert manifest["validation"]["identical"] and manifest["validation"]["rtol"] == 1e-2
    graph = onnx.load(str(tmp_path / "fp16" / "model.onnx")).graph
    types_of = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    assert types_of["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    assert types_of["present.1.value"] == onnx.TensorProto.FLOAT16 and types_of["logits"] == onnx.TensorProto.FLOAT
    ops = {n.name: n.op_type for n in graph.node}
    assert ops["/model/layers.0/self_attn/Softmax"] == "Softmax"
    assert "/model/layers.0/self_attn/Softmax_output_0_to_fp32" not in ops   # Softmax reads fp32, casts in front
    assert any(name.endswith("_to_fp32_cast") for name in ops)
    projections = {n.input[1] for n in graph.node if n.name.endswith("_proj/MatMul")}
    weights = [t for t in graph.initializer if t.name in projections]
    assert len(weights) == 14 and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


@pytest.fixture
def gpt2_dir(tmp_path):
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return path


@pytest.mark.parametrize("extra, message", [
    (["--opset", "13"], "--opset 13 is out of range; a decoder exports at opset 14 to 21"),
    (["--opset", "22"], "--opset 22 is out of range"),
    (["--format", "pdf"], "--format 'pdf': choose one of onnx, tensorrt, triton"),
    (["--format", "triton"], "--format triton needs --repository DIR"),
    (["--repository", "repo"], "--repository is for --format triton"),
    (["--format", "tensorrt", "--opset", "21"], "--opset 21 with --format tensorrt: TensorRT 10.1 parses opsets 9 to 20"),
    (["--min-cosine", "0.5"], "--min-cosine sets an encoder's cosine gate; a decoder export is gated by its logits"),
    (["--sentences", "s.txt"], "--sentences sets an encoder's cosine gate"),
    (["--calibration-size", "3"], "--calibration-size sets an encoder's cosine gate"),
    (["--max-batch", "4"], "--max-batch sizes TensorRT profiles and Triton's max_batch_size; --format onnx"),
    (["--format", "triton", "--repository", "r", "--max-sequence", "8"], "--max-sequence sizes TensorRT profiles"),
    (["--format", "tensorrt", "--max-sequence", "300"], "--max-sequence 300: the model takes 1 to 256 tokens"),
    (["--format", "tensorrt", "--max-batch", "0"], "--max-batch 0: must be at least 1"),
])
def test_bad_flags_are_one_line_before_any_work(checkpoints, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["export", str(checkpoints["llama"]), "--output", str(out), "-q", *extra]) == 2
    assert message in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_bad_inputs_are_one_line(checkpoints, gpt2_dir, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "missing")], "does not exist; give a model directory"),
        ([str(gpt2_dir)], "unsupported architecture gpt2; supported: llama, mistral, qwen2"),
        (["tests.factories:tiny_bert", "--fp16"], "--fp16 is for decoders"),
    ]
    (tmp_path / "file").write_text("x")
    cases.append(([str(checkpoints["llama"]), "--output", str(tmp_path / "file" / "out")], "is a file, not a directory"))
    for args, message in cases:
        if "--output" not in args:
            args = [*args, "--output", str(tmp_path / "out")]
        assert main(["export", *args, "-q"]) == 2, args
        assert message in _one_line(capsys.readouterr().err), args
    assert not (tmp_path / "out").exists()


def _fake_module(monkeypatch, name: str, **functions):
    module = types.ModuleType(name)
    for attr, fn in functions.items():
        setattr(module, attr, fn)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys.modules["inferforge.optimize"], name.rsplit(".", 1)[1], module, raising=False)
    return module


def test_tensorrt_and_triton_hooks_get_the_artifact(exported, tmp_path, monkeypatch, capsys):
    """The calls into trtriton's modules (stand-ins here): readiness files go into the new artifact and
    its manifest, the repository is written from the finished artifact."""
    calls = []

    def model_profiles(onnx_path, **kwargs):
        calls.append(("profiles", Path(onnx_path).name, kwargs))
        return {"input_ids": {"min": [1, 1], "opt": [1, 1], "max": [8, 16]}}

    def write_tensorrt_files(dest, onnx_name="model.onnx", *, profiles, position_limit=None):
        (Path(dest) / "tensorrt").mkdir()
        (Path(dest) / "tensorrt" / "profiles.json").write_text(json.dumps(profiles))
        return {"ready": True, "nodes": 3}

    def write_triton_repository(artifact_dir, repository, **kwargs):
        calls.append(("triton", Path(artifact_dir), Path(repository), kwargs))
        version = Path(repository) / "m" / "1"
        version.mkdir(parents=True)
        return version

    from inferforge.optimize.tensorrt_ready import operator_table

    _fake_module(monkeypatch, "inferforge.optimize.tensorrt_ready", model_profiles=model_profiles,
                 write_tensorrt_files=write_tensorrt_files, operator_table=operator_table)
    _fake_module(monkeypatch, "inferforge.optimize.triton_repo", write_triton_repository=write_triton_repository)
    from inferforge.manifest import verify_artifact

    _, src = exported["llama"]
    out = tmp_path / "trt"
    assert main(["export", str(src), "--format", "tensorrt", "--max-batch", "2", "--max-sequence", "64",
                 "--name", "trt-copy", "--output", str(out), "-q"]) == 0
    manifest = verify_artifact(out)
    assert manifest["name"] == "trt-copy"
    assert manifest["tensorrt"] == {"ready": True, "nodes": 3} and "tensorrt/profiles.json" in manifest["files"]
    assert manifest["parent"]["path"] == str(src.resolve()) and manifest["kind"] == "onnx-causal-lm"
    assert main(["export", str(src), "--format", "triton", "--repository", str(tmp_path / "repo"), "--name", "served",
                 "--max-batch", "4", "-q"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "repo" / "m" / "1"))
    assert calls == [("profiles", "model.onnx", {"position_limit": 256, "max_batch": 2, "max_sequence": 64}),
                     ("triton", src, tmp_path / "repo", {"name": "served", "max_batch_size": 4})]


def test_quantized_artifact_goes_through_the_quantized_graph(exported, checkpoints, tmp_path, monkeypatch):
    """A quantized-causal-lm artifact is exported by quantexport's `export_quantized_graph` (a stand-in
    here returning the float graph): its reference and tolerance validate, its manifest and both speeds
    are recorded."""
    from dataclasses import dataclass

    from transformers import AutoModelForCausalLM

    from inferforge.manifest import environment, utc_now, write_manifest
    from inferforge.optimize.llm_export_artifact import export_llm

    @dataclass
    class QuantizedGraph:
        onnx_path: Path
        float_onnx_path: Path
        reference: torch.nn.Module
        exact_tokens: bool
        logits_atol: float
        manifest: dict

    def export_quantized_graph(artifact_dir, work_dir, *, opset, calibration=None, progress=None):
        Path(work_dir).mkdir(parents=True)
        shutil.copyfile(exported["llama"][1] / "model.onnx", Path(work_dir) / "model.onnx")
        return QuantizedGraph(Path(work_dir) / "model.onnx", Path(work_dir) / "model.onnx",
                              AutoModelForCausalLM.from_pretrained(artifact_dir), True, 1e-3,
                              {"quantized_export": {"format": "stand-in", "opset": opset}})

    _fake_module(monkeypatch, "inferforge.optimize.onnx_llm_quant", export_quantized_graph=export_quantized_graph)
    artifact = shutil.copytree(checkpoints["llama"], tmp_path / "quant")
    write_manifest(artifact, {"name": "quant", "created": utc_now(), "kind": "quantized-causal-lm",
                              "source": {"model": "llama", "weights_sha256": "x"}, "steps": [], "checks": [],
                              "passed": True, "accuracy_passed": True, "environment": environment()})
    manifest = export_llm(artifact, tmp_path / "out")
    assert manifest["quantized_export"] == {"format": "stand-in", "opset": 18}
    assert manifest["validation"]["logits_atol"] == 1e-3 and manifest["validation"]["identical"]
    assert manifest["throughput_float"]["tokens_per_s"] > 0 and manifest["parent"]["kind"] == "quantized-causal-lm"
    with pytest.raises(UserInputError, match="--fp16 converts a float graph"):
        export_llm(artifact, tmp_path / "out16", fp16=True)


def test_real_quantized_export_when_available(tmp_path):
    pytest.importorskip("inferforge.optimize.onnx_llm_quant")
    from inferforge.optimize.llm_export_artifact import export_llm
    from inferforge.optimize.llm_quantize import quantize_checkpoint

    model = save_tiny(tmp_path / "llama", "llama")
    quantize_checkpoint(model, tmp_path / "int8", fmt="int8-weight-only", gate=None, num_samples=2, seq_len=16)
    manifest = export_llm(tmp_path / "int8", tmp_path / "out")
    assert manifest["quantized_export"]["op"] == "DequantizeLinear+MatMul" and manifest["throughput_float"]["tokens_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (IO binding on CUDAExecutionProvider)")
def test_cuda_io_binding_gives_the_cpu_tokens(exported):
    """On a GPU `load` picks CUDAExecutionProvider and keeps the past on the device (IO binding)."""
    import inferforge
    from inferforge.optimize.onnx_decoder import OnnxDecoder

    _, out = exported["qwen2"]
    gpu = inferforge.load(out)
    cpu = OnnxDecoder.from_artifact(out, provider="CPUExecutionProvider")
    assert gpu.provider == "CUDAExecutionProvider" and gpu.model.device.type == "cuda"
    prompts = [[5, 6], [7, 8, 9, 10, 11], list(range(20, 31))]
    assert gpu.generate(prompts, max_new_tokens=16, stop_token_ids=[]) == cpu.generate(prompts, max_new_tokens=16,
                                                                                         stop_token_ids=[])


def test_serve_app_runs_the_onnx_decoder(exported):
    from fastapi.testclient import TestClient

    import inferforge
    from inferforge.runtime.async_engine import AsyncEngine
    from inferforge.runtime.serve import create_app

    decoder = inferforge.load(exported["llama"][1])
    expected = decoder.generate([decoder.tokenizer("w5 w6 w7")["input_ids"]], max_new_tokens=5)[0]
    with TestClient(create_app(AsyncEngine(decoder), decoder.tokenizer, model_name="tiny")) as client:
        body = client.post("/v1/completions", json={"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 5,
                                                    "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] == len(expected)
    assert body["choices"][0]["text"] == decoder.tokenizer.decode(expected, skip_special_tokens=True)


def test_tensorrt_copy_of_a_decoder_stays_within_its_positions(exported, tmp_path, capsys):
    """Profiles of a decoder with 256 positions: the context (attention_mask, past + new) ends at 256, half
    of it per call; a graph TensorRT's parser would refuse (opset 21) is refused up front."""
    from inferforge.manifest import verify_artifact

    _, src = exported["llama"]
    out = tmp_path / "trt"
    assert main(["export", str(src), "--format", "tensorrt", "--max-batch", "2", "--output", str(out), "-q"]) == 0
    assert verify_artifact(out)["tensorrt"]["ready"] is True
    profiles = json.loads((out / "tensorrt" / "profiles.json").read_text())
    assert profiles["attention_mask"]["max"] == [2, 256] and profiles["input_ids"]["max"] == [2, 128]
    assert profiles["past_key_values.0.key"]["max"][2] == 128
    assert main(["export", str(src), "--format", "tensorrt", "--opset", "18", "--output", str(tmp_path / "x")]) == 2
    assert "--opset 18: " in _one_line(capsys.readouterr().err) and not (tmp_path / "x").exists()
    for flag in (["--min-cosine", "0.9"], ["--held-out-size", "5"]):
        assert main(["export", str(src), "--format", "tensorrt", *flag, "--output", str(tmp_path / "x")]) == 2
        assert f"{flag[0]} sets an encoder's cosine gate; " in _one_line(capsys.readouterr().err)
