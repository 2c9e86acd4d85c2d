"""Which ONNX form of a weight-only layer decodes fastest on ONNX Runtime CPU, batch 1 (issue 11).

    python -m scripts.bench_onnx_nbits_variants --hidden 512 --layers 4 --vocab 4096

For int8-weight-only and int4-g128 artifacts of one random seeded Llama, the exported graph is timed
against variants of it, all interleaved in one process:

    float32                 the float graph the quantized one was rewritten from
    nbits                   MatMulNBits (accuracy_level 0: float compute); int4's export, int8 rebuilt
    nbits-acc4              the same nodes with accuracy_level=4 (activations quantized to int8 per block)
    dq-matmul (int8)        the int8 export: DequantizeLinear(int8 W^T [K, N], per-channel scale, axis=1)
                            + MatMul, with session.disable_quant_qdq=1 (the DQ folds to float weights)
    dq-matmul-fused (int8)  the same graph in a default session (ORT's QDQ fusion: MatMulNBits acc 4)

and each variant's largest prefill logit difference and 16 greedy tokens against the float32 graph
are printed (accuracy_level=4 changes the arithmetic). decode tokens/s = new tokens / decode seconds (prefill
excluded), median and p20/p80 over `--repeats` runs. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from scripts.bench_onnx_llm_quant import _decode_seconds, _session


def _nbits_variant(src: Path, dst: Path, *, accuracy_level: int) -> Path:
    """A copy of the MatMulNBits graph `src` with `accuracy_level` set on every MatMulNBits node."""
    import onnx
    from onnx import helper

    from inferforge.optimize.onnx_quant_graph import save_checked

    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
    save_checked(model, dst / "model.onnx")
    return dst / "model.onnx"


def _int8_nbits_graph(artifact: Path, float_onnx: Path, dst: Path) -> Path:
    from inferforge.optimize.llm_quantize import load_as_transformers
    from inferforge.optimize.onnx_quant_graph import int8_nbits, rewrite_quantized_matmuls
    from inferforge.runtime.llama_quantized import read_quantization

    model = load_as_transformers(artifact)
    weights = {name: int8_nbits(model.get_submodule(name)) for name in read_quantization(artifact)["layers"]}
    rewrite_quantized_matmuls(float_onnx, dst / "model.onnx", weights)
    return dst / "model.onnx"


def _greedy_and_logits(sess, prompt: np.ndarray, steps: int):
    past_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    names = [o.name for o in sess.get_outputs()]
    ids, past, past_len, tokens, logits = prompt, None, 0, [], []
    for _ in range(steps):
        feed = {"input_ids": ids, "attention_mask": np.ones((1, past_len + ids.shape[1]), np.int64),
                "position_ids": np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)[None]}
        for inp in past_inputs:
            feed[inp.name] = past[inp.name] if past else np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
        out = dict(zip(names, sess.run(names, feed)))
        past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
        past_len += ids.shape[1]
        logits.append(out["logits"][0, -1])
        tokens.append(int(out["logits"][0, -1].argmax()))
        ids = np.array([[tokens[-1]]], np.int64)
    return tokens, np.stack(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--formats", nargs="+", default=["int8-weight-only", "int4-g128"])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import onnxruntime
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from inferforge.manifest import cpu_name, git_revision
    from inferforge.optimize.llm_quantize import quantize_checkpoint
    from inferforge.optimize.onnx_llm_quant import export_quantized_graph
    from tests.factories_llama import save_word_tokenizer

    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                 max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    results = {"provider": "onnxruntime CPUExecutionProvider", "batch": 1, "prompt_tokens": args.prompt,
               "new_tokens": args.new, "repeats": args.repeats, "shape": shape, "cpu": cpu_name(),
               "onnxruntime": onnxruntime.__version__, "git": git_revision(),
               "formula": "decode tokens/s = new_tokens / (wall time of the new_tokens single-token steps)",
               "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape, initializer_range=0.05)).eval().save_pretrained(root / "model")
        save_word_tokenizer(root / "model", vocab_size=args.vocab)
        prompt = np.random.default_rng(0).integers(3, args.vocab, (1, args.prompt)).astype(np.int64)
        for fmt in args.formats:
            artifact = root / f"artifact-{fmt}"
            quantize_checkpoint(root / "model", artifact, fmt=fmt, gate=None, group_size=128)
            graph = export_quantized_graph(artifact, root / f"work-{fmt}", opset=18)
            int8 = fmt == "int8-weight-only"
            nbits = _int8_nbits_graph(artifact, graph.float_onnx_path, root / "nbits8") if int8 else graph.onnx_path
            paths = {"float32": graph.float_onnx_path, "nbits": nbits,
                     "nbits-acc4": _nbits_variant(nbits, root / f"{fmt}-acc4", accuracy_level=4)}
            sessions = {name: _session(path, 0) for name, path in paths.items()}
            if int8:
                paths["dq-matmul"] = paths["dq-matmul-fused"] = graph.onnx_path
                config = graph.manifest["quantized_export"]["onnxruntime_session_config"]
                sessions["dq-matmul"] = _session(graph.onnx_path, 0, config)
                sessions["dq-matmul-fused"] = _session(graph.onnx_path, 0)
            want_tokens, want_logits = _greedy_and_logits(sessions["float32"], prompt, 16)
            decode = {name: [] for name in sessions}
            for sess in sessions.values():
                _decode_seconds(sess, prompt, 4)                     # warm-up
            for _ in range(args.repeats):                            # interleaved
                for name, sess in sessions.items():
                    decode[name].append(_decode_seconds(sess, prompt, args.new)[1])
            for name, seconds in decode.items():
                tokens, logits = _greedy_and_logits(sessions[name], prompt, 16)
                rates = sorted(args.new / s for s in seconds)
                results["results"][f"{fmt}: {name}"] = {
                    "decode_tokens_per_s_median": round(statistics.median(rates), 1),
                    "p20": round(float(np.percentile(rates, 20)), 1), "p80": round(float(np.percentile(rates, 80)), 1),
                    "graph_mb": round(sum(p.stat().st_size for p in paths[name].parent.glob("model.onnx*")) / 1e6, 2),
                    "greedy_16_same_as_float32": tokens == want_tokens,
                    "prefill_logits_max_abs_diff_vs_float32": float(np.abs(logits[0] - want_logits[0]).max())}
            print(json.dumps(results, indent=2), flush=True)


if __name__ == "__main__":
    main()
