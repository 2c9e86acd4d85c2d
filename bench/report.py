"""Human-readable Markdown rendering of a run report (the JSON report holds the same numbers)."""

from __future__ import annotations

FORMULAS = (
    "Latency: wall-clock time of one synchronous forward pass over a batch of `batch_size` sequences of "
    "`seq_len` tokens, tokenization excluded; pN is the N-th percentile over the timed iterations. "
    "Throughput = batch_size / p50 latency. Speedup = p50 latency of ONNX fp32 / p50 latency of the "
    "provider, both measured interleaved in the same run. Cosine: similarity of the L2-normalized "
    "mean-pooled embeddings of the source PyTorch model and the optimized model, per held-out text; "
    "min and mean are taken per length bucket and over all texts."
)


def _ok(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def render_markdown(report: dict) -> str:
    lines = [f"# inferforge report: {report['name']}", ""]
    lines += [f"- Created: {report['created']}",
              f"- Source model: `{report['source']['model']}` (weights sha256 `{report['source']['weights_sha256'][:16]}...`)",
              f"- Artifact: `{report['artifact']}`",
              f"- Result: **{_ok(report['passed'])}**", ""]

    checks = report.get("checks", [])
    if checks:
        lines += ["## Gates and targets", "", "| check | measured | limit | result |", "|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['name']} | {c['measured']:.4g} | {c['op']} {c['limit']:.4g} | {_ok(c['passed'])} |")
        lines.append("")

    steps = report.get("steps", [])
    if steps:
        lines += ["## Steps", "", "| step | seconds | notes |", "|---|---|---|"]
        for s in steps:
            lines.append(f"| {s['name']} | {s['duration_s']:.1f} | {s.get('summary', '')} |")
        lines.append("")

    val = report.get("validation")
    if val:
        reference = (report.get("quantization") or {}).get("reference") or "the source model"
        lines += ["## Accuracy (held-out texts)", "",
                  f"{val['sentences']} texts not used for calibration. Cosine similarity with {reference}: "
                  f"min **{val['min_cosine']:.4f}**, 1st percentile {val['p01_cosine']:.4f}, mean **{val['mean_cosine']:.4f}**.", ""]
        buckets = val.get("buckets") or {}
        if buckets:
            gates = {c.get("bucket"): c for c in report.get("checks", []) if c.get("bucket") and c["name"].startswith("min")}
            lines += [f"The gate applies to each length bucket (inputs cut at {val.get('max_length', '?')} tokens): "
                      "short = the first 1-3 words of sentences, ordinary = whole sentences, long = consecutive "
                      "sentences joined up to the model's maximum length.", "",
                      "| bucket | texts | tokens | min cosine | mean cosine | 1st percentile | gate |",
                      "|---|---|---|---|---|---|---|"]
            for name, b in buckets.items():
                tokens = "-".join(str(t) for t in b.get("tokens", [])) or "-"
                gate = gates.get(name)
                verdict = f"{_ok(gate['passed'])} (>= {gate['limit']:.4g})" if gate else "-"
                lines.append(f"| {name} | {b['sentences']} | {tokens} | {b['min_cosine']:.4f} | {b['mean_cosine']:.4f} | "
                             f"{b['p01_cosine']:.4f} | {verdict} |")
            lines.append("")
        lines += ["Lowest-scoring texts:", ""]
        for w in val["worst"]:
            text = w["sentence"] if len(w["sentence"]) <= 160 else w["sentence"][:157] + "..."
            lines.append(f"- {w['cosine']:.4f}: {text}")
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
