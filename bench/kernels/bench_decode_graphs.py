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


def _engine_decode_tps(engine, prompts, new_tokens: int) -> float:
    stamps = []
    for _ in engine.stream(prompts, max_new_tokens=new_tokens, stop_token_ids=[]):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    batch = len(prompts)
    # Tokens arrive batch by batch: the first `batch` are the first tokens, the last one ends the run.
    return batch * (new_tokens - 1) / (stamps[-1] - stamps[batch - 1])


def _hf_decode_tps(hf, prompts, new_tokens: int) -> float:
    ids = torch.tensor(prompts, device="cuda")

    def timed(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static",
                        pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    first, total = timed(1), timed(new_tokens)
    return len(prompts) * (new_tokens - 1) / (total - first)


def run(batches: list[int], new_tokens: int, prompt_len: int, repeats: int) -> list[dict]:
    from transformers import LlamaForCausalLM

    from inferforge.bench.kernels.bench_decode import llama_1b_config
    from inferforge.kernels import PagedKVCache
    from inferforge.runtime.cuda_graphs import DecodeGraphRunner
    from inferforge.runtime.engine import LLMEngine
    from inferforge.runtime.llama import LlamaModel, LlamaSpec

    torch.manual_seed(0)
    cfg = llama_1b_config("cuda")
    with torch.device("cuda"):
        hf = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    spec = LlamaSpec.from_config(cfg.to_dict())
    model = LlamaModel(spec, dict(hf.state_dict()), dtype=torch.bfloat16, device="cuda")
    context = prompt_len + new_tokens
    rows = []
    for batch in batches:
        prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len)).tolist()
        result = {}
        for provider in PROVIDERS:
            if provider == "transformers-static":
                measure = lambda: _hf_decode_tps(hf, prompts, new_tokens)   # noqa: E731
            else:
                cache = PagedKVCache(num_layers=spec.num_layers, num_blocks=batch * (-(-context // 16)),
                                     n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, dtype=torch.bfloat16,
                                     device="cuda")
                engine = LLMEngine(model, cache, max_num_seqs=batch, max_context=context,
                                   max_step_tokens=batch * prompt_len)
                if provider == "engine+cuda-graphs":
                    engine._graphs = DecodeGraphRunner(engine, mode="graph")
                measure = lambda engine=engine: _engine_decode_tps(engine, prompts, new_tokens)   # noqa: E731
            measure()       # warm-up
            result[provider] = statistics.median(measure() for _ in range(repeats))
            print(f"batch {batch} {provider}: {result[provider]:.1f} decode tokens/s", file=sys.stderr, flush=True)
        rows.append({"batch": batch, "decode_tokens_s": result})
    return rows


def to_markdown(env: dict, rows: list[dict], args) -> str:
    lines = [f"# Decode with CUDA graphs, {env['gpu']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, git {env['git_revision']}, {env['date']}.",
             f"Llama-3.2-1B-shaped random bf16 model, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
             f"median of {args.repeats}. Decode tokens/s = batch * (new_tokens - 1) / (last token - first token).", "",
             "| batch | " + " | ".join(PROVIDERS) + " | graphs / eager |", "|---" * (len(PROVIDERS) + 2) + "|"]
    for r in rows:
        t = r["decode_tokens_s"]
        lines.append(f"| {r['batch']} | " + " | ".join(f"{t[p]:.1f}" for p in PROVIDERS) +
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
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2: decode speed is measured after the first token")
    plan = {"batches": args.batch, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
            "providers": PROVIDERS}
    if args.dry_run:
        print(plan)
        return plan
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU here: this benchmark captures CUDA graphs (use --dry-run to check arguments)")
    from inferforge.bench.kernels.common import environment, write_report

    env = environment("cuda")
    rows = run(args.batch, args.new_tokens, args.prompt_len, args.repeats)
    write_report(args.out, to_markdown(env, rows, args), {"environment": env, "rows": rows, **plan})
    return 0


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
