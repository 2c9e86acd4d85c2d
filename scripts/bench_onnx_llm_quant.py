"""Decode tokens/s of a quantized ONNX decoder (MatMulNBits) against its float32 graph, ONNX Runtime CPU, batch 1.

    python -m scripts.bench_onnx_llm_quant --hidden 512 --layers 4 --vocab 4096 --group 128 --formats int4-g128

Builds a random seeded Llama of that shape, quantizes it (`quantize_checkpoint`, gate off: the
weights are random), exports it with `export_quantized_graph` and times greedy decoding with past
key/values on both graphs, interleaved: prefill of `--prompt` tokens, then `--new` tokens one at a
time. decode tokens/s = new tokens / decode seconds (prefill excluded); median and p20/p80 over
`--repeats` runs. Prints one JSON object (shapes, versions, CPU, git revision, results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _session(path: Path, threads: int, config: dict | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _decode_seconds(sess, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of greedy decoding with past."""
    past_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    names = [o.name for o in sess.get_outputs()]
    ids, past, past_len = prompt, None, 0
    start = time.perf_counter()
    prefill = 0.0
    for step in range(new_tokens + 1):
        feed = {"input_ids": ids, "attention_mask": np.ones((1, past_len + ids.shape[1]), np.int64),
                "position_ids": np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)[None]}
        for inp in past_inputs:
            feed[inp.name] = past[inp.name] if past else np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
        out = dict(zip(names, sess.run(names, feed)))
        past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
        past_len += ids.shape[1]
        ids = out["logits"][:, -1:].argmax(-1).astype(np.int64)
        if step == 0:
            prefill = time.perf_counter() - start
    return prefill, time.perf_counter() - start - prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--formats", nargs="+", default=["int4-g128"])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    args = parser.parse_args()

    import onnxruntime
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from inferforge.manifest import cpu_name, git_revision
    from inferforge.optimize.llm_quantize import quantize_checkpoint
    from inferforge.optimize.onnx_llm_quant import export_quantized_graph
    from tests.factories_llama import save_word_tokenizer

    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                 max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    results = {"provider": "onnxruntime CPUExecutionProvider", "batch": 1, "prompt_tokens": args.prompt,
               "new_tokens": args.new, "repeats": args.repeats, "shape": shape, "cpu": cpu_name(),
               "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "git": git_revision(),
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
            quantize_checkpoint(root / "model", artifact, fmt=fmt, gate=None, group_size=args.group)
            graph = export_quantized_graph(artifact, root / f"work-{fmt}")
            config = graph.manifest["quantized_export"].get("onnxruntime_session_config")
            sessions = {"float32": _session(graph.float_onnx_path, args.threads),
                        fmt: _session(graph.onnx_path, args.threads, config)}
            for sess in sessions.values():
                _decode_seconds(sess, prompt, 4)                     # warm-up
            decode = {name: [] for name in sessions}
            for _ in range(args.repeats):                            # interleaved
                for name, sess in sessions.items():
                    decode[name].append(_decode_seconds(sess, prompt, args.new)[1])
            for name, seconds in decode.items():
                rates = sorted(args.new / s for s in seconds)
                results["results"][f"{fmt}: {name}"] = {
                    "graph_mb": round(sum(p.stat().st_size for p in (graph.float_onnx_path if name == "float32"
                                                                     else graph.onnx_path).parent.glob("model.onnx*"))
                                      / 1e6, 2),
                    "decode_tokens_per_s_median": round(statistics.median(rates), 1),
                    "p20": round(float(np.percentile(rates, 20)), 1), "p80": round(float(np.percentile(rates, 80)), 1)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
