"""The student as an artifact: a Hugging Face model directory that is also an inferforge artifact.

    OUT/config.json, model.safetensors      the student (save_pretrained)
    OUT/tokenizer files                     the teacher's (teacher and student share the vocabulary)
    OUT/metrics.jsonl                       one JSON row per training step and per evaluation
    OUT/loss_curve.svg, report.md, report.json
    OUT/manifest.json                       kind "distilled-encoder" or "distilled-causal-lm"

So `inferforge export OUT`, `inferforge quantize OUT` (model directories) and `inferforge.load(OUT)`
(an artifact: a PyTorch sentence encoder, or the `LLMEngine` for a causal LM) all take it. The
gate (`DistillConfig.min_*` / `max_kl`) decides whether it is written: a missed gate writes the
reports to `OUT.failed/` and raises `GateFailed`; the checkpoints stay, so the run can be resumed
with more steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from inferforge.errors import GateFailed
from inferforge.fileio import make_public_file

KINDS = {"encoder": "distilled-encoder", "decoder": "distilled-causal-lm"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")
# sentence-transformers' description of the pipeline (mean pooling); the student keeps the teacher's.
SENTENCE_TRANSFORMERS_FILES = ("sentence_bert_config.json", "modules.json", "config_sentence_transformers.json",
                               "1_Pooling/config.json")


def gate_checks(result) -> list[dict]:
    """The configured gates against the final held-out metrics, each with `passed`."""
    c, m = result.config, result.metrics
    limits = ([("mean cosine to the teacher (held-out)", "mean_cosine", ">=", c.min_mean_cosine),
               ("min cosine to the teacher (held-out)", "min_cosine", ">=", c.min_cosine)]
              if result.kind == "encoder" else
              [("top-1 agreement with the teacher (held-out)", "top1_agreement", ">=", c.min_top1_agreement),
               ("KL(teacher || student) per token (held-out)", "kl", "<=", c.max_kl)])
    checks = []
    for name, key, op, limit in limits:
        if limit is None:
            continue
        measured = m[key]
        checks.append({"name": name, "kind": "gate", "measured": measured, "op": op, "limit": limit,
                       "passed": measured >= limit if op == ">=" else measured <= limit})
    return checks


def loss_curve_svg(history: list[dict]) -> str:
    from inferforge.bench.svg_plots import Chart, Series, render_chart

    steps = [r for r in history if "loss" in r]
    chart = Chart(title="distillation loss (training batches)", x_label="step", y_label="loss", y_min=0.0)
    chart.series.append(Series("loss", [r["step"] for r in steps], [r["loss"] for r in steps]))
    evals = [r for r in history if r.get("eval")]
    key = "mean_cosine" if evals and "mean_cosine" in evals[0]["eval"] else "top1_agreement"
    if evals:
        chart.series.append(Series(f"held-out {key.replace('_', ' ')}", [r["step"] for r in evals],
                                   [r["eval"][key] for r in evals], line=True, markers=True))
    return render_chart(chart, "distill-loss")


def render_report(report: dict) -> str:
    m, lines = report["metrics"], [f"# {report['name']}: distilled student", ""]
    lines += [f"Teacher `{report['teacher']['model']}` (weights sha256 `{report['teacher']['weights_sha256'][:16]}...`) "
              f"-> {report['student']['num_layers']}-layer student (teacher layers {report['student']['layer_map']}, "
              f"width {report['student']['hidden_size']}, init: {report['student']['init']}).", "",
              f"Trained {report['step']} steps in {report['train_seconds']:.1f} s, stopped by: {report['stopped']}; "
              f"{report['data']['train_texts']} training texts, {report['data']['held_out_texts']} held out "
              "(never trained on).", "", "## Held-out metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.4f} |" if isinstance(v, float) else f"| {k.replace('_', ' ')} | {v} |"
              for k, v in m.items() if v is not None]
    if report["checks"]:
        lines += ["", "## Gate", "", "| check | measured | limit | result |", "|---|---|---|---|"]
        lines += [f"| {c['name']} | {c['measured']:.4f} | {c['op']} {c['limit']} | {'PASS' if c['passed'] else 'FAIL'} |"
                  for c in report["checks"]]
    lines += ["", "## Loss curve", "", "![loss curve](loss_curve.svg)" if report["passed"] else
              "(the curve is in the checkpoint's state.json history; no artifact was written)", "",
              "Metric definitions: cosine of the mean-pooled (attention-masked) embeddings; retrieval agreement = "
              "share of held-out texts whose nearest other held-out text is the teacher's; top-1 agreement = share "
              "of held-out positions with the teacher's most likely next token; KL at temperature 1.", ""]
    return "\n".join(lines)


def write_student_artifact(result, out: str | Path, *, name: str | None = None, extra_manifest: dict | None = None,
                           progress=None) -> dict:
    """Write the artifact (see the module docstring); returns the manifest. Raises `GateFailed` (and
    writes `OUT.failed/`) when a gate is missed. Call on rank 0 only."""
    from inferforge.manifest import (
        environment,
        staged_artifact,
        utc_now,
        write_failed_report,
        write_manifest,
    )

    out = Path(out).resolve()
    checks = gate_checks(result)
    passed = all(c["passed"] for c in checks)
    teacher = result.teacher.to_dict()
    report = {"name": name or out.name, "created": utc_now(), "kind": KINDS[result.kind], "passed": passed,
              "teacher": teacher, "student": result.plan, "metrics": result.metrics, "checks": checks,
              "step": result.step, "stopped": result.stopped, "train_seconds": result.train_seconds,
              "data": result.data.record(), "config": result.config.to_dict()}
    reports = {"report.json": json.dumps(report, indent=2, default=str) + "\n", "report.md": render_report(report)}
    if not passed:
        failed_dir = write_failed_report(out, reports)
        from inferforge.pipeline import check_line

        missed = "; ".join(check_line(c) for c in checks if not c["passed"])
        where = f"checkpoints kept in {result.checkpoint_dir}: resume with --resume and more --steps"
        raise GateFailed(f"missed: {missed}; no artifact was written ({out} is unchanged); report: "
                         f"{failed_dir / 'report.md'}; {where if result.checkpoint_dir else 'no checkpoints kept'}",
                         report_dir=str(failed_dir))
    with staged_artifact(out) as staging:
        result.student.save_pretrained(staging, safe_serialization=True)
        for weights in staging.glob("*.safetensors"):
            make_public_file(weights)   # safetensors writes 0600; the artifact's files are all readable alike
        teacher_dir = Path(result.teacher.path)
        names = TOKENIZER_FILES + (SENTENCE_TRANSFORMERS_FILES if result.kind == "encoder" else ())
        for file_name in names:
            if (teacher_dir / file_name).is_file():
                (staging / file_name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(teacher_dir / file_name, staging / file_name)
        (staging / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.history), encoding="utf-8")
        (staging / "loss_curve.svg").write_text(loss_curve_svg(result.history), encoding="utf-8")
        for file_name, text in reports.items():
            (staging / file_name).write_text(text, encoding="utf-8")
        if result.kind == "encoder":
            runtime = {"provider": "pytorch-fp32", "model": "model.safetensors", "pooling": "mean", "normalize": True,
                       "max_length": result.plan["max_length"]}
        else:
            runtime = {"engine": "inferforge.runtime.engine.LLMEngine", "model_type": result.student.config.model_type}
        summary = (f"{result.plan['num_layers']}-layer student of {teacher['model']}, {result.step} steps "
                   f"({result.stopped}); held-out " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                                                               if isinstance(v, float)))
        manifest = write_manifest(staging, {
            "name": report["name"], "created": report["created"], "kind": KINDS[result.kind], "runtime": runtime,
            "source": teacher,
            "lineage": {"parent": {"role": "teacher", **teacher}},
            "distill": {"config": report["config"], "student": result.plan, "step": result.step,
                        "stopped": result.stopped, "train_seconds": result.train_seconds,
                        "checkpoints": str(result.checkpoint_dir) if result.checkpoint_dir else None},
            "data": report["data"], "metrics": result.metrics, "validation": result.metrics,
            "steps": [{"name": "distill", "settings": report["config"], "duration_s": result.train_seconds,
                       "summary": summary}],
            "checks": checks, "passed": True, "accuracy_passed": True,
            **(extra_manifest or {}), "environment": environment(),
        })
    if progress is not None:
        progress.print(f"artifact: {out}")
    return manifest
