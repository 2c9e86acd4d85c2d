"""Shared pieces of the kernel benchmarks: timing, the environment stamp, writing the report."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path

import torch


def time_ms(fn, device, *, graph: bool = False) -> tuple[float, float, float]:
    """Median, p20 and p80 in milliseconds: CUDA events via triton's do_bench on a GPU (with `graph`,
    replays of a captured CUDA graph, which leaves out the host's launch overhead), perf_counter elsewhere."""
    if device == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        if graph:
            return tuple(do_bench_cudagraph(fn, rep=50, quantiles=[0.5, 0.2, 0.8]))
        return tuple(do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    import time

    fn()
    samples = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    samples.sort()
    return samples[1], samples[0], samples[2]


def environment(device) -> dict:
    import triton

    from inferforge.manifest import git_revision

    return {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "device": device,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "git_revision": git_revision(),
            "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}


def write_report(out: str | None, markdown: str, report: dict) -> None:
    """Print the Markdown; with `out`, also write it there and the JSON next to it (atomically)."""
    if out:
        from inferforge.fileio import atomic_write_json, atomic_write_text

        atomic_write_text(out, markdown)
        atomic_write_json(Path(out).with_suffix(".json"), report)
    print(markdown)
