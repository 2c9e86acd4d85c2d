"""Decode tokens/s with and without CUDA graphs, against transformers' generate with a static cache.

    python -m inferforge.bench.kernels.bench_decode_graphs --out bench/results/decode-graphs.md   # a GPU
    python -m inferforge.bench.kernels.bench_decode_graphs --dry-run                              # CPU: arguments only

Model: Llama-3.2-1B-shaped (16 layers, hidden 2048, 32 heads / 8 KV heads, vocab 128256), random bf16
weights, the same weights for every provider. Providers: `engine` (LLMEngine, eager decode steps),
`engine+cuda-graphs` (the same engine with runtime/cuda_graphs.py's captured decode steps),
`transformers-static` (generate with cache_implementation="static", greedy, no torch.compile).
Metric: decode tokens/s = batch * (new_tokens - 1) / (time of the last token - time of the first token),
i.e. TPOT's inverse times the batch: the prefill and the first token are left out. Median of `--repeats` runs
after one warm-up run (Triton compilation and graph capture happen before timing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

PROVIDERS = ["engine", "engine+cuda-graphs", "transformers-static"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _engine_decode_tps(engine, prompts, new_tokens: int) -> float:
    stamps = []
    for _ in engine.stream(prompts, max_new_tokens=new_tokens, stop_token_ids=[]):
        _sync(engine.model.device.type)
        stamps.append(time.perf_counter())
    batch = len(prompts)
    # Tokens arrive batch by batch: the first `batch` are the first tokens, the last one ends the run.
    return batch * (new_tokens - 1) / (stamps[-1] - stamps[batch - 1])


def _hf_decode_tps(hf, prompts, new_tokens: int) -> float:
    device = hf.device.type
    ids = torch.tensor(prompts, device=device)

    def timed(n):
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static",
                        pad_token_id=0)
        _sync(device)
        return time.perf_counter() - start

    first, total = timed(1), timed(new_tokens)
    return len(prompts) * (new_tokens - 1) / (total - first)


LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True, rms_norm_eps=1e-5,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})


# --smoke: a 2-layer model on the CPU, the graph runner in its eager mode (code paths only, no speed).
TINY = dict(LLAMA_1B, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def random_weights(cfg: dict, dtype, device: str) -> dict:
    """Random weights under transformers' names, std 0.02 (as its initializer)."""
    hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, q),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    return {name: (torch.ones(shape, dtype=dtype, device=device) if len(shape) == 1 else
                   torch.randn(shape, dtype=dtype, device=device) * 0.02) for name, shape in shapes.items()}


def run(batches: list[int], new_tokens: int, prompt_len: int, repeats: int, *, smoke: bool = False) -> list[dict]:
    from inferforge.kernels import PagedKVCache
    from inferforge.runtime.cuda_graphs import DecodeGraphRunner
    from inferforge.runtime.engine import LLMEngine
    from inferforge.runtime.llama import LlamaModel, LlamaSpec

    torch.manual_seed(0)
    cfg, device, dtype = (TINY, "cpu", torch.float32) if smoke else (LLAMA_1B, "cuda", torch.bfloat16)
    weights = random_weights(cfg, dtype, device)
    spec = LlamaSpec.from_config(cfg)
    model = LlamaModel(spec, weights, dtype=dtype, device=device)
    hf = None
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("transformers is not installed: the transformers-static column is left out", file=sys.stderr)
    else:
        with torch.device(device):
            hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
        hf = hf.to(dtype).eval()
        hf.load_state_dict(weights, strict=False)      # the same weights (lm_head is tied to the embeddings)
    context = prompt_len + new_tokens
    rows = []
    for batch in batches:
        prompts = torch.randint(3, cfg["vocab_size"], (batch, prompt_len)).tolist()
        result = {}
        for provider in PROVIDERS:
            if provider == "transformers-static":
                if hf is None:
                    continue
                measure = lambda: _hf_decode_tps(hf, prompts, new_tokens)   # noqa: E731
            else:
                cache = PagedKVCache(num_layers=spec.num_layers, num_blocks=batch * (-(-context // 16)),
                                     n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, dtype=dtype,
                                     device=device)
                engine = LLMEngine(model, cache, max_num_seqs=batch, max_context=context,
                                   max_step_tokens=batch * prompt_len)
                if provider == "engine+cuda-graphs":
                    engine._graphs = DecodeGraphRunner(engine, mode="eager" if smoke else "graph")
                measure = lambda engine=engine: _engine_decode_tps(engine, prompts, new_tokens)   # noqa: E731
            measure()       # warm-up
            result[provider] = statistics.median(measure() for _ in range(repeats))
            print(f"batch {batch} {provider}: {result[provider]:.1f} decode tokens/s", file=sys.stderr, flush=True)
        rows.append({"batch": batch, "decode_tokens_s": result})
    return rows


def to_markdown(env: dict, rows: list[dict], args) -> str:
    lines = [f"# Decode with CUDA graphs, {env['gpu'] or 'CPU smoke run (eager padded path; not speed numbers)'}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, git {env['git_revision']}, {env['date']}.",
             f"Llama-3.2-1B-shaped random bf16 model, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
             f"median of {args.repeats}. Decode tokens/s = batch * (new_tokens - 1) / (last token - first token).", "",
             "| batch | " + " | ".join(PROVIDERS) + " | graphs / eager |", "|---" * (len(PROVIDERS) + 2) + "|"]
    for r in rows:
        t = r["decode_tokens_s"]
        lines.append(f"| {r['batch']} | " + " | ".join(f"{t[p]:.1f}" if p in t else "-" for p in PROVIDERS) +
                     f" | {t['engine+cuda-graphs'] / t['engine']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=_positive, nargs="+", default=[1], help="batch sizes (default 1)")
    parser.add_argument("--new-tokens", type=_positive, default=64, help="tokens generated per sequence (default 64)")
    parser.add_argument("--prompt-len", type=_positive, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--repeats", type=_positive, default=3, help="timed runs per provider (default 3)")
    parser.add_argument("--out", help="write the Markdown report here (and the JSON next to it)")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and print the plan; run nothing")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer model on the CPU, graphs in eager mode: the code paths, not speed")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2: decode speed is measured after the first token")
    plan = {"batches": args.batch, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
            "providers": PROVIDERS}
    if args.dry_run:
        print(plan)
        return plan
    if not torch.cuda.is_available() and not args.smoke:
        parser.error("no CUDA GPU here: this benchmark captures CUDA graphs (--dry-run checks the arguments, "
                     "--smoke runs the code paths on the CPU)")
    from inferforge.bench.kernels.common import environment, write_report

    env = environment("cpu" if args.smoke else "cuda")
    rows = run(args.batch, args.new_tokens, args.prompt_len, args.repeats, smoke=args.smoke)
    write_report(args.out, to_markdown(env, rows, args), {"environment": env, "rows": rows, **plan})
    return 0


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
