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
        distilled = val.get("distillation_held_out")
        if distilled:
            gated = any(v is not None for v in distilled["gate"].values())
            lines += [f"On the distillation's own held-out split ({distilled['sentences']} texts the student never "
                      f"trained on): min **{distilled['min_cosine']:.4f}**, 1st percentile "
                      f"{distilled['p01_cosine']:.4f}, mean **{distilled['mean_cosine']:.4f}**; "
                      + ("the distill step's gate applies to it." if gated else "the distill step sets no gate."), ""]
        lines += ["Lowest-scoring texts:", ""]
        for w in val["worst"]:
            text = w["sentence"] if len(w["sentence"]) <= 160 else w["sentence"][:157] + "..."
            lines.append(f"- {w['cosine']:.4f}: {text}")
        lines.append("")

    bench = report.get("benchmark")
    if bench:
        teacher = any("speedup_vs_teacher_onnx_fp32" in r for r in bench["results"])
        lines += ["## Latency", "",
                  f"Sequence length {bench['seq_len']}, {bench['threads']} threads, {bench['iterations']} timed "
                  f"iterations after {bench['warmup']} warm-up, providers interleaved.", "",
                  "| provider | batch | p50 ms | p95 ms | p99 ms | seq/s | speedup vs onnx-fp32 (p50) |"
                  + (" vs the teacher's onnx-fp32 |" if teacher else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if teacher else "")]
        for r in bench["results"]:
            speed = f"{r['speedup_vs_onnx_fp32']:.2f}x" if r.get("speedup_vs_onnx_fp32") else "-"
            lines.append(f"| {r['provider']} | {r['batch_size']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['throughput_seq_s']:.1f} | {speed} |"
                         + (f" {r['speedup_vs_teacher_onnx_fp32']:.2f}x |" if teacher else ""))
        lines.append("")

    env = report.get("environment", {})
    if env:
        lines += ["## Environment", ""]
        lines += [f"- {k}: {v}" for k, v in env.items()]
        lines.append("")
    lines += ["## Definitions", "", FORMULAS, ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Causal LMs: quantized artifacts (`quantize --config`) and the engine benchmark (`bench` on them).

LM_FORMULAS = (
    "On the held-out token sequences (never used for calibration), with logits of the original and the "
    "quantized model at every position: perplexity = exp(mean next-token cross-entropy); perplexity "
    "increase = ppl(quantized) / ppl(original) - 1; top-1 agreement = share of positions where both "
    "models' argmax agree; KL = mean KL(original || quantized) of the next-token distributions. Layers "
    "kept in float = layers skipped by pattern + layers restored by auto-skip; a run fails when they "
    "exceed max_float_share of the model's linear layers. Weight SQNR = 10 log10(|W|^2 / |W - W_q|^2)."
)


def _limit(c: dict) -> str:
    return f"{c['op']} {c['limit']:.4g}"


def render_causal_lm_markdown(report: dict) -> str:
    """report.md of a quantized causal-LM artifact: what was quantized, what stayed in float, the
    held-out metrics against the gate (or that the gate was off), the data hashes, the environment."""
    q, gate = report["quantization"], report["gate"]
    lines = [f"# inferforge report: {report['name']}", "",
             f"- Created: {report['created']}",
             f"- Source model: `{report['source']['model']}` (weights sha256 `{report['source']['weights_sha256'][:16]}...`)",
             f"- Artifact: `{report['artifact']}` (kind {report['kind']}, format **{q['format']}**; "
             "`inferforge.load` returns an `LLMEngine` running the quantized layers on inferforge's kernels)",
             f"- Result: **{_ok(report['passed'])}**", ""]
    lines += ["## Gate", ""]
    if gate["enabled"]:
        limits = ", ".join(f"{k} {v:.4g}" for k, v in gate["limits"].items() if v is not None)
        lines.append(f"On: {gate['note']} ({limits}).")
    else:
        lines.append(f"**Off**: {gate['note']}.")
    defaults = gate["default_limits"]
    lines += [f"Default for {q['format']}: perplexity increase <= {defaults['max_ppl_increase']:.0%}, top-1 agreement "
              f">= {defaults['min_top1_agreement']:.0%}.", "",
              "| check | measured | limit | result |", "|---|---|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {c['measured']:.4g} | {_limit(c)} | {_ok(c['passed'])} |")
    lines.append("")
    val = report.get("validation")
    lines += ["## Held-out comparison with the original", ""]
    if val:
        lines += [f"{val['tokens']} predicted tokens: perplexity {val['ppl_original']:.4f} -> {val['ppl_quantized']:.4f} "
                  f"(**{val['ppl_increase']:+.2%}**), top-1 agreement **{val['top1_agreement']:.2%}**, "
                  f"KL {val['kl']:.5f} per token.", ""]
    else:
        lines += ["Not measured (no held-out text).", ""]
    lines += ["## Layers", "",
              f"{q['layers_quantized']} of {q['layers_total']} linear layers quantized; "
              f"{len(q['skipped']) + len(q['auto_skipped'])} kept in float ({q['float_share']:.0%}, at most "
              f"{q['max_float_share']:.0%} allowed).", ""]
    lines.append(f"- Skipped by pattern: {', '.join(q['skipped']) or 'none'}")
    lines.append(f"- Kept in float by auto-skip (lowest SQNR first): {', '.join(q['auto_skipped']) or 'none'}")
    if q["worst_layers"]:
        lines.append("- Lowest weight SQNR: " + ", ".join(f"{w['layer']} {w['sqnr_db']:.1f} dB" for w in q["worst_layers"]))
    lines.append("")
    data = q.get("data")
    lines += ["## Data", ""]
    if data:
        lines += [f"- File: `{data['file']}`, sequences of {data['seq_len']} tokens: {data['calibration_sequences']} "
                  f"for calibration, {data['held_out_sequences']} held out",
                  f"- Calibration tokens sha256: `{data['calibration_sha256']}`",
                  f"- Held-out tokens sha256: `{data['held_out_sha256']}`", ""]
    else:
        lines += ["No calibration or held-out text was given.", ""]
    env = report.get("environment", {})
    if env:
        lines += ["## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()] + [""]
    lines += ["## Definitions", "", LM_FORMULAS, ""]
    return "\n".join(lines)
