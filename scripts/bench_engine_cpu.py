"""LLMEngine against transformers' `generate` on the CPU, interleaved in one process.

Builds a seeded random Llama (hidden 1024, 16 layers, 16 query / 4 KV heads, MLP 2816, vocab 32000;
about 240M parameters) from a transformers `LlamaConfig`, saves it as safetensors in a temporary
directory, and times greedy fp32 generation of exactly `--new-tokens` tokens per prompt (no EOS
stop: `min_new_tokens` for transformers, `stop_token_ids=[]` for the engine) for three cases:
batch 1, batch 8 with equal prompt lengths, and batch 8 with varied prompt lengths (transformers
left-pads them to the longest; the engine batches them continuously over its paged cache).

Each repetition runs every case once per implementation, alternating which goes first, so both
see the same machine load, on prompts drawn afresh for that repetition (the same for both): a
repeated prompt would let the engine's prefix cache skip part of its prefill, which transformers
cannot do; the table reports the median tokens/s over repetitions (with min and
max) and the ratio of medians. tokens/s = prompts * new_tokens / wall seconds of one `generate`
call (prefill included).

With batch 1 in the cases, each repetition also times two 1-row passes over every linear weight:
`F.linear` on transformers' weights (the rate its batch-1 step reads them at) and the engine's own
projections in the layout it measured and chose at load (`engine.cpu_linears`, runtime/cpu_linear.py,
recorded in the JSON). Each side's tokens/s is reported as a share of its own floor.

    python scripts/bench_engine_cpu.py --threads 2 --reps 3 --out engine_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

MODEL_SHAPE = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                   intermediate_size=2816, vocab_size=32000)


def build_model(directory: Path, seed: int = 0) -> int:
    """Save a random Llama (safetensors) to `directory`; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**MODEL_SHAPE, initializer_range=0.05, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def make_cases(prompt_len: int, seed: int) -> dict[str, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def prompt(n):
        return torch.randint(3, MODEL_SHAPE["vocab_size"], (n,), generator=g).tolist()

    varied = [8, 16, 24, 32, 48, 64, 96, 128]
    return {"batch 1": [prompt(prompt_len)], "batch 8": [prompt(prompt_len) for _ in range(8)],
            "batch 8 varied": [prompt(n) for n in varied]}


def run_engine(engine, prompts, new_tokens):
    return engine.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[])


def run_transformers(model, prompts, new_tokens):
    """Left-padded batch, greedy, exactly `new_tokens` per row; returns the new tokens per prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


def _median_pass_seconds(calls, passes: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(passes + 2):
            start = time.perf_counter()
            for call in calls:
                call()
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def streaming_floor_seconds(model, passes: int = 16) -> tuple[float, int]:
    """(median seconds, bytes) of one pass of 1-row `F.linear` calls over every linear weight of the
    transformers `model` (the LM head included): what its batch-1 decode step cannot go below when
    reading the weights at that rate bounds it."""
    import torch.nn.functional as F

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    calls = [lambda w=w: F.linear(inputs[w.shape[1]], w) for w in weights]
    return _median_pass_seconds(calls, passes), sum(w.numel() * w.element_size() for w in weights)


def engine_linears_seconds(model, passes: int = 16) -> tuple[float, int]:
    """The same for the engine's own projections and LM head (`runtime/llama.py`), in the layout the
    engine chose at load (`engine.cpu_linears`): its batch-1 floor."""
    from inferforge.runtime.llama import LAYER_PROJECTIONS, _linear

    ops = [layer[name] for layer in model.layers for name in LAYER_PROJECTIONS] + [model.lm_head]
    sizes = [(op.shape[1], op.numel() * op.element_size()) if isinstance(op, torch.Tensor)
             else (op.in_features, op.packed_bytes) for op in ops]
    inputs = {k: torch.randn(1, k, dtype=model.dtype) for k, _ in sizes}
    calls = [lambda op=op, k=k: _linear(inputs[k], op) for op, (k, _) in zip(ops, sizes)]
    return _median_pass_seconds(calls, passes), sum(b for _, b in sizes)


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per case and implementation")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt length of the equal-length cases")
    parser.add_argument("--cases", nargs="+", default=None, choices=["batch 1", "batch 8", "batch 8 varied"],
                        help="a subset of the cases (default: all three)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.new_tokens < 1:
        parser.error("--reps and --new-tokens must be at least 1")

    from transformers import AutoModelForCausalLM

    from inferforge.runtime.engine import LLMEngine

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        params = build_model(Path(tmp), args.seed)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        engine = LLMEngine.from_pretrained(tmp, dtype=torch.float32, device="cpu", max_num_seqs=8,
                                           max_context=256 + args.new_tokens)
    cases = make_cases(args.prompt_len, args.seed)
    cases = {name: cases[name] for name in args.cases or cases}
    runners = {"engine": lambda p: run_engine(engine, p, args.new_tokens),
               "transformers": lambda p: run_transformers(hf, p, args.new_tokens)}
    # Warm-up (allocator, thread pools), and the greedy tokens of both for the record.
    same = {}
    for name, prompts in cases.items():
        same[name] = runners["engine"](prompts) == runners["transformers"](prompts)
    times = {name: {impl: [] for impl in runners} for name in cases}
    floors, engine_floors, weight_bytes, engine_bytes = [], [], 0, 0
    for rep in range(args.reps):
        if "batch 1" in cases:   # interleaved with the runs, so they see the same machine load
            seconds, weight_bytes = streaming_floor_seconds(hf)
            floors.append(seconds)
            seconds, engine_bytes = engine_linears_seconds(engine.model)
            engine_floors.append(seconds)
        fresh = make_cases(args.prompt_len, args.seed + 1 + rep)
        for name in cases:
            prompts = fresh[name]
            order = list(runners) if rep % 2 == 0 else list(runners)[::-1]
            for impl in order:
                start = time.perf_counter()
                runners[impl](prompts)
                times[name][impl].append(time.perf_counter() - start)
            print(f"rep {rep + 1}/{args.reps} {name}: " + ", ".join(
                f"{impl} {times[name][impl][-1]:.2f}s" for impl in runners), file=sys.stderr, flush=True)

    rows = []
    for name, prompts in cases.items():
        tokens = len(prompts) * args.new_tokens
        rates = {impl: [tokens / t for t in times[name][impl]] for impl in runners}
        med = {impl: statistics.median(r) for impl, r in rates.items()}
        rows.append(dict(case=name, prompts=len(prompts), prompt_lens=[len(p) for p in prompts],
                         new_tokens=args.new_tokens, tokens_per_s={impl: dict(median=med[impl], min=min(r), max=max(r),
                                                                              all=r) for impl, r in rates.items()},
                         ratio=med["engine"] / med["transformers"],
                         ratios_per_rep=[e / t for e, t in zip(rates["engine"], rates["transformers"])],
                         greedy_tokens_identical=same[name]))
        if name == "batch 1" and floors:
            floor, own = 1.0 / statistics.median(floors), 1.0 / statistics.median(engine_floors)
            rows[-1]["weight_streaming_floor"] = dict(
                tokens_per_s=floor, weight_bytes=weight_bytes, read_gb_per_s=weight_bytes * floor / 1e9,
                engine_linears=dict(tokens_per_s=own, weight_bytes=engine_bytes, read_gb_per_s=engine_bytes * own / 1e9),
                share={"engine": med["engine"] / own, "transformers": med["transformers"] / floor})
    import transformers

    cpu_linears = {k: v for k, v in (engine.cpu_linears or {}).items() if k != "extra_bytes"}
    meta = dict(model=dict(**MODEL_SHAPE, parameters=params, dtype="float32"), threads=args.threads,
                engine_cpu_linears=cpu_linears,
                nproc=os.cpu_count(), cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                transformers=transformers.__version__, git=git_revision(), reps=args.reps,
                timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    print(f"model: {params / 1e6:.0f}M params {MODEL_SHAPE}, fp32; threads {args.threads}, nproc {os.cpu_count()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, git {meta['git']}")
    print(f"{'case':<16}{'engine tok/s':>22}{'transformers tok/s':>24}{'ratio':>8}{'per-rep ratios':>22}  same tokens")
    for r in rows:
        e, t = r["tokens_per_s"]["engine"], r["tokens_per_s"]["transformers"]
        span = lambda s: f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"  # noqa: E731
        print(f"{r['case']:<16}{span(e):>22}{span(t):>24}{r['ratio']:>7.2f}x"
              f"  {' '.join(f'{x:.2f}' for x in r['ratios_per_rep']):>20}  {r['greedy_tokens_identical']}")
    for r in rows:
        if "weight_streaming_floor" in r:
            f = r["weight_streaming_floor"]
            e = f["engine_linears"]
            print(f"batch 1 weight-streaming floors, 1-row passes over every linear weight: F.linear (transformers' "
                  f"matmuls) {f['tokens_per_s']:.1f} tok/s ({f['weight_bytes'] / 1e6:.0f} MB at {f['read_gb_per_s']:.1f} "
                  f"GB/s), the engine's own linears ({cpu_linears.get('layout')}) {e['tokens_per_s']:.1f} tok/s "
                  f"({e['read_gb_per_s']:.1f} GB/s); engine at {f['share']['engine']:.0%} of its floor, transformers "
                  f"at {f['share']['transformers']:.0%} of F.linear's")
    if args.out:
        from inferforge.fileio import atomic_write_json

        atomic_write_json(args.out, dict(meta=meta, results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
