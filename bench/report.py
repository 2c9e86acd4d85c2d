"""Human-readable Markdown rendering of a run report (the JSON report holds the same numbers)."""

from __future__ import annotations

FORMULAS = (
    "Latency: wall-clock time of one synchronous forward pass over a batch of `batch_size` sequences of "
    "`seq_len` tokens, tokenization excluded; pN is the N-th percentile over the timed iterations. "
    "Throughput = batch_size / p50 latency. Speedup = p50 latency of ONNX fp32 / p50 latency of the "
    "provider, both measured interleaved in the same run. Cosine: similarity of the L2-normalized "
    "mean-pooled embeddings of the source PyTorch model and the optimized model, per held-out sentence."
)


def _ok(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def render_markdown(report: dict) -> str:
    lines = [f"# inferforge report: {report['name']}", ""]
    lines += [f"- Created: {report['created']}",
              f"- Source model: `{report['source']['model']}` (weights sha256 `{report['source']['weights_sha256'][:16]}...`)",
              f"- Artifact: `{report['artifact']}`" if report.get("artifact") else
              "- Artifact: none written (a gate or target was missed; an earlier artifact at this output is unchanged)",
              f"- Result: **{_ok(report['passed'])}**", ""]

    checks = report.get("checks", [])
    if checks:
        lines += ["## Gates and targets", "", "| check | measured | limit | result |", "|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['name']} | {c['measured']:.6g} | {c['op']} {c['limit']:.6g} | {_ok(c['passed'])} |")
        lines.append("")

    steps = report.get("steps", [])
    if steps:
        lines += ["## Steps", "", "| step | seconds | notes |", "|---|---|---|"]
        for s in steps:
            lines.append(f"| {s['name']} | {s['duration_s']:.1f} | {s.get('summary', '')} |")
        lines.append("")
    if report.get("skipped_steps"):
        lines += [f"Not run because the accuracy gate failed: {', '.join(report['skipped_steps'])}.", ""]

    val = report.get("validation")
    if val:
        lines += ["## Accuracy (held-out sentences)", "",
                  f"{val['sentences']} sentences not used for calibration. Cosine similarity with "
                  f"{(report.get('quantization') or {}).get('reference') or 'the source model'}: "
                  f"min **{val['min_cosine']:.4f}**, 1st percentile {val['p01_cosine']:.4f}, mean **{val['mean_cosine']:.4f}**.",
                  "", "Lowest-scoring sentences:", ""]
        for w in val["worst"]:
            lines.append(f"- {w['cosine']:.4f}: {w['sentence']}")
        lines.append("")

    bench = report.get("benchmark")
    if bench:
        lines += ["## Latency", "",
                  f"Sequence length {bench['seq_len']}, {bench['threads']} threads, {bench['iterations']} timed "
                  f"iterations after {bench['warmup']} warm-up, providers interleaved.", "",
                  "| provider | batch | p50 ms | p95 ms | p99 ms | seq/s | speedup vs onnx-fp32 (p50) |",
                  "|---|---|---|---|---|---|---|"]
        for r in bench["results"]:
            speed = f"{r['speedup_vs_onnx_fp32']:.2f}x" if r.get("speedup_vs_onnx_fp32") else "-"
            lines.append(f"| {r['provider']} | {r['batch_size']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['throughput_seq_s']:.1f} | {speed} |")
        lines.append("")

    env = report.get("environment", {})
    if env:
        lines += ["## Environment", ""]
        lines += [f"- {k}: {v}" for k, v in env.items()]
        lines.append("")
    lines += ["## Definitions", "", FORMULAS, ""]
    return "\n".join(lines)
