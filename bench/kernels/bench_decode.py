"""Benchmark paged decode attention, append_kv and end-to-end decode.

    python -m inferforge.bench.kernels.bench_decode --out bench/results/decode.md   # on a GPU
    python -m inferforge.bench.kernels.bench_decode --smoke                         # CPU: code paths only

Decode attention is memory-bound: GB/s counts the K/V bytes each call must read
(2 * context * n_kv_heads * head_dim * bytes, per sequence) against the device-to-device copy
bandwidth measured in the same run (a copy reads and writes: 2 * bytes / time). Providers:
`inferforge` (split-K paged kernel), `gather+sdpa` (index the pages into a contiguous tensor, then
the fastest SDPA backend), `flex_attention` (the cache pool as one KV sequence with a paged block
mask). append_kv GB/s counts the new K/V read plus written. End to end: a
Llama-3.2-1B-shaped model with random bf16 weights, tokens/s, TTFT (prompt to first token) and
TPOT (mean time per later token) at batch 1 and 16, against transformers' generate with a static cache.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from inferforge.bench.kernels.common import environment, time_ms, write_report


def copy_bandwidth_gbs(device) -> float | None:
    if device != "cuda":
        return None
    src = torch.empty(2**28, dtype=torch.uint8, device=device)   # 256 MiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)[0]
    return 2 * src.numel() / ms / 1e6


def paged_inputs(batch, context, n_heads, n_kv, head_dim, dtype, cache_dtype, device, block_size=16):
    from inferforge.kernels.reference import quantize_for_cache

    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    k = torch.randn(num_blocks, block_size, n_kv, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    scales = None
    if cache_dtype == torch.float8_e4m3fn:
        scales = torch.full((n_kv,), 4.0 / 448, device=device)
        k = quantize_for_cache(k.reshape(-1, n_kv, head_dim), cache_dtype, scales).reshape(k.shape)
        v = quantize_for_cache(v.reshape(-1, n_kv, head_dim), cache_dtype, scales).reshape(v.shape)
    tables = torch.randperm(num_blocks, device=device).reshape(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, n_heads, head_dim, dtype=dtype, device=device)
    return q, k, v, tables, lens, scales


def flex_paged(q, k, v, tables, lens, scales, dtype, device):
    """flex_attention over the whole cache pool as one long KV sequence, with a block mask that
    keeps, for each sequence, only the slots of its own pages below its length."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        from inferforge.kernels.reference import dequantize_cache

        batch, n_heads, d = q.shape
        num_blocks, bs, n_kv, _ = k.shape
        owner = torch.full((batch, num_blocks), -1, dtype=torch.long, device=device)
        for b in range(batch):
            owner[b, tables[b].long()] = torch.arange(tables.shape[1], device=device)
        lens_l = lens.long()

        def mask_mod(b, h, q_idx, kv_idx):
            logical = owner[b, kv_idx // bs]
            return (logical >= 0) & (logical * bs + kv_idx % bs < lens_l[b])

        mask = create_block_mask(mask_mod, batch, None, 1, num_blocks * bs, device=device)
        pool_k = dequantize_cache(k, scales, dtype).permute(2, 0, 1, 3).reshape(1, n_kv, -1, d).expand(batch, -1, -1, -1)
        pool_v = dequantize_cache(v, scales, dtype).permute(2, 0, 1, 3).reshape(1, n_kv, -1, d).expand(batch, -1, -1, -1)
        run = torch.compile(flex_attention) if device == "cuda" else flex_attention
        q4 = q[:, :, None]
        run(q4, pool_k, pool_v, block_mask=mask, enable_gqa=True)
        return lambda: run(q4, pool_k, pool_v, block_mask=mask, enable_gqa=True)
    except Exception as e:  # noqa: BLE001 - a provider that cannot run is reported, not fatal
        print(f"flex_attention skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        return None


def bench_decode_attention(shapes, device, dtype, copy_gbs):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from inferforge.kernels import paged_decode_attention
    from inferforge.kernels.reference import dequantize_cache

    rows = []
    for batch, context, cache_name in shapes:
        cache_dtype = {"bf16": dtype, "fp16": dtype, "fp32": dtype, "fp8": torch.float8_e4m3fn}[cache_name]
        n_heads, n_kv, d = (32, 8, 128) if device == "cuda" else (8, 2, 64)
        q, k, v, tables, lens, scales = paged_inputs(batch, context, n_heads, n_kv, d, dtype, cache_dtype, device)
        kv_bytes = 2 * batch * context * n_kv * d * k.element_size()
        fns = {"inferforge": lambda: paged_decode_attention(q, k, v, tables, lens, k_scale=scales, v_scale=scales)}

        def gather_sdpa():
            pages = tables.long()
            kk = dequantize_cache(k, scales, dtype)[pages].reshape(batch, -1, n_kv, d)[:, :context].transpose(1, 2)
            vv = dequantize_cache(v, scales, dtype)[pages].reshape(batch, -1, n_kv, d)[:, :context].transpose(1, 2)
            return sdpa(q[:, :, None], kk, vv, enable_gqa=True)

        fns["gather+sdpa"] = gather_sdpa
        flex = flex_paged(q, k, v, tables, lens, scales, dtype, device)
        if flex is not None:
            fns["flex_attention"] = flex
        result = {}
        for name, fn in fns.items():
            ms = time_ms(fn, device)[0]
            result[name] = {"ms": ms, "gbs": kv_bytes / ms / 1e6}
        rows.append({"batch": batch, "context": context, "kv_cache": cache_name, "results": result,
                     "fraction_of_copy": result["inferforge"]["gbs"] / copy_gbs if copy_gbs else None})
        print(f"decode b{batch} ctx{context} {cache_name}: " + "  ".join(f"{n} {r['gbs']:.0f} GB/s" for n, r in result.items()),
              file=sys.stderr)
    return rows


def bench_append(device, dtype):
    from inferforge.kernels import append_kv

    n_kv, d = (8, 128) if device == "cuda" else (2, 64)
    rows = []
    for tokens in ((16, 4096) if device == "cuda" else (16,)):
        k = torch.randn(tokens, n_kv, d, dtype=dtype, device=device)
        cache = torch.empty(tokens // 16 + 1, 16, n_kv, d, dtype=dtype, device=device)
        v_cache = torch.empty_like(cache)
        slots = torch.randperm(cache.shape[0] * 16, device=device)[:tokens]
        ms = time_ms(lambda: append_kv(k, k, cache, v_cache, slots), device)[0]
        rows.append({"tokens": tokens, "ms": ms, "gbs": 4 * k.numel() * k.element_size() / ms / 1e6})
    return rows


def llama_1b_config(device):
    from transformers import LlamaConfig

    if device == "cuda":
        return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                           rope_theta=500000.0, tie_word_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def bench_end_to_end(device, dtype, prompt_len=128, new_tokens=64):
    """Tokens/s, TTFT and TPOT of the engine and of transformers (static cache), same random weights."""
    from transformers import LlamaForCausalLM

    from inferforge.kernels import PagedKVCache
    from inferforge.runtime.engine import LLMEngine
    from inferforge.runtime.llama import LlamaModel, LlamaSpec

    if device != "cuda":
        new_tokens, prompt_len = 4, 16
    torch.manual_seed(0)
    cfg = llama_1b_config(device)
    hf = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    spec = LlamaSpec.from_config(cfg.to_dict())
    model = LlamaModel(spec, dict(hf.state_dict()), dtype=dtype, device=device)
    rows = []
    for batch in (1, 16) if device == "cuda" else (1, 2):
        prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len)).tolist()
        cache = PagedKVCache(num_layers=spec.num_layers, num_blocks=batch * ((prompt_len + new_tokens) // 16 + 2),
                             n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, dtype=dtype, device=device)
        engine = LLMEngine(model, cache, max_num_seqs=batch, max_step_tokens=batch * prompt_len)

        def run_engine():
            times = []
            start = time.perf_counter()
            for _ in engine.stream(prompts, max_new_tokens=new_tokens, stop_token_ids=[]):
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return times

        def run_hf():
            ids = torch.tensor(prompts, device=device)
            start = time.perf_counter()
            with torch.no_grad():
                hf.generate(ids, max_new_tokens=1, do_sample=False, cache_implementation="static", pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            with torch.no_grad():
                hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            cache_implementation="static", pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - start
            return ttft, total

        run_engine()      # warm-up: autotuning and compilation
        times = run_engine()
        first = times[batch - 1]                       # every sequence's first token comes in the first decode step
        tpot = (times[-1] - first) / (new_tokens - 1)
        run_hf()
        hf_ttft, hf_total = run_hf()
        rows.append({"batch": batch, "engine_tokens_s": batch * new_tokens / times[-1], "engine_ttft_ms": first * 1e3,
                     "engine_tpot_ms": tpot * 1e3, "hf_tokens_s": batch * new_tokens / hf_total,
                     "hf_ttft_ms": hf_ttft * 1e3, "hf_tpot_ms": (hf_total - hf_ttft) / (new_tokens - 1) * 1e3})
        print(f"e2e batch {batch}: engine {rows[-1]['engine_tokens_s']:.0f} tok/s, transformers "
              f"{rows[-1]['hf_tokens_s']:.0f} tok/s", file=sys.stderr)
    return rows


def to_markdown(report) -> str:
    env = report["environment"]
    gpu = env["device"] == "cuda"
    lines = [f"# Decode benchmarks, {env['gpu'] or env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, git {env['git_revision']}, {env['date']}.",
             "" if gpu else "CPU smoke run in Triton's interpreter: the numbers are not performance numbers.", ""]
    if report["copy_gbs"]:
        lines += [f"Device-to-device copy bandwidth measured in this run: {report['copy_gbs']:.0f} GB/s.", ""]
    lines += ["## Paged decode attention (GB/s of K/V read)", "",
              "| batch | context | KV cache | inferforge | gather+sdpa | flex_attention | inferforge / copy |",
              "|---|---|---|---|---|---|---|"]
    for r in report["decode"]:
        frac = f"{r['fraction_of_copy']:.0%}" if r["fraction_of_copy"] else "-"
        cells = [f"{r['results'][n]['gbs']:.3g}" if n in r["results"] else "-"
                 for n in ("inferforge", "gather+sdpa", "flex_attention")]
        lines.append(f"| {r['batch']} | {r['context']} | {r['kv_cache']} | " + " | ".join(cells) + f" | {frac} |")
    lines += ["", "## append_kv", "", "| tokens | GB/s |", "|---|---|"]
    lines += [f"| {r['tokens']} | {r['gbs']:.3g} |" for r in report["append"]]
    lines += ["", "## End-to-end decode (TTFT: prompt to first token; TPOT: mean time per later token)", "",
              "| batch | engine tok/s | engine TTFT ms | engine TPOT ms | transformers tok/s | transformers TTFT ms | "
              "transformers TPOT ms | speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in report["end_to_end"]:
        lines.append(f"| {r['batch']} | {r['engine_tokens_s']:.1f} | {r['engine_ttft_ms']:.1f} | {r['engine_tpot_ms']:.2f} | "
                     f"{r['hf_tokens_s']:.1f} | {r['hf_ttft_ms']:.1f} | {r['hf_tpot_ms']:.2f} | "
                     f"{r['engine_tokens_s'] / r['hf_tokens_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the Markdown report here (and the JSON next to it)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--skip-e2e", action="store_true", help="kernels only")
    args = parser.parse_args(argv)
    if args.smoke:
        device, dtype = "cpu", torch.float32
        shapes = [(2, 64, "fp32")]
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run with --smoke to exercise the harness on the CPU")
        device, dtype = "cuda", torch.bfloat16
        batches, contexts = ((1, 16, 64), (512, 4096, 32768)) if args.quick else ((1, 4, 16, 64), (512, 2048, 4096, 8192, 32768))
        shapes = [(b, c, kv) for kv in ("bf16", "fp8") for b in batches for c in contexts if b * c <= 64 * 32768]
    report = {"environment": environment(device), "copy_gbs": copy_bandwidth_gbs(device),
              "decode": bench_decode_attention(shapes, device, dtype, None), "append": bench_append(device, dtype),
              "end_to_end": [] if args.skip_e2e else bench_end_to_end(device, dtype)}
    for r in report["decode"]:
        r["fraction_of_copy"] = r["results"]["inferforge"]["gbs"] / report["copy_gbs"] if report["copy_gbs"] else None
    write_report(args.out, to_markdown(report), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
