"""`inferforge bench ARTIFACT`: latency of an artifact's model against declared targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferforge.errors import UserInputError


def bench_artifact(artifact: str | Path, *, batch_sizes=(1, 8), seq_len: int = 128, warmup: int = 5,
                   iterations: int = 30, threads: int | None = None, compare_source: bool = False,
                   targets=(), percentile: str = "p95", progress=None) -> dict:
    """Time the artifact (and optionally its source PyTorch model, interleaved) at each batch size.

    `targets` is a list of (batch_size, max_ms) checked at `percentile`. Returns a report dict with
    `results`, `checks` and `passed`.
    """
    import torch

    import inferforge
    from inferforge.bench.latency import fixed_length_batch, measure_interleaved
    from inferforge.manifest import environment, utc_now
    from inferforge.progress import Progress

    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UserInputError("--batch-sizes must be integers >= 1")
    if seq_len < 1 or iterations < 3 or warmup < 0:
        raise UserInputError("--seq-len must be >= 1, --iterations >= 3 and --warmup >= 0")
    missing = sorted({b for b, _ in targets} - set(batch_sizes))
    if missing:
        raise UserInputError(f"--target names batch size {missing[0]}, which --batch-sizes does not include")
    progress = progress or Progress(quiet=True)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model = inferforge.load(artifact, threads=threads, allow_failed=True)
    name = model.manifest["runtime"]["provider"]
    if seq_len > model.max_length:
        raise UserInputError(f"--seq-len {seq_len} exceeds the artifact's max_length {model.max_length}")
    providers = {name: model}
    if compare_source:
        from inferforge.encoder import TorchEncoder

        src = Path(model.manifest["source"]["path"])
        if not (src / "config.json").is_file():
            raise UserInputError(f"--compare-source: the source model directory {src} is not on this machine")
        providers["pytorch-fp32"] = TorchEncoder(src, max_length=model.max_length)
    vocab = model.tokenizer.vocab_size
    rng = np.random.default_rng(0)
    results = []
    task = progress.task("benchmarking", total=len(batch_sizes) * iterations)
    for b in batch_sizes:
        batch = fixed_length_batch(vocab, b, seq_len, rng)
        fns = {p: (lambda e=e, batch=batch: e.hidden_states(batch)) for p, e in providers.items()}
        stats = measure_interleaved(fns, warmup=warmup, iterations=iterations, on_round=lambda i: task.advance())
        for p in providers:
            results.append({"provider": p, "batch_size": b, **stats[p],
                            "throughput_seq_s": b / stats[p]["p50_ms"] * 1e3,
                            "speedup_vs_onnx_fp32": None})
    task.close()
    rows = {(r["provider"], r["batch_size"]): r for r in results}
    checks = []
    for b, max_ms in targets:
        measured = rows[(name, b)][f"{percentile}_ms"]
        checks.append({"name": f"{name} {percentile} latency, batch {b} (ms)", "kind": "target",
                       "measured": measured, "op": "<=", "limit": max_ms, "passed": measured <= max_ms})
    return {
        "artifact": str(artifact), "created": utc_now(),
        "benchmark": {"seq_len": seq_len, "threads": threads, "warmup": warmup, "iterations": iterations,
                      "final_provider": name, "results": results},
        "checks": checks, "passed": all(c["passed"] for c in checks), "environment": environment(),
    }
