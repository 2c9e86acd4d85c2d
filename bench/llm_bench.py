"""`inferforge bench ARTIFACT` for causal-LM artifacts: generation latency of the engine.

For each batch size B, every iteration submits B prompts of `prompt_len` random token ids (fresh
ones each iteration, so no prefix-cache hits) at once to one `LLMEngine` (the object
`inferforge.load` returns: quantized layers on inferforge's kernels) with B sequence slots and a
step budget that prefills the whole batch in one step, and generates exactly `output_len` tokens
per request (stop tokens ignored). Times are wall clock from the moment the batch is submitted:
    TTFT       = time until the request's first output token
    TPOT       = (time of its last token - time of its first token) / (output_len - 1): the first
                 token is excluded (TTFT covers it)
    E2E        = time until the request's last token
    tokens/s   = B * output_len / (time until the batch's last token), per iteration
pN is numpy's percentile (linear interpolation) over every request of every timed iteration (for
tokens/s: over the iterations). `warmup` untimed iterations run first at each batch size.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from inferforge.errors import UserInputError

LLM_KINDS = ("causal-lm", "quantized-causal-lm")
METRICS = {"ttft": "time to first token", "tpot": "time per output token after the first",
           "e2e": "end-to-end request latency"}
DEFINITIONS = (
    "TTFT: time from submitting the batch until a request's first output token. TPOT: (time of a request's "
    "last token - time of its first token) / (output_len - 1), the first token excluded. E2E: time from "
    "submitting the batch until a request's last token. tokens/s: batch_size * output_len / time until the "
    "batch's last token. pN: numpy percentile over all requests of all timed iterations (tokens/s: over "
    "iterations). Prompts: random token ids, fresh each iteration; the batch's prefill runs in one engine step."
)


def _quantiles(samples) -> dict:
    a = np.asarray(samples, dtype=np.float64)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)} | {"mean": float(a.mean())}


def _run_once(engine, prompts, output_len: int) -> tuple[list[float], list[float], list[float], float]:
    """One batch: per request TTFT, TPOT and E2E in ms, and the batch's tokens/s."""
    first, last = {}, {}
    start = time.perf_counter()
    for index, _token in engine.stream(prompts, max_new_tokens=output_len, stop_token_ids=[]):
        now = time.perf_counter()
        first.setdefault(index, now)
        last[index] = now
    end = max(last.values())
    ttft = [(first[i] - start) * 1e3 for i in range(len(prompts))]
    tpot = [(last[i] - first[i]) * 1e3 / (output_len - 1) for i in range(len(prompts))]
    e2e = [(last[i] - start) * 1e3 for i in range(len(prompts))]
    return ttft, tpot, e2e, len(prompts) * output_len / (end - start)


def bench_llm(artifact: str | Path, *, batch_sizes=(1, 8), prompt_len: int = 128, output_len: int = 64,
              warmup: int = 1, iterations: int = 10, targets=(), metric: str = "tpot", percentile: str = "p95",
              threads: int | None = None, progress=None, **engine_kwargs) -> dict:
    """Measure a causal-LM artifact with the engine; see the module docstring for the definitions.

    `targets` are (batch_size, max_ms) checked on `metric` (ttft, tpot or e2e) at `percentile`.
    Returns a report dict with `llm_benchmark`, `checks` and `passed`."""
    import inferforge
    from inferforge.manifest import environment, utc_now
    from inferforge.progress import Progress

    if metric not in METRICS:
        raise UserInputError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UserInputError("--batch-sizes must be integers >= 1")
    if prompt_len < 1 or output_len < 2 or iterations < 1 or warmup < 0:
        raise UserInputError("--seq-len (the prompt length) must be >= 1, --output-len >= 2 (TPOT needs two tokens), "
                             "--iterations >= 1 and --warmup >= 0")
    missing = sorted({b for b, _ in targets} - set(batch_sizes))
    if missing:
        raise UserInputError(f"--target names batch size {missing[0]}, which --batch-sizes does not include")
    progress = progress or Progress(quiet=True)
    if threads:
        torch.set_num_threads(threads)
    largest = max(batch_sizes)
    engine = inferforge.load(artifact, max_num_seqs=largest, max_context=prompt_len + output_len,
                             max_step_tokens=largest * prompt_len, **engine_kwargs)
    window = engine.model.spec.max_position_embeddings
    if prompt_len + output_len > window:
        raise UserInputError(f"--seq-len {prompt_len} + --output-len {output_len} exceeds the model's context window "
                             f"({window} tokens); lower them")
    vocab = engine.model.spec.vocab_size
    low = 3 if vocab > 3 else 0
    rng = np.random.default_rng(0)
    results = []
    task = progress.task("benchmarking generation", total=len(batch_sizes) * (warmup + iterations))
    for b in batch_sizes:
        ttft, tpot, e2e, rate = [], [], [], []
        for i in range(warmup + iterations):
            prompts = rng.integers(low, vocab, (b, prompt_len)).tolist()
            sample = _run_once(engine, prompts, output_len)
            task.advance()
            if i >= warmup:
                ttft += sample[0]
                tpot += sample[1]
                e2e += sample[2]
                rate.append(sample[3])
        results.append({"batch_size": b, "requests": len(ttft), "ttft_ms": _quantiles(ttft),
                        "tpot_ms": _quantiles(tpot), "e2e_ms": _quantiles(e2e), "tokens_per_s": _quantiles(rate)})
    task.close()
    rows = {r["batch_size"]: r for r in results}
    checks = []
    for b, max_ms in targets:
        measured = rows[b][f"{metric}_ms"][percentile]
        checks.append({"name": f"{metric.upper()} {percentile}, batch {b} (ms)", "kind": "target",
                       "measured": measured, "op": "<=", "limit": max_ms, "passed": measured <= max_ms})
    manifest = engine.manifest
    return {
        "artifact": Path(artifact).name, "created": utc_now(), "kind": "llm-benchmark",
        "model": {"kind": manifest["kind"], "format": manifest.get("runtime", {}).get("format", "float"),
                  "dtype": str(engine.model.dtype).removeprefix("torch."), "device": str(engine.model.device)},
        "llm_benchmark": {"prompt_len": prompt_len, "output_len": output_len, "warmup": warmup,
                          "iterations": iterations, "threads": torch.get_num_threads(), "target_metric": metric,
                          "target_percentile": percentile,
                          "results": results, "definitions": DEFINITIONS},
        "checks": checks, "passed": all(c["passed"] for c in checks), "environment": environment(),
    }


def render_llm_bench(report: dict) -> None:
    """Print the benchmark table (rich) and the definitions."""
    from rich.console import Console
    from rich.table import Table

    bench, model = report["llm_benchmark"], report["model"]
    table = Table(title=f"{report['artifact']} ({model['format']}, {model['dtype']} on {model['device']}): prompt "
                        f"{bench['prompt_len']} tokens, {bench['output_len']} generated, {bench['iterations']} iterations")
    for col in ("batch", "TTFT p50/p90/p95/p99 ms", "TPOT p50/p90/p95/p99 ms", "E2E p50/p99 ms", "tokens/s p50"):
        table.add_column(col, justify="right")
    for r in bench["results"]:
        def four(d):
            return " / ".join(f"{d[p]:.1f}" for p in ("p50", "p90", "p95", "p99"))
        table.add_row(str(r["batch_size"]), four(r["ttft_ms"]), four(r["tpot_ms"]),
                      f"{r['e2e_ms']['p50']:.1f} / {r['e2e_ms']['p99']:.1f}", f"{r['tokens_per_s']['p50']:.1f}")
    console = Console()
    console.print(table)
    console.print(bench["definitions"])
