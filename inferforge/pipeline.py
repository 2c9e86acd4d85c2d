"""Run a recipe: model -> export -> quantize -> validate -> bench -> artifact with manifest and reports.

A causal-LM recipe (one `quantize` step with a `config`) runs `quantize_checkpoint`, the code
behind `inferforge quantize --config`: the same artifact, with the normalized recipe in its manifest.

Everything is built in a staging directory next to the output and moved into place only when the
run has finished and passed every gate and target, so an interrupted or failed run never leaves a
half-written artifact that looks complete, and never replaces or damages the artifact of an earlier
run. A run that misses a gate or target writes its reports to `OUT.failed/` instead (see
`inferforge.manifest.write_failed_report`). A failed accuracy gate stops the run: later steps (the
benchmark) are skipped, and the report says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from inferforge.data import (
    SentenceSplit,
    bucketed,
    sentence_record,
    sha256_lines,
    split_extra,
    split_sentences,
    with_extra_held_out,
)
from inferforge.errors import GateFailed, UserInputError
from inferforge.fileio import atomic_write_text
from inferforge.manifest import (
    environment,
    failed_report_dir,
    staged_artifact,
    tool_versions,
    utc_now,
    write_failed_report,
    write_manifest,
)
from inferforge.models import ModelSource, materialize, source_max_length
from inferforge.ort_config import ORT_CONFIG_NAME, SESSION_OPTIONS, model_opset, ort_config, write_ort_config
from inferforge.progress import Progress
from inferforge.recipe import (
    BenchConfig,
    DataConfig,
    DistillStepConfig,
    ExportConfig,
    Gates,
    QuantizeConfig,
    Recipe,
    Targets,
    ValidateConfig,
)

MODEL_FILE = "model.onnx"


@dataclass
class RunContext:
    """What the steps share: inputs, the reference model, and the paths and results produced so far.

    `reference` is the model every candidate is compared with: the source PyTorch model in a recipe
    run, the fp32 ONNX model of the parent artifact when an export artifact is quantized.
    """

    data: DataConfig
    gates: Gates
    source: ModelSource
    sentences: SentenceSplit
    work: Path                  # scratch space, deleted at the end
    staging: Path               # becomes the artifact
    progress: Progress
    reference: object = None    # a SentenceEncoder: TorchEncoder of the source model, or OnnxEncoder
    fp32_onnx: Path | None = None
    final_onnx: Path | None = None
    final_provider: str = "onnx-fp32"
    results: dict = field(default_factory=dict)
    skipped_steps: list = field(default_factory=list)   # names of the steps not run after a failed gate
    step_checks: list = field(default_factory=list)     # gates a step checked itself and missed (GateFailed.check)
    max_length_origin: str = "recipe data.max_length"   # where data.max_length comes from, for the manifest
    quantize_record: dict | None = None                 # the quantize step's record, for ort_config.json
    graph_rewrites: dict = field(default_factory=dict)  # rewrite name -> nodes changed in the final model
    # After a distill step: the student's directory, which export reads, and the student in PyTorch, which
    # the export is checked against (validate still compares with `reference`, the teacher).
    model_path: Path | None = None
    model_reference: object = None
    out: Path | None = None     # the artifact's final directory (the distill step's checkpoints go beside it)
    report_files: dict = field(default_factory=dict)    # name -> text, written beside the reports (distill's curve)
    lineage: dict | None = None                         # the manifest's lineage (a distilled student's teacher)
    # After a distill step: its held-out split and gate, which validate applies to the final model too
    distill_held_out: dict | None = None

    def encoder(self, onnx_path: Path, threads: int | None = None):
        """An OnnxEncoder opened as the artifact will be: with the session options ort_config.json records."""
        from inferforge.encoder import OnnxEncoder

        return OnnxEncoder(onnx_path, self.reference.tokenizer, max_length=self.data.max_length, threads=threads,
                           session_options=SESSION_OPTIONS)


_RUNNERS: dict[type, Callable[[RunContext, object], dict]] = {}


def step_runner(config_type: type):
    """Register the function that runs steps configured by `config_type`."""
    def register(fn):
        _RUNNERS[config_type] = fn
        return fn
    return register


@dataclass
class RunResult:
    """`output` holds the new artifact only when `passed`; otherwise nothing was written there (an
    earlier artifact is unchanged) and the run's reports are in `failure_report` (`OUT.failed`)."""

    output: Path
    report: dict
    passed: bool
    failure_report: Path | None = None

    @property
    def failures(self) -> list[dict]:
        return [c for c in self.report["checks"] if not c["passed"]]


# ----------------------------------------------------------------------------------------------
# Steps


@step_runner(ExportConfig)
def _export(ctx: RunContext, cfg: ExportConfig) -> dict:
    from inferforge.optimize.export import check_export, export_onnx

    with ctx.progress.spinner("exporting to ONNX with optimum-onnx"):
        ctx.fp32_onnx = export_onnx(ctx.model_path or ctx.source.path, ctx.work / "onnx-fp32", opset=cfg.opset)
    # Before anything measures it: the file every later step (and the artifact) uses.
    _block_slow_fusions(ctx, ctx.fp32_onnx)
    check = check_export(ctx.model_reference or ctx.reference, ctx.encoder(ctx.fp32_onnx),
                         list(ctx.sentences.calibration[:64]), atol=cfg.atol)
    check["graph_rewrites"] = dict(ctx.graph_rewrites)
    ctx.final_onnx, ctx.final_provider = ctx.fp32_onnx, "onnx-fp32"
    return {"result": check, "summary": f"ONNX Runtime vs PyTorch max abs diff {check['max_abs_diff']:.1e} (atol {cfg.atol:.0e})"}


def _block_slow_fusions(ctx: RunContext, onnx_path: Path) -> None:
    """Rewrite `onnx_path` in place so ONNX Runtime's SkipLayerNormFusion cannot match (bit-identical
    math, see `inferforge.optimize.ort_fusions`); record how many nodes carry the rewrite. Idempotent."""
    from inferforge.optimize.ort_fusions import block_skip_layer_norm_fusion_file

    ctx.graph_rewrites[REWRITE_NAME] = block_skip_layer_norm_fusion_file(onnx_path)


REWRITE_NAME = "residual Add before LayerNormalization -> Sum (SkipLayerNormFusion cannot match)"


@step_runner(DistillStepConfig)
def _distill(ctx: RunContext, cfg: DistillStepConfig) -> dict:
    """Train the student (checkpoints in OUT.checkpoints/, continued by a re-run), gate it on its own
    held-out split, and make it the model the later steps export; validate compares with the teacher."""
    from inferforge.distill_cli import checkpoint_dir_for
    from inferforge.encoder import TorchEncoder
    from inferforge.optimize.distill import distill
    from inferforge.optimize.distill_artifact import TOKENIZER_FILES, gate_checks, loss_curve_svg
    from inferforge.optimize.distill_checkpoint import latest_checkpoint

    checkpoints = checkpoint_dir_for(ctx.out)
    result = distill(ctx.source, cfg.student, cfg.data, cfg.distill_config(), checkpoint_dir=checkpoints,
                     resume=latest_checkpoint(checkpoints) is not None, exclude=ctx.sentences.held_out,
                     progress=ctx.progress)
    student_dir = ctx.work / "student"
    result.student.save_pretrained(student_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:   # not config.json: the student has its own
        if (ctx.source.path / name).is_file():
            shutil.copyfile(ctx.source.path / name, student_dir / name)
    ctx.model_path = student_dir
    ctx.model_reference = TorchEncoder(student_dir, max_length=ctx.data.max_length)
    ctx.report_files.update({"metrics.jsonl": "".join(json.dumps(r) + "\n" for r in result.history),
                             "loss_curve.svg": loss_curve_svg(result.history)})
    ctx.lineage = {"parent": {"role": "teacher", **ctx.source.to_dict()}}
    m = result.metrics
    record = {"metrics": m, "student": result.plan, "data": result.data.record(), "step": result.step,
              "stopped": result.stopped, "train_seconds": result.train_seconds, "checkpoints": str(checkpoints)}
    summary = (f"{result.plan['num_layers']}-layer student (teacher layers {result.plan['layer_map']}), {result.step} "
               f"steps ({result.stopped}); its held-out split: mean cosine {m['mean_cosine']:.4f}, min "
               f"{m['min_cosine']:.4f}")
    ctx.distill_held_out = {"texts": tuple(result.data.held_out), "min_mean_cosine": cfg.min_mean_cosine,
                            "min_cosine": cfg.min_cosine}
    missed = [c for c in gate_checks(result) if not c["passed"]]
    if missed:
        c = missed[0]
        raise GateFailed(f"{summary}; missed {c['name']}: {c['measured']:.6g} {c['op']} {c['limit']:.6g} required; "
                         f"checkpoints kept in {checkpoints}", check={k: v for k, v in c.items() if k != "passed"})
    return {"result": record, "summary": summary}


@step_runner(QuantizeConfig)
def _quantize(ctx: RunContext, cfg: QuantizeConfig) -> dict:
    from inferforge.optimize.onnx_quantize import SettingError, quantize_onnx_int8
    from inferforge.optimize.static_qdq import quantize_static_qdq
    from inferforge.optimize.validate import cosine_rows

    # Calibration covers every length bucket; batches of similar lengths keep padding low.
    calibration = sorted(ctx.sentences.calibration, key=len)
    # After a distill step the candidates are scored against the float32 student they quantize: next to the
    # student's own distance from the teacher, the quantization error the search minimises would be noise.
    # validate still gates the result against the teacher.
    reference = (ctx.model_reference or ctx.reference)(calibration)
    tokenize = ctx.reference.tokenize
    batches = [tokenize(calibration[i:i + 16]) for i in range(0, len(calibration), 16)]

    def score(path: Path) -> tuple[float, float]:
        cos = cosine_rows(reference, ctx.encoder(path)(calibration))
        return float(cos.min()), float(cos.mean())

    static = cfg.method == "static-qdq"
    n = (1 if cfg.smoothquant_alpha != "auto" else len(cfg.alpha_grid) + 1) + cfg.auto_exclusion_bound
    label = f"static QDQ, {cfg.calibrate_method} calibration" if static else "dynamic int8"
    task = ctx.progress.task(f"quantizing ({label}): choosing settings on calibration data", total=n)
    out = ctx.work / "onnx-int8" / MODEL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    common = dict(calibration_batches=batches, score=score, per_channel=cfg.per_channel,
                  smoothquant_alpha=cfg.smoothquant_alpha, alpha_grid=cfg.alpha_grid, exclude_nodes=cfg.exclude_nodes,
                  target_min_cosine=ctx.gates.min_cosine + cfg.calibration_margin,
                  max_auto_excluded=cfg.auto_exclusion_bound, on_candidate=lambda label, s: task.advance())
    try:
        if static:
            record = quantize_static_qdq(ctx.fp32_onnx, out, calibrate_method=cfg.calibrate_method, **common)
        else:
            record = quantize_onnx_int8(ctx.fp32_onnx, out, smoothquant_scope=cfg.smoothquant_scope, **common)
        if cfg.embeddings == "int8":
            record["embeddings"] = _quantize_embeddings(out, score)
        else:
            record["embeddings"] = None
    except SettingError as e:   # a setting this model cannot take; anything else is a bug and surfaces as one
        raise UserInputError(f"quantize: {e}") from None
    finally:
        task.close()
    _block_slow_fusions(ctx, out)   # a no-op after our export; a parent artifact's older fp32 file may need it
    record["graph_rewrites"] = dict(ctx.graph_rewrites)
    ctx.final_onnx, ctx.final_provider = out, "onnx-int8"
    record["method"] = cfg.method
    record["calibration_texts"] = len(calibration)
    record["scored_against"] = "the float32 student" if ctx.model_reference is not None else "the source model"
    record["max_auto_excluded"] = cfg.auto_exclusion_bound
    record["size_bytes"] = {"fp32": ctx.fp32_onnx.stat().st_size, "int8": out.stat().st_size}
    ctx.quantize_record = record
    method = f"static QDQ ({cfg.calibrate_method} calibration)" if static else "dynamic int8"
    embeddings = " and word embeddings" if record["embeddings"] else ""
    return {"result": record,
            "summary": f"{method}{embeddings}, SmoothQuant alpha {record['smoothquant_alpha']}, "
                       f"{len(record['excluded_nodes'])} MatMuls kept in float, calibration min cosine "
                       f"{record['calibration_min_cosine']:.4f}"
                       f"{' (to the float32 student)' if record['scored_against'] == 'the float32 student' else ''}; size {record['size_bytes']['fp32'] / 1e6:.0f} MB -> "
                       f"{record['size_bytes']['int8'] / 1e6:.0f} MB"}


def _quantize_embeddings(onnx_path: Path, score: Callable[[Path], tuple[float, float]]) -> dict:
    """Per-row int8 word embeddings in the chosen model, scored again on the calibration texts
    (the settings search ran with float embeddings; the validate step gates the result)."""
    from inferforge.optimize.embedding_quant import quantize_word_embeddings

    record = quantize_word_embeddings(onnx_path)
    record["calibration_min_cosine"], record["calibration_mean_cosine"] = score(onnx_path)
    return record


@step_runner(ValidateConfig)
def _validate(ctx: RunContext, cfg: ValidateConfig) -> dict:
    from inferforge.optimize.validate import compare_embeddings

    held_out = list(ctx.sentences.held_out)
    buckets = ctx.sentences.buckets()
    candidate = ctx.encoder(ctx.final_onnx)
    # One call over the whole list, exactly as a user calls the loaded model: with dynamic int8
    # activations an embedding depends (slightly) on which sentences share its batch.
    with ctx.progress.spinner(f"validating on {len(held_out)} held-out texts"):
        ref = ctx.reference(held_out, batch_size=cfg.batch_size)
        got = candidate(held_out, batch_size=cfg.batch_size)
    tokens = [len(ids) for ids in ctx.reference.tokenizer(held_out, truncation=True,
                                                           max_length=ctx.data.max_length)["input_ids"]]
    report = compare_embeddings(ref, got, held_out, buckets=buckets, tokens=tokens)
    ctx.results["validation"] = {**report.to_dict(), "max_length": ctx.data.max_length}
    per_bucket = ", ".join(f"{name} {b['min_cosine']:.4f}" for name, b in report.buckets.items())
    summary = (f"{ctx.final_provider}: min cosine {per_bucket}; mean {report.mean_cosine:.4f} "
               f"over {report.sentences} held-out texts")
    if ctx.distill_held_out is not None:
        distilled = _validate_distill_held_out(ctx, candidate, cfg.batch_size)
        ctx.results["validation"]["distillation_held_out"] = distilled
        summary += (f"; the distillation's held-out split: mean {distilled['mean_cosine']:.4f}, min "
                    f"{distilled['min_cosine']:.4f} over {distilled['sentences']} texts")
    return {"result": ctx.results["validation"], "summary": summary}


def _validate_distill_held_out(ctx: RunContext, candidate, batch_size: int) -> dict:
    """The final model against the teacher on the texts the distill step held out (never trained on,
    never calibrated on), for the distill step's own gate: the quantized student must pass the gate
    the float32 student passed, on the same texts."""
    from inferforge.data import sha256_lines
    from inferforge.optimize.validate import compare_embeddings

    texts = list(ctx.distill_held_out["texts"])
    with ctx.progress.spinner(f"validating on the distillation's {len(texts)} held-out texts"):
        ref = ctx.reference(texts, batch_size=batch_size)
        got = candidate(texts, batch_size=batch_size)
    report = compare_embeddings(ref, got, texts).to_dict()
    gate = {k: ctx.distill_held_out[k] for k in ("min_mean_cosine", "min_cosine")}
    return {k: report[k] for k in ("sentences", "min_cosine", "p01_cosine", "mean_cosine", "worst")} | {
        "sha256": sha256_lines(texts), "gate": gate}


@step_runner(BenchConfig)
def _bench(ctx: RunContext, cfg: BenchConfig) -> dict:
    import torch

    from inferforge.bench.latency import fixed_length_batch, measure_interleaved

    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    providers = [p for p in cfg.providers if p != "onnx-int8" or ctx.final_provider == "onnx-int8"]
    encoders = {"onnx-fp32": ctx.encoder(ctx.fp32_onnx, threads)}
    if "onnx-int8" in providers:
        encoders["onnx-int8"] = ctx.encoder(ctx.final_onnx, threads)
    teacher = TEACHER_PROVIDER if _compare_teacher(ctx, cfg) else None
    if teacher:
        encoders[teacher] = ctx.encoder(_teacher_onnx(ctx), threads)
        providers.append(teacher)
    vocab = ctx.reference.tokenizer.vocab_size
    rng = np.random.default_rng(0)
    results = []
    task = ctx.progress.task("benchmarking", total=len(cfg.batch_sizes) * cfg.iterations)
    for batch_size in cfg.batch_sizes:
        batch = fixed_length_batch(vocab, batch_size, cfg.seq_len, rng)
        fns = {}
        for p in providers:
            # pytorch-fp32: the model that was exported (after a distill step the student, not the teacher)
            encoder = (ctx.model_reference or ctx.reference) if p == "pytorch-fp32" else encoders[p]
            fns[p] = (lambda e=encoder, b=batch: e.hidden_states(b))
        stats = measure_interleaved(fns, warmup=cfg.warmup, iterations=cfg.iterations,
                                    on_round=lambda i: task.advance())
        base = stats.get("onnx-fp32", {}).get("p50_ms")
        for p in providers:
            row = {"provider": p, "batch_size": batch_size, **stats[p],
                   "throughput_seq_s": batch_size / stats[p]["p50_ms"] * 1e3}
            row["speedup_vs_onnx_fp32"] = base / stats[p]["p50_ms"] if base else None
            if teacher:
                row["speedup_vs_teacher_onnx_fp32"] = stats[teacher]["p50_ms"] / stats[p]["p50_ms"]
            results.append(row)
    task.close()
    bench = {"seq_len": cfg.seq_len, "threads": threads, "warmup": cfg.warmup, "iterations": cfg.iterations,
             "final_provider": ctx.final_provider, "results": results}
    ctx.results["benchmark"] = bench
    final = [r for r in results if r["provider"] == ctx.final_provider]
    summary = ", ".join(f"batch {r['batch_size']}: p50 {r['p50_ms']:.1f} ms{_speedups(r)}" for r in final)
    return {"result": bench, "summary": f"{ctx.final_provider}: {summary}"}


TEACHER_PROVIDER = "teacher-onnx-fp32"


def _speedups(row: dict) -> str:
    parts = [f"{row['speedup_vs_onnx_fp32']:.2f}x onnx-fp32"] if row["speedup_vs_onnx_fp32"] else []
    if "speedup_vs_teacher_onnx_fp32" in row:
        parts.append(f"{row['speedup_vs_teacher_onnx_fp32']:.2f}x the teacher's onnx-fp32")
    return f" ({', '.join(parts)})" if parts else ""


def _compare_teacher(ctx: RunContext, cfg: BenchConfig) -> bool:
    """Time the teacher too: asked for, or by default after a distill step (then `model_path` is the student)."""
    distilled = ctx.model_path is not None
    return distilled if cfg.compare_teacher is None else cfg.compare_teacher and distilled


def _teacher_onnx(ctx: RunContext) -> Path:
    """The teacher (the recipe's model) exported to fp32 ONNX as the student was, with the same rewrite."""
    from inferforge.optimize.export import export_onnx
    from inferforge.optimize.ort_fusions import block_skip_layer_norm_fusion_file

    with ctx.progress.spinner("exporting the teacher to ONNX (fp32) to compare speeds"):
        path = export_onnx(ctx.source.path, ctx.work / "teacher-onnx-fp32", opset=model_opset(ctx.fp32_onnx))
    block_skip_layer_norm_fusion_file(path)
    return path


# ----------------------------------------------------------------------------------------------
# Gates and targets


def check_results(gates: Gates, targets: Targets, results: dict, final_provider: str) -> list[dict]:
    """The gates and targets against the measured results, each with `passed`."""
    checks = []
    val = results.get("validation")
    if val:
        # One gate per length bucket: a model that is fine on sentences can fail short queries.
        buckets = val.get("buckets") or {"": val}
        for name, b in buckets.items():
            suffix = f", {name}" if name else ""
            checks.append({"name": f"min cosine (held-out){suffix}", "kind": "gate", "measured": b["min_cosine"],
                           "op": ">=", "limit": gates.min_cosine, "bucket": name or None})
            if gates.mean_cosine is not None:
                checks.append({"name": f"mean cosine (held-out){suffix}", "kind": "gate", "measured": b["mean_cosine"],
                               "op": ">=", "limit": gates.mean_cosine, "bucket": name or None})
        # After a distill step: its own gate, on its own held-out split, for the final (e.g. int8) model.
        distilled = val.get("distillation_held_out") or {"gate": {}}
        for key, limit_key, label in (("mean_cosine", "min_mean_cosine", "mean"), ("min_cosine", "min_cosine", "min")):
            if distilled["gate"].get(limit_key) is not None:
                checks.append({"name": f"{label} cosine (the distillation's held-out split)", "kind": "gate",
                               "measured": distilled[key], "op": ">=", "limit": distilled["gate"][limit_key]})
    bench = results.get("benchmark")
    if bench:
        rows = {(r["provider"], r["batch_size"]): r for r in bench["results"]}
        for t in targets.latency:
            r = rows[(final_provider, t.batch_size)]
            checks.append({"name": f"{final_provider} {t.percentile} latency, batch {t.batch_size} (ms)",
                           "kind": "target", "measured": r[f"{t.percentile}_ms"], "op": "<=", "limit": t.max_ms})
        if targets.min_speedup is not None:
            r = rows.get((final_provider, targets.speedup_batch_size))
            if r and r["speedup_vs_onnx_fp32"]:
                checks.append({"name": f"{final_provider} p50 speedup over onnx-fp32, batch {r['batch_size']}",
                               "kind": "target", "measured": r["speedup_vs_onnx_fp32"], "op": ">=",
                               "limit": targets.min_speedup})
    for c in checks:
        c["passed"] = c["measured"] >= c["limit"] if c["op"] == ">=" else c["measured"] <= c["limit"]
    return checks


# ----------------------------------------------------------------------------------------------
# The run


@contextlib.contextmanager
def staged_run(out: Path):
    """Yield (staging, work): the directory that becomes the artifact `out` when the block finishes
    (see `staged_artifact`), and scratch space next to it that is always deleted."""
    with staged_artifact(out) as staging:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
        try:
            yield staging, work
        finally:
            shutil.rmtree(work, ignore_errors=True)


def run_recipe(recipe: Recipe, *, progress: Progress | None = None, provenance: dict | None = None,
               files: dict[str, str] | None = None) -> RunResult:
    """Run every step of `recipe`; returns the result. The artifact is written only when every gate
    and target passed; otherwise `result.failure_report` (`OUT.failed/`) holds the reports and `out`
    is untouched.

    `provenance` (e.g. `{"parent": ..., "recalibration": ...}`) goes into the manifest's `provenance`;
    `files` (name -> text, e.g. a drift report) are written into the artifact, or into `OUT.failed/`.

    A causal-LM recipe returns the manifest as its report; its gate is checked before anything is
    written, and a missed one raises `GateFailed` and leaves no artifact."""
    progress = progress or Progress(quiet=True)
    if recipe.kind == "causal-lm":
        if provenance or files:
            raise UserInputError("a causal-LM recipe run takes no extra provenance or files")
        return _run_causal_lm(recipe, progress)
    out = recipe.output_dir.resolve()
    started = time.perf_counter()
    with staged_run(out) as (staging, work):
        report = _run_steps(recipe, progress, out, staging, work, started, provenance=provenance, files=files)
    failure_report = None if report["passed"] else failed_report_dir(out)
    return RunResult(output=out, report=report, passed=report["passed"], failure_report=failure_report)


def _run_causal_lm(recipe: Recipe, progress: Progress) -> RunResult:
    from inferforge.optimize.llm_quantize import RECIPE_NAMES, quantize_checkpoint
    from inferforge.optimize.lm_eval import LMGate

    (cfg,) = recipe.steps
    gate = None if cfg.gate == "none" else LMGate(**asdict(cfg.gate))   # the recipe filled in the defaults
    speed_gate = None
    if cfg.min_speedup is not None:
        from inferforge.optimize.speed_gate import SpeedGate

        speed_gate = SpeedGate(cfg.min_speedup, 1 if cfg.at_batch is None else cfg.at_batch)
    started = time.perf_counter()
    manifest = quantize_checkpoint(recipe.model, recipe.output_dir, fmt=cfg.config, calibration_file=cfg.calibration,
                                   num_samples=cfg.num_samples, seq_len=cfg.seq_len, gate=gate,
                                   auto_skip=cfg.auto_skip, skip=cfg.skip, group_size=cfg.group_size,
                                   max_float_share=cfg.max_float_share, progress=progress, name=recipe.name,
                                   recipe=recipe.to_dict(), names=RECIPE_NAMES, speed_gate=speed_gate)
    progress.done("quantize", time.perf_counter() - started, manifest["steps"][0]["summary"])
    return RunResult(output=recipe.output_dir.resolve(), report=manifest, passed=manifest["passed"])


def recipe_sentences(data) -> tuple:
    """The recipe's data before length bucketing: (split, extra calibration texts, extra held-out texts).
    The extra calibration texts are already in the split's calibration; the extra held-out ones are
    added later as the bucket `extra` (`with_extra_held_out`), never calibrated on."""
    sentences = split_sentences(data.sentences, data.calibration_size, data.held_out_size)
    extra_calibration, extra_held_out = (), ()
    if data.extra_sentences is not None:
        # Added before the length buckets, so short queries and long passages come from both sources.
        extra_calibration, extra_held_out = split_extra(
            data.extra_sentences, data.extra_calibration_size, data.extra_held_out_size,
            exclude=(*sentences.calibration, *sentences.held_out))
        sentences = replace(sentences, calibration=(*sentences.calibration, *extra_calibration))
    return sentences, extra_calibration, extra_held_out


def _run_steps(recipe: Recipe, progress: Progress, out: Path, staging: Path, work: Path, started: float, *,
               provenance: dict | None = None, files: dict[str, str] | None = None) -> dict:
    """The steps, the reports and the manifest, written into `staging`; returns the report."""
    from inferforge.encoder import TorchEncoder

    sentences, extra_calibration, extra_held_out = recipe_sentences(recipe.data)
    with progress.spinner(f"loading {recipe.model}"):
        source = materialize(recipe.model, work)
        source = dataclasses.replace(source, spec=recipe.model_as_written or recipe.model)
        data, origin = resolve_max_length(recipe.data, source.path)
        reference = TorchEncoder(source.path, max_length=data.max_length)
    sentences = bucketed(sentences, reference.tokenizer, data.max_length)
    if extra_held_out:
        sentences = with_extra_held_out(sentences, extra_held_out)
    ctx = RunContext(data=data, gates=recipe.gates, source=source, sentences=sentences, work=work,
                     staging=staging, progress=progress, reference=reference, max_length_origin=origin, out=out)
    steps = run_steps(ctx, recipe.steps, targets=recipe.targets)
    checks = ctx.step_checks + check_results(recipe.gates, recipe.targets, ctx.results, ctx.final_provider)
    sentence_hashes = sentence_record(sentences, calibration_source=recipe.data.sentences,
                                      held_out_source=recipe.data.sentences)
    if recipe.data.extra_sentences is not None:
        sentence_hashes.update({
            "extra_source": recipe.data.extra_sentences,
            "extra_calibration_sentences": len(extra_calibration),
            "extra_calibration_sha256": sha256_lines(extra_calibration),
            "extra_held_out_sentences": sentences.held_out_buckets.count("extra"),
            "extra_held_out_sha256": sha256_lines(t for t, b in zip(sentences.held_out, sentences.held_out_buckets)
                                                  if b == "extra")})
    return write_run_outputs(ctx, name=recipe.name, out=out, tokenizer_dir=source.path, steps=steps, checks=checks,
                             started=started, files=files,
                             provenance={"recipe": recipe.to_dict(), "data": sentence_hashes,
                                         **({"provenance": provenance} if provenance else {})})


def _step_name(cfg) -> str:
    from inferforge.recipe import STEP_NAMES

    return STEP_NAMES.get(type(cfg)) or type(cfg).__name__.removesuffix("Config").lower()


def resolve_max_length(data: DataConfig, model_dir: Path) -> tuple[DataConfig, str]:
    """`data` with `max_length` set (the recipe's, else the source model's), and where it came from."""
    if data.max_length is not None:
        return data, "recipe data.max_length"
    max_length, origin = source_max_length(model_dir)
    return replace(data, max_length=max_length), f"source model ({origin})"


def run_steps(ctx: RunContext, configs: Iterable, targets: Targets | None = None) -> list[dict]:
    """Run each step config with its registered runner; returns one record per step for the manifest.

    After a step whose accuracy gate fails (the validate step, or a step that raises `GateFailed`
    with the check it missed, as the export's ONNX-vs-PyTorch check does), the later steps are not
    run: their names go to `ctx.skipped_steps`, a raised check goes to `ctx.step_checks`, and the
    failed step's line shows the measured values and limits."""
    steps = []
    configs = list(configs)
    for i, cfg in enumerate(configs):
        name = _step_name(cfg)
        t0 = time.perf_counter()
        try:
            outcome = _RUNNERS[type(cfg)](ctx, cfg)
        except GateFailed as e:
            if e.check is None:   # nothing measured to report: the run fails as the step says
                raise
            ctx.step_checks.append({**e.check, "passed": False})
            outcome = {"summary": str(e)}
        record = {"name": name, "settings": asdict(cfg), "duration_s": time.perf_counter() - t0,
                  "tools": tool_versions(), **outcome}
        steps.append(record)
        checks = ctx.step_checks + check_results(ctx.gates, targets or Targets(), ctx.results, ctx.final_provider)
        failed = [c for c in checks if c["kind"] == "gate" and not c["passed"]]
        missed_targets = [c for c in checks if c["kind"] == "target" and not c["passed"]]
        summary = outcome.get("summary", "")
        for label, missed in (("gate missed", failed), ("target missed", missed_targets)):
            if missed:
                summary += f"; {label}: " + "; ".join(check_line(c, sep=" ") for c in missed)
                record["summary"] = summary
        ctx.progress.done(name, record["duration_s"], summary, passed=not failed and not missed_targets)
        if failed:
            ctx.skipped_steps = [_step_name(c) for c in configs[i + 1:]]
            if ctx.skipped_steps:
                ctx.progress.print(f"  skipped: {', '.join(ctx.skipped_steps)} (the accuracy gate failed)")
            break
    return steps


def write_run_outputs(ctx: RunContext, *, name: str, out: Path, tokenizer_dir: Path, steps: list[dict],
                      checks: list[dict], started: float, provenance: dict, report_extra: dict | None = None,
                      files: dict[str, str] | None = None) -> dict:
    """Write the final model, the tokenizer, report.json, report.md and the manifest into `ctx.staging`;
    when a gate or target failed, write only the reports, to `OUT.failed/` (`ctx.staging` then holds
    no manifest, so `staged_artifact` publishes nothing).

    `provenance` (the recipe, or the parent artifact) goes into the manifest, `report_extra` into
    the report. The reports are portable: they name the artifact by its directory name and the source
    model as the recipe wrote it; the manifest also keeps the source's local path (for
    `bench --compare-source`). `files` (name -> text) are written beside the reports. Returns the report.
    """
    from inferforge.bench.report import render_markdown
    from inferforge.optimize.export import copy_tokenizer

    accuracy_passed = all(c["passed"] for c in checks if c["kind"] == "gate")
    passed = all(c["passed"] for c in checks)
    report = {
        "name": name,
        "created": utc_now(),
        "artifact": out.name if passed else None,
        "source": {"model": ctx.source.spec, "weights_sha256": ctx.source.weights_sha256},
        "passed": passed,
        "accuracy_passed": accuracy_passed,
        "checks": checks,
        "steps": [{k: s[k] for k in ("name", "duration_s", "summary")} for s in steps],
        "skipped_steps": list(ctx.skipped_steps),
        "validation": ctx.results.get("validation"),
        "benchmark": ctx.results.get("benchmark"),
        **(report_extra or {}),
        "environment": environment(),
        "total_duration_s": time.perf_counter() - started,
    }
    reports = {"report.json": json.dumps(report, indent=2, default=str) + "\n", "report.md": render_markdown(report),
               **ctx.report_files, **(files or {})}
    if not passed:
        write_failed_report(out, reports)
        return report
    shutil.copyfile(ctx.final_onnx, ctx.staging / MODEL_FILE)
    copy_tokenizer(tokenizer_dir, ctx.staging)
    record = ctx.quantize_record
    write_ort_config(ctx.staging, ort_config(opset=model_opset(ctx.final_onnx), quantization=record,
                                             rewrites=ctx.graph_rewrites, embeddings=record and record["embeddings"]))
    for file_name, text in reports.items():
        atomic_write_text(ctx.staging / file_name, text)
    drift_snapshot = _write_drift_snapshot(ctx) if ctx.final_provider == "onnx-int8" else None
    write_manifest(ctx.staging, {
        "name": name,
        "created": report["created"],
        "kind": "sentence-encoder",
        "runtime": {"model": MODEL_FILE, "provider": ctx.final_provider, "pooling": "mean",
                    "normalize": True, "max_length": ctx.data.max_length, "max_length_origin": ctx.max_length_origin,
                    "session_options": SESSION_OPTIONS, "ort_config": ORT_CONFIG_NAME},
        "source": ctx.source.to_dict(),
        **({"lineage": ctx.lineage} if ctx.lineage else {}),
        **provenance,
        "steps": steps,
        "validation": report["validation"],
        "benchmark": report["benchmark"],
        "checks": checks,
        "passed": passed,
        "accuracy_passed": accuracy_passed,
        **({"drift_snapshot": drift_snapshot} if drift_snapshot else {}),
        "environment": report["environment"],
    })
    return report


def _write_drift_snapshot(ctx: RunContext) -> dict:
    """`drift_snapshot.json` (see `inferforge.optimize.drift`): distributions over the calibration
    sentences as written, activation ranges over every calibration text (short and long ones too)."""
    from inferforge.optimize.drift import build_encoder_snapshot, write_snapshot

    with ctx.progress.spinner("writing the drift snapshot"):
        sentences = ctx.sentences.calibration[:ctx.data.calibration_size + ctx.data.extra_calibration_size]
        snapshot = build_encoder_snapshot(ctx.staging / MODEL_FILE, ctx.reference.tokenizer, sentences,
                                          max_length=ctx.data.max_length, range_texts=ctx.sentences.calibration)
        return write_snapshot(ctx.staging, snapshot)


def check_numbers(measured, limit) -> tuple[str, str]:
    """(measured, limit) as text: 6 significant digits, more where 6 would hide the limit's value
    (0.9999999 is not 'required >= 1') or make a missed measurement print like its limit."""
    def text(value, digits):
        return f"{value:.{digits}g}" if isinstance(value, (int, float)) else str(value)

    digits = 6
    while digits < 17 and isinstance(limit, (int, float)) and (
            float(text(limit, digits)) != limit
            or (isinstance(measured, (int, float)) and measured != limit
                and text(measured, digits) == text(limit, digits))):
        digits += 1
    return text(measured, digits), text(limit, digits)


def check_line(c: dict, sep: str = ": ") -> str:
    """'NAME: measured X, required >= Y' for one check."""
    measured, limit = check_numbers(c["measured"], c["limit"])
    return f"{c['name']}{sep}measured {measured}, required {c['op']} {limit}"


def missed_message(checks: list[dict]) -> str:
    """'missed: NAME: measured X, required >= Y; ...' for the checks that did not pass."""
    return "missed: " + "; ".join(check_line(c) for c in checks if not c["passed"])


def gate_failure_message(result: RunResult) -> str:
    return (missed_message(result.failures) + f"; no artifact was written ({result.output} is unchanged); "
            f"report: {result.failure_report / 'report.md'}")


def raise_on_failure(result: RunResult) -> RunResult:
    if not result.passed:
        raise GateFailed(gate_failure_message(result), report_dir=str(result.failure_report))
    return result
