"""The `inferforge` command line.

Exit codes:
    0    success
    1    an accuracy gate or a latency target was missed
    2    bad input: a recipe, a path, a flag, a corrupt or truncated model file (one-line message)
    3    the environment: a full disk, missing permissions, a read-only output; or an unexpected error,
         whose traceback goes to a log file named in the message (`--debug` prints it instead)
    130  interrupted (Ctrl-C); no artifact is written, an earlier one is untouched
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
from pathlib import Path

from inferforge.bench.serving.cli import add_llm_bench_args
from inferforge.errors import GateFailed, InferforgeError, UserInputError

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_ENVIRONMENT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES_HELP = ("exit codes:\n  0    ok\n  1    an accuracy gate or latency target was missed\n"
                   "  2    bad input (recipe, path, flag, corrupt model file)\n"
                   "  3    environment (disk full, permissions, read-only output) or an unexpected error, whose\n"
                   "       traceback goes to a log file named in the message (--debug prints it instead)\n"
                   "  130  interrupted")
# OSError numbers that are the machine's doing, not the input's: exit 3.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE,
                       errno.ENFILE, errno.ENOMEM, errno.EIO}
# OSError numbers that point at a path the user gave: exit 2.
_INPUT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG}


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad flags already; keep its message, drop nothing."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_INPUT, f"error: {message}\n")


def _progress(args):
    from inferforge.progress import Progress

    return Progress(quiet=args.quiet)


def _finish_run(args, result) -> int:
    from inferforge.pipeline import gate_failure_message

    out = result.output if result.passed else result.failure_report
    if args.json:
        print(json.dumps(result.report, indent=2, default=str))
    else:
        _print_summary(result.report)
        if result.passed:
            print(f"artifact: {out}")
        print(f"report:   {out / 'report.md'}\n          {out / 'report.json'}")
    if not result.passed:
        print(f"FAILED: {gate_failure_message(result)}", file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def _print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    bench = report.get("benchmark")
    if bench:
        table = Table(title=f"latency, seq {bench['seq_len']}, {bench['threads']} threads")
        teacher = any("speedup_vs_teacher_onnx_fp32" in r for r in bench["results"])
        for col in ("provider", "batch", "p50 ms", "p95 ms", "p99 ms", "vs onnx-fp32") + (("vs teacher",) * teacher):
            table.add_column(col, justify="right" if col != "provider" else "left")
        for r in bench["results"]:
            speed = f"{r['speedup_vs_onnx_fp32']:.2f}x" if r["speedup_vs_onnx_fp32"] else "-"
            vs_teacher = (f"{r['speedup_vs_teacher_onnx_fp32']:.2f}x",) if teacher else ()
            table.add_row(r["provider"], str(r["batch_size"]), f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}",
                          f"{r['p99_ms']:.2f}", speed, *vs_teacher)
        console.print(table)
    if report.get("checks"):
        table = Table(title="gates and targets")
        for col in ("check", "measured", "limit", "result"):
            table.add_column(col)
        for c in report["checks"]:
            if "measured" in c:
                from inferforge.pipeline import check_numbers

                measured, limit = check_numbers(c["measured"], c["limit"])
                limit = f"{c['op']} {limit}"
            else:   # a quantization gate: its limits, with the measurements under "validation"
                measured = "-"
                limit = ", ".join(f"{k} {v}" for k, v in (c.get("limits") or {}).items() if v is not None)
            table.add_row(c["name"], measured, limit, "[green]PASS[/green]" if c["passed"] else "[red]FAIL[/red]")
        console.print(table)
    speed = report.get("throughput")
    if report.get("kind") == "onnx-causal-lm" and isinstance(speed, dict):
        from inferforge.export_cli import quantized_summary

        console.print(f"speed: {speed['tokens_per_s']:.1f} tokens/s at batch 1 ({speed.get('provider')})")
        if "quantized_export" in report and "throughput_float" in report:
            console.print(quantized_summary(report), markup=False)
    gate = report.get("gate")
    if report.get("kind") == "quantized-causal-lm" and isinstance(gate, dict):
        console.print(f"accuracy gate: on ({gate.get('note', '')})" if gate.get("enabled")
                      else f"accuracy gate: [yellow]OFF[/yellow] ({gate.get('note', 'not checked')})")
    validation = report.get("validation")
    if validation and validation.get("buckets"):
        table = Table(title=f"held-out cosine, inputs up to {validation.get('max_length', '?')} tokens")
        for col in ("bucket", "texts", "tokens", "min", "mean"):
            table.add_column(col, justify="left" if col == "bucket" else "right")
        for name, b in validation["buckets"].items():
            table.add_row(name, str(b["sentences"]), "-".join(map(str, b.get("tokens", []))),
                          f"{b['min_cosine']:.4f}", f"{b['mean_cosine']:.4f}")
        distilled = validation.get("distillation_held_out")
        if distilled:
            table.add_row("distillation held-out", str(distilled["sentences"]), "",
                          f"{distilled['min_cosine']:.4f}", f"{distilled['mean_cosine']:.4f}")
        console.print(table)
    if report.get("kind") == "quantized-causal-lm" and validation:
        console.print("validation: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in validation.items()))
        worst = (report.get("quantization") or {}).get("worst_layers") or []
        if worst:
            console.print("lowest SQNR: " + ", ".join(f"{w['layer']} {w['sqnr_db']:.1f} dB" for w in worst))


def cmd_optimize(args) -> int:
    import dataclasses

    from inferforge.pipeline import run_recipe
    from inferforge.recipe import builtin_recipe_path, load_recipe

    if args.recipe:
        recipe = load_recipe(args.recipe)   # a relative 'output' is relative to the recipe file
    else:                                   # the built-in demo writes runs/minilm-int8 in the working directory
        recipe = load_recipe(builtin_recipe_path("demo"), output_relative_to_recipe=False)
    if args.output:
        recipe = dataclasses.replace(recipe, output=args.output)
    result = run_recipe(recipe, progress=_progress(args))
    if recipe.kind == "causal-lm":
        return _print_quantized(args, result.report, result.output)
    return _finish_run(args, result)


def _adhoc_recipe(args, steps: list) -> int:
    from inferforge.pipeline import run_recipe
    from inferforge.recipe import recipe_from_dict

    name = args.name or Path(args.model).name or "model"
    data = {"name": name, "model": args.model, "steps": steps, "gates": {"min_cosine": args.min_cosine},
            "data": {"sentences": args.sentences, "calibration_size": args.calibration_size,
                     "held_out_size": args.held_out_size},
            "output": args.output or f"runs/{name}-{args.command}"}
    recipe = recipe_from_dict(data, source="command line")
    return _finish_run(args, run_recipe(recipe, progress=_progress(args)))


def cmd_export(args) -> int:
    from inferforge.export_cli import cmd_export as run

    return run(args)


def _speed_gate(args):
    """The `SpeedGate` from --min-speedup / --at-batch (None without them), for --config runs only."""
    if args.at_batch is not None and args.min_speedup is None:
        raise UserInputError("--at-batch sets the batch size of the speed gate; add --min-speedup X (e.g. 1.2), or "
                             "drop --at-batch")
    if args.min_speedup is None:
        return None
    if not args.config or args.explain or args.onnx:
        raise UserInputError("--min-speedup gates a causal LM quantized with --config FORMAT (without --explain or "
                             "--onnx); drop it, or quantize with --config")
    from inferforge.optimize.speed_gate import SpeedGate

    try:
        return SpeedGate(min_speedup=args.min_speedup, at_batch=1 if args.at_batch is None else args.at_batch)
    except UserInputError as e:
        raise UserInputError(f"{str(e).replace('min_speedup', '--min-speedup').replace('at_batch', '--at-batch')}") from None


def cmd_quantize(args) -> int:
    args.speed_gate = _speed_gate(args)
    if args.quantize_embeddings and (args.config or args.explain):
        raise UserInputError("--quantize-embeddings applies to the ONNX int8 path (encoders); drop it with --config/--explain")
    if args.onnx:
        return _quantize_onnx_artifact(args)
    if args.explain:
        if not args.config:
            raise UserInputError("--explain needs --config FORMAT (int8-weight-only, int4-g128, w8a8 or fp8)")
        args.format = "int4-g128" if args.config in ("int4-gptq", "int4-awq") else args.config
        return cmd_explain(args)
    if args.config:
        return _quantize_llm(args)
    if args.calibration:
        raise UserInputError("--calibration FILE is read by --config (causal LMs) and --onnx (export artifacts); a "
                             "model directory is calibrated on --sentences (the first --calibration-size of them), "
                             "or export it first and run `inferforge quantize ARTIFACT --onnx --calibration FILE`")
    quant = {"smoothquant_alpha": _smoothquant_alpha(args), "smoothquant_scope": args.smoothquant_scope,
             "method": args.method,
             "calibrate_method": args.calibrate_method, "embeddings": "int8" if args.quantize_embeddings else "float"}
    steps = [{"export": {"opset": args.opset}}, {"quantize": quant}, "validate"]
    return _adhoc_recipe(args, steps)


def _smoothquant_alpha(args) -> float | str:
    try:
        return float(args.smoothquant_alpha)
    except ValueError:
        return args.smoothquant_alpha


def _quantize_onnx_artifact(args) -> int:
    """`quantize ARTIFACT --onnx`: quantize the fp32 model of an export artifact into a new artifact."""
    from inferforge.artifact_quantize import default_output, quantize_artifact
    from inferforge.recipe import DataConfig, Gates, QuantizeConfig

    if args.config or args.explain:
        raise UserInputError(f"--onnx quantizes an ONNX export artifact, {'--config' if args.config else '--explain'} "
                             "works on a causal LM checkpoint; give one of them, not both")
    try:
        quantize = QuantizeConfig(method=args.method, calibrate_method=args.calibrate_method,
                                  smoothquant_alpha=_smoothquant_alpha(args),
                                  smoothquant_scope=args.smoothquant_scope,
                                  embeddings="int8" if args.quantize_embeddings else "float")
        gates = Gates(min_cosine=args.min_cosine)
        data = DataConfig(sentences=args.sentences, calibration_size=args.calibration_size,
                          held_out_size=args.held_out_size)
    except ValueError as e:
        raise UserInputError(f"command line: {e}; fix the flag of that name") from None
    out = args.output or default_output(args.model, args.method)
    result = quantize_artifact(args.model, out, quantize=quantize, gates=gates, data=data,
                               calibration_file=args.calibration, name=args.name, progress=_progress(args))
    return _finish_run(args, result)


def _quantize_llm(args) -> int:
    from inferforge.optimize.llm_quantize import DEFAULT_GATE, quantize_checkpoint
    from inferforge.optimize.lm_eval import LMGate

    limits = args.max_ppl_increase is not None or args.min_top1_agreement is not None
    gate = DEFAULT_GATE
    if args.no_gate:
        if limits or args.auto_skip:
            raise UserInputError("--no-gate turns the gate off; drop --max-ppl-increase, --min-top1-agreement and "
                                 "--auto-skip, or drop --no-gate")
        gate = None
    elif limits:   # a limit given on the command line replaces that default; the other default stays
        default = LMGate.default(args.config)
        gate = LMGate(max_ppl_increase=default.max_ppl_increase if args.max_ppl_increase is None else args.max_ppl_increase,
                      min_top1_agreement=(default.min_top1_agreement if args.min_top1_agreement is None
                                          else args.min_top1_agreement))
    if args.num_samples < 1 or args.seq_len < 2:
        raise UserInputError(f"--num-samples must be >= 1 and --seq-len >= 2 (each token predicts the next), got "
                             f"{args.num_samples} and {args.seq_len}")
    out = args.output or f"runs/{Path(args.model).name}-{args.config}"
    manifest = quantize_checkpoint(args.model, out, fmt=args.config, calibration_file=args.calibration,
                                   num_samples=args.num_samples, seq_len=args.seq_len, gate=gate,
                                   auto_skip=args.auto_skip, skip=tuple(args.skip), group_size=args.group_size,
                                   max_float_share=args.max_float_share, progress=_progress(args),
                                   speed_gate=args.speed_gate)
    return _print_quantized(args, manifest, Path(out).resolve())


def _print_quantized(args, manifest: dict, out: Path) -> int:
    """What `quantize --config` and a causal-LM recipe print: the manifest as JSON, or a summary."""
    if args.json:
        print(json.dumps(manifest, indent=2))
        if (manifest.get("speed_gate") or {}).get("status") == "skipped":   # stdout stays one JSON document
            from inferforge.optimize.speed_gate import describe_record

            print(describe_record(manifest["speed_gate"]), file=sys.stderr)
    else:
        metrics = manifest.get("validation")
        print(f"artifact: {out}")
        print(manifest["steps"][0]["summary"])
        if metrics:
            print(f"held-out: perplexity {metrics['ppl_original']:.3f} -> {metrics['ppl_quantized']:.3f} "
                  f"({metrics['ppl_increase']:+.2%}), top-1 agreement {metrics['top1_agreement']:.2%}, "
                  f"KL {metrics['kl']:.4f}")
        gate = manifest.get("gate") or {}
        print(f"gate: PASS ({gate['note']})" if gate.get("enabled") else f"gate: OFF, {gate.get('note', 'not checked')}")
        if manifest.get("dispatch"):
            from inferforge.kernels.weight_only_dispatch import render_dispatch_report

            print("kernels per layer (measured on this GPU):\n" + render_dispatch_report(manifest["dispatch"]))
        if manifest.get("speed_gate"):
            from inferforge.optimize.speed_gate import describe_record

            print(describe_record(manifest["speed_gate"]))
    return EXIT_OK


def _share(text: str) -> float:
    """A share on the command line, as recipes take it: 0.02 or 2%."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share such as 0.05 or 5%, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1 (0% and 100%), got {text!r}")
    return value


def _parse_target(text: str) -> tuple[int, float]:
    try:
        batch, ms = text.split(":")
        return int(batch), float(ms)
    except ValueError:
        raise UserInputError(f"--target {text!r}: an encoder artifact takes BATCH:MS such as 8:50") from None


def _is_llm_target(args) -> bool:
    """--url, a causal-LM artifact, or a model directory (config.json, no manifest) go to the serving benchmark."""
    from inferforge.artifact import LLM_KINDS
    from inferforge.manifest import read_manifest

    if args.url or not args.artifact:
        return True
    path = Path(args.artifact)
    if not (path / "manifest.json").is_file() and (path / "config.json").is_file():
        return True
    return read_manifest(path).get("kind") in LLM_KINDS


def _target_shape(text: str) -> str:
    """--target's syntax at parse time; which form fits the target's kind is checked once TARGET is known."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"expected BATCH:MS such as 8:40 (encoder) or METRIC:STAT:MS such as "
                                         f"ttft_ms:p99:500 (language model), got {text!r}")
    return text


def cmd_bench(args) -> int:
    from inferforge.bench.artifact_bench import bench_artifact
    from inferforge.bench.serving.cli import cmd_bench_llm, llm_flags_given
    from inferforge.bench.serving.targets import looks_like_slo
    from inferforge.registry_refs import resolve_artifact_arg

    if args.artifact:   # NAME@ALIAS: the registry's stored copy
        args.artifact = str(resolve_artifact_arg(args.artifact))

    if args.url and args.artifact:
        raise UserInputError(f"give TARGET or --url, not both (got {args.artifact} and --url {args.url})")
    if _is_llm_target(args):
        if args.compare_source:
            raise UserInputError("--compare-source times an encoder's PyTorch source; it is not available for a "
                                 "causal LM: bench the source checkpoint's own artifact instead")
        return cmd_bench_llm(args)
    given = llm_flags_given(args)
    if given:
        raise UserInputError(f"{args.artifact} is an encoder artifact; {', '.join(given)} "
                             f"{'is' if len(given) == 1 else 'are'} for language models only")
    for text in args.target:
        if looks_like_slo(text):
            raise UserInputError(f"--target {text}: METRIC:STAT:MS targets are for language models; an encoder "
                                 "artifact takes BATCH:MS such as 8:40")
    args.target = [_parse_target(text) for text in args.target]
    report = bench_artifact(args.artifact, batch_sizes=args.batch_sizes, seq_len=args.seq_len,
                            warmup=args.warmup, iterations=args.iterations, threads=args.threads,
                            compare_source=args.compare_source, targets=args.target,
                            percentile=args.percentile, progress=_progress(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_summary(report)
    if not report["passed"]:
        failed = [c["name"] for c in report["checks"] if not c["passed"]]
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def cmd_sign(args) -> int:
    from inferforge.signing import sign_artifact

    signature = sign_artifact(args.artifact, args.key)
    print(f"signed: {signature}\nverify: inferforge inspect {args.artifact} --verify-signature PUBLIC.pem")
    return EXIT_OK


def cmd_inspect(args) -> int:
    from inferforge.manifest import SIGNATURE_NAME, verify_artifact
    from inferforge.registry_refs import resolve_artifact_arg

    args.artifact = resolve_artifact_arg(args.artifact)   # NAME@ALIAS: the registry's stored copy

    # Either check raises ArtifactError (exit 2) when the manifest or a file was changed; the
    # signature check verifies the hashes itself, so the files are read once.
    if args.verify_signature:
        from inferforge.signing import verify_signature

        manifest = verify_signature(args.artifact, args.verify_signature)
        signature = f"[green]signature verified with {args.verify_signature}[/green]"
    else:
        manifest = verify_artifact(args.artifact)
        signature = (f"signed ({SIGNATURE_NAME}), not verified: pass --verify-signature PUBLIC.pem"
                     if (Path(args.artifact) / SIGNATURE_NAME).is_file() else "not signed")
    if args.json:
        print(json.dumps(manifest, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    console = Console()
    src = manifest["source"]
    console.print(f"[bold]{manifest['name']}[/bold]  version {manifest['version']}  created {manifest['created']}")
    runtime = ", ".join(f"{k} {v}" for k, v in manifest.get("runtime", {}).items())
    console.print(f"kind {manifest['kind']}, runtime: {runtime}")
    console.print(f"source {src['model']}  weights sha256 {src['weights_sha256']}")
    console.print(f"hashes: [green]manifest and all {len(manifest['files'])} files verified[/green]; {signature}")
    steps = Table(title="steps")
    for col in ("step", "seconds", "summary"):
        steps.add_column(col)
    for s in manifest["steps"]:
        steps.add_row(s["name"], f"{s['duration_s']:.1f}", s.get("summary", ""))
    console.print(steps)
    files = Table(title="files")
    for col in ("file", "bytes", "sha256"):
        files.add_column(col)
    for name, info in manifest["files"].items():
        files.add_row(name, f"{info['bytes']:,}", info["sha256"][:16] + "...")
    console.print(files)
    _print_summary(manifest)
    env = manifest["environment"]
    console.print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if v))
    return EXIT_OK


def cmd_plan(args) -> int:
    from inferforge.runtime.plan import plan

    result = plan(args.model, memory=args.memory, kv_cache_dtype=args.kv_cache_dtype, weights_dtype=args.weights_dtype,
                  max_context=args.max_context, concurrency=args.concurrency, reserve=args.reserve,
                  max_step_tokens=args.max_step_tokens, device=args.device, cpu_linears=args.cpu_linears)
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    gib = 2**30
    shape = result["model_shape"]
    console = Console()
    if result["weights_from"] == "config.json":
        console.print("no *.safetensors in the directory: the weights' size is computed from config.json "
                      f"({shape['parameters']:,} parameters of a Llama-family decoder at {shape['weights_dtype']})")
    console.print(f"[bold]{args.model}[/bold]: {shape['layers']} layers, {shape['n_heads']} heads / "
                  f"{shape['n_kv_heads']} KV heads x {shape['head_dim']}, context window {shape['context_window']}")
    packed = result["packed_weight_bytes"]
    packed_note = ""
    if packed:
        size = f"{packed / gib:.2f} GiB" if packed >= gib else f"{packed / 2**20:.1f} MiB"
        what = {"auto": "at most (the layout is timed at load; --cpu-linears pins one)",
                "copy": "(--cpu-linears copy)", "onednn": "(--cpu-linears onednn: the tied LM head's copy)"}
        packed_note = f", with {size} of packed CPU projections {what[result['cpu_linears']]}"
    console.print(f"memory {result['memory_bytes'] / gib:.1f} GiB, {result['reserve']:.0%} reserved; weights "
                  f"{result['weight_bytes'] / gib:.2f} GiB ({shape['parameters'] / 1e9:.2f}B parameters, "
                  f"{shape['weights_dtype']}{packed_note}); KV cache {result['kv_cache_dtype']}: "
                  f"{result['kv_bytes_per_token'] / 1024:.0f} KiB per token, {result['kv_tokens']:,} tokens in "
                  f"{result['kv_budget_bytes'] / gib:.2f} GiB after an activation peak of "
                  f"{result['activation_peak_bytes'] / 2**20:.1f} MiB ({result['max_step_tokens']} tokens a step)")
    engine = result["engine"]
    console.print(f"the engine (--memory-budget {result['memory_bytes'] * (1 - result['reserve']) / gib:.2f}GiB) "
                  f"would allocate {engine['num_blocks']:,} blocks of {result['block_size']} tokens for "
                  f"{engine['max_num_seqs']} sequences of {engine['max_context']:,} tokens")
    table = Table(title="largest context for a concurrency")
    table.add_column("concurrent sequences", justify="right")
    table.add_column("max context (tokens)", justify="right")
    for row in result["max_context_by_concurrency"]:
        table.add_row(str(row["concurrency"]), f"{row['max_context']:,}")
    console.print(table)
    table = Table(title="largest concurrency for a context")
    table.add_column("context (tokens)", justify="right")
    table.add_column("max concurrent sequences", justify="right")
    for row in result["max_concurrency_by_context"]:
        note = " (beyond the model's window)" if row["beyond_model_window"] else ""
        table.add_row(f"{row['context']:,}", f"{row['max_concurrency']:,}{note}")
    console.print(table)
    return EXIT_OK


def _check_generate_flags(args) -> None:
    """The sampling and context flags, checked here so a message names the flag that was typed."""
    for flag, value, ok, want in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
                                  ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
                                  ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, ">= 1"),
                                  ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]"),
                                  ("--max-context", args.max_context, args.max_context is None or args.max_context >= 1,
                                   ">= 1"),
                                  ("--sliding-window", args.sliding_window,
                                   args.sliding_window is None or args.sliding_window >= 1, ">= 1"),
                                  ("--sink-tokens", args.sink_tokens, args.sink_tokens >= 0, ">= 0")):
        if not ok:
            raise UserInputError(f"{flag} must be {want}, got {value}")
    if args.truncate_left and args.sliding_window is not None:
        raise UserInputError("choose one context policy: --truncate-left or --sliding-window")
    from inferforge.runtime.kv_budget import memory_kwargs

    memory_kwargs(args)


def _generation_engine(args):
    """The engine for `generate`: an artifact through `inferforge.load` (hashes verified), or a checkpoint."""
    from inferforge.runtime.kv_budget import memory_kwargs
    from inferforge.runtime.load import load_engine

    return load_engine(args.model, command="generate", kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=1,
                       max_context=args.max_context, **memory_kwargs(args))


def cmd_generate(args) -> int:
    from inferforge.registry_refs import resolve_artifact_arg
    from inferforge.runtime.engine import ContextWindowExceeded

    _check_generate_flags(args)
    args.model = str(resolve_artifact_arg(args.model))   # NAME@ALIAS: the registry's stored copy
    engine = _generation_engine(args)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise UserInputError(f"{args.model}: cannot load a tokenizer from the model directory ({e})") from None
    prompt = tokenizer(args.prompt)["input_ids"]
    tokens, printed = [], ""
    stream = engine.stream([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           truncate="left" if args.truncate_left else None, sliding_window=args.sliding_window,
                           sink_tokens=args.sink_tokens)
    try:
        for _, token in stream:
            tokens.append(token)
            if not args.json:
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                print(text[len(printed):], end="", flush=True)
                printed = text
    except ContextWindowExceeded as e:
        raise UserInputError(e.cli_message) from None
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"prompt_tokens": len(prompt), "tokens": tokens, "text": text}))
    else:
        print()
    return EXIT_OK


def cmd_explain(args) -> int:
    from inferforge.optimize.explain import explain

    result = explain(args.model, fmt=args.format, batch=args.batch, gpu=args.gpu)
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    if not result["native"]:
        print(f"{result['format']} on {result['gpu']}: {result['note']}")
        return EXIT_OK
    table = Table(title=f"{result['format']} vs bf16 at batch {result['batch']} on {result['gpu']} "
                        f"(ridge point {result['layers'][0]['ridge']:.0f} FLOP/byte)")
    for col in ("layer", "N x K", "bf16 intensity", "bf16 bound", "intensity", "bound", "predicted speed-up"):
        table.add_column(col, justify="left" if col in ("layer", "bf16 bound", "bound") else "right")
    for r in result["layers"]:
        table.add_row(r["layer"], f"{r['n']} x {r['k']}", f"{r['bf16_intensity']:.1f}", r["bf16_bound"],
                      f"{r['intensity']:.1f}", r["bound"], f"{r['predicted_speedup']:.2f}x")
    console = Console()
    console.print(table)
    measured = result["measured"]
    if measured.get("calibrated_speedup") is not None:
        table = Table(title=f"next to the roofline: {measured['label']}")
        for col in ("layer", "predicted", "measured", "shape measured", "calibrated"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for r in result["layers"]:
            table.add_row(r["layer"], f"{r['predicted_speedup']:.2f}x",
                          f"{r['measured_speedup']:.2f}x" if r["measured_speedup"] else "-", r["measured_shape"],
                          f"{r['calibrated_speedup']:.2f}x")
        console.print(table)
    verdict = "pays" if result["pays"] else "does not pay"
    console.print(f"predicted speed-up of the linear layers: {result['predicted_speedup']:.2f}x ({verdict}); "
                  "an upper bound from the roofline, see inferforge/optimize/explain.py", markup=False)
    for line in explain_measured_lines(result):
        console.print(line, markup=False)
    return EXIT_OK


def explain_measured_lines(result: dict) -> list[str]:
    """What `explain` prints under the table about the kernel measurements for this GPU."""
    measured = result["measured"]
    if measured.get("calibrated_speedup") is None:
        return [f"measured: {measured['note']}" + (f" ({measured['label']}, {measured['source']})"
                                                    if measured.get("label") else "")]
    lines = [f"measured ({measured['label']}, {measured['date'][:10]}, {measured['source']}): calibrated speed-up "
             f"{measured['calibrated_speedup']:.2f}x "
             f"({'pays' if measured['calibrated_speedup'] > 1.0 else 'does not pay: bf16 is faster'}) = the roofline times the share of it the kernels reached "
             "('measured' is per layer shape that was measured; 'calibrated' applies the nearest shape's share)"]
    if measured["flagged"]:
        lines.append(f"FLAGGED: {result['format']} at batch {result['batch']} falls short of the roofline in the "
                     "measurements:")
        lines += [f"  - {reason}" for reason in measured["reasons"]]
    return lines


def _common(p, *, json_flag=True):
    if json_flag:
        p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    # Also accepted after the command; documented once, in the top-level help.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _model_args(p, *, model_help=""):
    p.add_argument("model", help="a Hugging Face model directory, 'all-MiniLM-L6-v2' (the demo model) or "
                                 "module:function" + model_help)
    p.add_argument("-o", "--output", help="artifact directory (default runs/NAME-COMMAND)")
    p.add_argument("--name", help="artifact name (default: the model directory's name)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--min-cosine", type=float, default=0.99, help="accuracy gate on held-out sentences (default 0.99)")
    p.add_argument("--sentences", default="demo", help="text file, one sentence per line (default: shipped sentences)")
    p.add_argument("--calibration-size", type=int, default=160,
                   help="sentences of --sentences that choose the quantization settings (default 160)")
    p.add_argument("--held-out-size", type=int, default=320,
                   help="other sentences of --sentences the accuracy gate is measured on (default 320)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="inferforge", formatter_class=fmt,
                     description="Optimize, validate and benchmark models against accuracy gates and latency targets.",
                     epilog="examples:\n  inferforge optimize                 # the built-in demo, end to end\n"
                            "  inferforge optimize my-recipe.yaml\n  inferforge inspect runs/minilm-int8\n\n"
                            + EXIT_CODES_HELP)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an unexpected error instead of writing it to a log file")
    parser.add_argument("--version", action="version", version=f"inferforge {__import__('inferforge').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("optimize", formatter_class=fmt, help="run a recipe (default: the built-in demo)",
                       description="Run a YAML recipe: export, quantize, validate against the source model, benchmark, "
                                   "and write an artifact with its manifest and reports; or quantize a causal LM "
                                   "(a recipe whose one step is 'quantize' with a 'config', as quantize --config).",
                       epilog="examples:\n  inferforge optimize\n  inferforge optimize recipe.yaml --output runs/v2 --json")
    p.add_argument("recipe", nargs="?", help="recipe YAML file (default: the built-in all-MiniLM-L6-v2 int8 demo)")
    p.add_argument("-o", "--output", help="artifact directory (overrides the recipe's 'output')")
    _common(p)
    p.set_defaults(func=cmd_optimize)

    from inferforge.export_cli import add_export_parser

    add_export_parser(sub, fmt, _model_args, _common)

    p = sub.add_parser("quantize", formatter_class=fmt, help="export and quantize to int8 with an accuracy gate",
                       description="Export to ONNX, quantize to int8 with ONNX Runtime (per-channel weights, SmoothQuant "
                                   "chosen on calibration data), validate on held-out sentences. With --onnx, quantize "
                                   "the fp32 model of an export artifact instead, validated against that model.",
                       epilog="examples:\n  inferforge quantize ./my-bert --min-cosine 0.995 --output runs/my-bert-int8\n"
                              "  inferforge quantize runs/my-bert-onnx --onnx --method static-qdq --calibrate-method "
                              "entropy --output runs/my-bert-qdq\n"
                              "  inferforge quantize ./Llama-3.2-1B --config int4-gptq --calibration text.txt "
                              "--max-ppl-increase 5% --auto-skip\n"
                              "  inferforge quantize ./Llama-3.2-1B --config int8-weight-only --no-gate\n"
                              "--config gate (default on): held-out perplexity increase <= 5% (int8-weight-only, "
                              "w8a8, fp8) or 15% (int4-*), top-1 agreement >= 90%; held out: the last third of the "
                              "--calibration sequences\n"
                              "  inferforge quantize --explain ./Llama-3.2-1B --config int4-g128 --batch 1")
    _model_args(p, model_help="; with --onnx, an export artifact directory")
    p.add_argument("--onnx", action="store_true",
                   help="MODEL is an artifact written by 'inferforge export': quantize its model.onnx (no re-export)")
    p.add_argument("--smoothquant-alpha", default="auto", help="a number in [0, 1], 'auto' or 'off' (default auto)")
    p.add_argument("--smoothquant-scope", choices=["norm", "all"], default="norm",
                   help="SmoothQuant the LayerNorm-fed MatMuls only (norm, default) or every weighted MatMul "
                        "(all: also the attention output and the MLP's second projection; dynamic int8 only)")
    p.add_argument("--method", default="dynamic-int8", choices=["dynamic-int8", "static-qdq"],
                   help="ONNX int8: dynamic activations (CPU serving) or static symmetric QDQ (TensorRT); default dynamic-int8")
    p.add_argument("--calibrate-method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="activation ranges for --method static-qdq (default minmax)")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="ONNX dynamic int8: store the word-embedding table as int8 too, one scale per row (smaller "
                        "file; gated like the rest)")
    p.add_argument("--explain", action="store_true",
                   help="predict, per layer, whether --config pays at --batch on --gpu (roofline), and run nothing")
    p.add_argument("--config", choices=["int8-weight-only", "int4-g128", "int4-gptq", "int4-awq", "w8a8", "fp8"],
                   help="quantize a causal LM (Llama-family) directory to this format instead of the ONNX int8 "
                        "path; or the format for --explain")
    p.add_argument("--calibration", help="with --config: .txt or .jsonl calibration text (needed by int4-gptq, w8a8, "
                                         "gates); with --onnx: calibration sentences, .txt one per line or .jsonl "
                                         "\"text\" fields (default: the first --calibration-size of --sentences)")
    p.add_argument("--num-samples", type=int, default=16,
                   help="with --config: calibration sequences read from --calibration; half as many more are held "
                        "out for the gate (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="with --config: tokens per sequence (default 128)")
    p.add_argument("--max-ppl-increase", type=_share, metavar="SHARE",
                   help="gate: largest held-out perplexity increase, 0.05 or 5%% (default 5%% for int8-weight-only, "
                        "w8a8 and fp8, 15%% for int4-*)")
    p.add_argument("--min-top1-agreement", type=_share, metavar="SHARE",
                   help="gate: smallest share of held-out positions where the quantized model's next-token argmax "
                        "is the original's, 0.9 or 90%% (default 90%%)")
    p.add_argument("--no-gate", action="store_true",
                   help="with --config: write the artifact without comparing it with the original (the manifest "
                        "and report say the gate was off); without it the default gate applies")
    p.add_argument("--max-float-share", type=_share, default=0.5, metavar="SHARE",
                   help="with --config: fail when more than this share of the linear layers stays in float "
                        "(--skip and --auto-skip together), 0.5 or 50%% (default 50%%)")
    p.add_argument("--auto-skip", action="store_true", help="keep the most sensitive layers in float until the gate passes")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN", help="layers kept in float, e.g. lm_head")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--min-speedup", type=float, metavar="X",
                   help="with --config: speed gate, the quantized model must run at least X times faster than bf16 "
                        "(measured on the CUDA GPU; without one the gate is skipped and says so, never passed)")
    p.add_argument("--at-batch", type=int, metavar="B",
                   help="with --min-speedup: sequences per decode step the speed gate measures (default 1)")
    p.add_argument("--batch", type=int, default=1, help="tokens per forward pass for --explain (default 1)")
    p.add_argument("--gpu", default="h100", choices=["h100", "h200", "a100", "l40s"],
                   help="GPU for --explain (default h100)")
    _common(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("bench", formatter_class=fmt, help="benchmark an artifact or LLM server against latency targets",
                       description="Encoder artifacts: latency (p50/p90/p95/p99) at fixed batch sizes and sequence "
                                   "length. Language models (a causal-LM artifact, a model directory, or --url): "
                                   "load generation with TTFT/TPOT/ITL/E2EL against latency SLOs. Exit 1 if a "
                                   "--target is missed, 2 if the run is invalid.",
                       epilog="examples:\n  inferforge bench runs/minilm-int8 --batch-sizes 1 8 --target 8:40 "
                              "--compare-source\n  inferforge bench runs/llama-int4 --scenario server --rate 4 "
                              "--preset mlperf-server\n  inferforge bench --url http://127.0.0.1:8000/v1 --model "
                              "llama --scenario server --sweep --target ttft_ms:p99:500 --vocab-size 128256")
    p.add_argument("artifact", nargs="?", metavar="TARGET",
                   help="artifact directory (a sentence encoder, or a causal LM) or a Llama-family model directory")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], metavar="N",
                   help="encoder: batch sizes to measure (default 1 8)")
    p.add_argument("--seq-len", type=int, default=128, help="encoder: tokens per sequence (default 128)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed iterations (encoder) or warm-up requests (language model) first (default 5)")
    p.add_argument("--iterations", type=int, default=30, help="encoder: timed iterations per batch size (default 30)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's default)")
    p.add_argument("--target", type=_target_shape, action="append", default=[], metavar="TARGET",
                   help="latency target, repeatable. Encoder: BATCH:MS, e.g. 8:40 (batch 8 within 40 ms at "
                        "--percentile). Language model: METRIC:STAT:MS, e.g. ttft_ms:p99:500 (metric ttft_ms, "
                        "tpot_ms, itl_ms or e2el_ms; stat mean, median, p90, p95 or p99)")
    p.add_argument("--percentile", choices=["p50", "p90", "p95", "p99"], default="p95",
                   help="encoder: latency quantile that --target limits (default p95)")
    p.add_argument("--compare-source", action="store_true", help="encoder: also time the source PyTorch model")
    add_llm_bench_args(p)
    _common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("generate", formatter_class=fmt, help="generate text with a Llama-family model",
                       description="Load a Hugging Face Llama / Mistral / Qwen2 directory (tokenizer included) into the "
                                   "engine and stream a completion of --prompt.",
                       epilog="example:\n  inferforge generate ./Llama-3.2-1B --prompt 'The capital of France is' "
                              "--max-new-tokens 20")
    p.add_argument("model", help="Hugging Face decoder directory (config.json, *.safetensors, tokenizer files), or "
                                 "a causal-LM artifact (quantize --config)")
    p.add_argument("--prompt", required=True, help="text to complete, tokenized with the model's tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, help="sample among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens whose probabilities add up to P "
                                               "(default 1: all)")
    p.add_argument("--seed", type=int, help="seed for sampling (default: a random one)")
    p.add_argument("--kv-cache-dtype", choices=["fp32", "fp16", "bf16", "fp8"],
                   help="KV cache dtype (default: the model's dtype)")
    p.add_argument("--max-context", type=int, help="context limit (default: the model's window)")
    p.add_argument("--truncate-left", action="store_true", help="drop the oldest prompt tokens instead of failing")
    p.add_argument("--sliding-window", type=int, metavar="TOKENS",
                   help="keep only the most recent TOKENS (plus --sink-tokens) in the cache: an endless stream "
                        "(default: off, a request must fit the context window)")
    p.add_argument("--sink-tokens", type=int, default=4, help="first tokens kept with --sliding-window (default 4)")
    from inferforge.runtime.kv_budget import CPU_LINEAR_FLAGS, add_memory_flags

    add_memory_flags(p)
    _common(p)
    p.set_defaults(func=cmd_generate)

    from inferforge.runtime.serve_cli import add_serve_parser

    add_serve_parser(sub, fmt)

    p = sub.add_parser("explain", formatter_class=fmt, help="will a quantization format be faster? (roofline)",
                       description="Before anything runs: per linear layer of a decoder, arithmetic intensity against the "
                                   "GPU's ridge point, memory- or compute-bound at the batch, and the predicted speed-up "
                                   "of the format over bf16.",
                       epilog="example:\n  inferforge explain ./Llama-3-8B --format int4-g128 --batch 1 --gpu h100")
    p.add_argument("model", help="Hugging Face decoder directory (config.json)")
    p.add_argument("--format", required=True, choices=["int8-weight-only", "int4-g128", "w8a8", "fp8"],
                   help="quantization format to predict against bf16")
    p.add_argument("--batch", type=int, default=1, help="tokens per forward pass (default 1: decode)")
    p.add_argument("--gpu", default="h100", choices=["h100", "h200", "a100", "l40s"],
                   help="GPU whose peak rates and memory bandwidth are used (default h100)")
    _common(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("plan", formatter_class=fmt, help="KV-cache memory plan: context and concurrency that fit",
                       description="From a decoder's config and safetensors headers (no weights loaded): weights memory, "
                                   "KV bytes per token, the largest context per concurrency and the largest concurrency "
                                   "per context in a memory budget.",
                       epilog="examples:\n  inferforge plan ./Llama-3.2-1B --memory 80GiB\n"
                              "  inferforge plan ./Llama-3.2-1B --memory 24GB --kv-cache-dtype fp8 --max-context 32768")
    p.add_argument("model", help="Hugging Face decoder directory (config.json and *.safetensors)")
    p.add_argument("--memory", required=True, help="memory budget, e.g. 80GiB or 24GB")
    p.add_argument("--kv-cache-dtype", default="bf16", choices=["fp32", "fp16", "bf16", "fp8", "int8"],
                   help="KV cache element type (default bf16)")
    p.add_argument("--weights-dtype", choices=["fp32", "fp16", "bf16", "fp8", "int8", "int4"],
                   help="serving dtype of the weights (default: as stored)")
    p.add_argument("--max-context", type=int, help="also report this context length")
    p.add_argument("--concurrency", type=int, help="also report this number of concurrent sequences")
    p.add_argument("--reserve", type=float, default=0.10,
                   help="fraction kept for runtime overhead: the CUDA context and fragmentation on a GPU "
                        "(default 0.10)")
    p.add_argument("--max-step-tokens", type=int, default=256,
                   help="tokens in the largest engine step, for the activation peak (default 256, as the engine)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where the engine runs (default cuda); cpu counts the packed float projections the CPU "
                        "engine's weight layout may add (see --cpu-linears)")
    p.add_argument("--cpu-linears", choices=list(CPU_LINEAR_FLAGS), default="auto",
                   help="with --device cpu, the engine's --cpu-linears: auto (default) counts the most its timed "
                        "choice can add; a pinned layout what that one adds")
    _common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("inspect", formatter_class=fmt, help="verify and print an artifact's manifest",
                       description="Verify the manifest's digest and every file's sha256 (and, with "
                                   "--verify-signature, the signature) and print what the artifact came from, how it "
                                   "was made and what it measured.",
                       epilog="example:\n  inferforge inspect runs/minilm-int8 --verify-signature public.pem")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--verify-signature", metavar="PUBLIC.pem",
                   help="also check the artifact's signature (inferforge sign) with this PEM public key")
    _common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("sign", formatter_class=fmt, help="sign an artifact with a private key (model-signing)",
                       description="Verify the artifact, then sign every file in it (manifest included) with an "
                                   "elliptic-curve private key using OpenSSF model-signing; the signature is written "
                                   "to model.sig inside the artifact. No network is used.",
                       epilog="example:\n  openssl ecparam -name prime256v1 -genkey -noout -out private.pem\n"
                              "  openssl ec -in private.pem -pubout -out public.pem\n"
                              "  inferforge sign runs/minilm-int8 --key private.pem\n"
                              "  inferforge inspect runs/minilm-int8 --verify-signature public.pem")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--key", required=True, metavar="PRIVATE.pem",
                   help="PEM elliptic-curve private key (P-256, P-384 or P-521), unencrypted")
    p.set_defaults(func=cmd_sign)

    from inferforge.bench.compare import add_report_parser

    add_report_parser(sub, fmt)
    from inferforge.registry_cli import add_registry_parser

    add_registry_parser(sub, fmt)

    from inferforge.drift_cli import add_drift_parser

    add_drift_parser(sub, fmt)
    from inferforge.distill_cli import add_distill_parser

    add_distill_parser(sub, fmt)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_INPUT
    try:
        return args.func(args)
    except GateFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return EXIT_GATE
    except InferforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # The reader went away (`inferforge registry list | head -1`): nothing is wrong; stop writing quietly.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")   # noqa: SIM115 - so the interpreter's final flush cannot fail again
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted: no artifact was written (an earlier artifact, if any, is untouched)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if e.errno in _ENVIRONMENT_ERRNOS or e.errno in _INPUT_ERRNOS:
            return _os_error(e)
        return _unexpected(e, args)
    except MemoryError:
        print("error: out of memory; close other programs, or use a smaller batch or model", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except Exception as e:   # noqa: BLE001 - the last resort: a short message and the traceback in a log
        return _unexpected(e, args)


def _os_error(e: OSError) -> int:
    """A failed file operation as one line: the path, the reason and what to do about it."""
    where = f"{e.filename}: " if e.filename else ""
    reason = e.strerror or str(e)
    if e.errno in _INPUT_ERRNOS:
        print(f"error: {where}{reason}; check the path", file=sys.stderr)
        return EXIT_INPUT
    fixes = {errno.ENOSPC: "free disk space or choose another --output",
             errno.EDQUOT: "free disk space or choose another --output",
             errno.EROFS: "choose a writable --output directory",
             errno.EACCES: "check the permissions, or choose a writable --output directory",
             errno.EPERM: "check the permissions, or choose a writable --output directory"}
    print(f"error: {where}{reason}; {fixes.get(e.errno, 'check the machine and run again')}", file=sys.stderr)
    return EXIT_ENVIRONMENT


def _unexpected(e: BaseException, args) -> int:
    """An exception nothing above expects: exit 3 with a one-line message and the traceback in a log file
    (`--debug` or INFERFORGE_DEBUG=1: the traceback on stderr instead)."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    summary = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
    if getattr(args, "debug", False) or os.environ.get("INFERFORGE_DEBUG") == "1":
        print(text, end="", file=sys.stderr)
        print(f"error: unexpected {summary}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    log_dir = Path(os.environ.get("INFERFORGE_LOG_DIR") or Path(tempfile.gettempdir()) / "inferforge-logs")
    log = log_dir / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        log.write_text(f"inferforge {' '.join(sys.argv[1:])}\n\n{text}", encoding="utf-8")
    except OSError:
        print(text, end="", file=sys.stderr)
        log = None
    where = f"the traceback is in {log}" if log else "the traceback is above"
    print(f"error: unexpected {summary[:300]}\n{where}; run again with --debug to print it, and please report "
          "it with that file", file=sys.stderr)
    return EXIT_ENVIRONMENT


if __name__ == "__main__":
    sys.exit(main())
