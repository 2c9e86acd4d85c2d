"""`inferforge bench` for language models: the flags and the command body (called from inferforge/cli.py)."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from pathlib import Path

from inferforge.errors import UserInputError

SCENARIOS = ("generate", "server")
LLM_ONLY_FLAGS: list[tuple[str, str, object]] = []     # (dest, flag, default) of the language-model group


def llm_flags_given(args) -> list[str]:
    """The language-model-only flags whose value differs from their default (an encoder run ignores them)."""
    return [flag for dest, flag, default in LLM_ONLY_FLAGS if getattr(args, dest, default) != default]


def add_llm_bench_args(p) -> None:
    """The language-model flags of `inferforge bench` (TARGET, --target, --warmup are shared); an encoder TARGET
    with any of them set to a non-default value is refused (`llm_flags_given`)."""
    g = p.add_argument_group("language models (a causal-LM artifact, a model directory, or --url)")
    g.add_argument("--url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (needs --model)")
    g.add_argument("--model", help="the model name the server serves (--url)")
    g.add_argument("--scenario", choices=SCENARIOS, default="generate",
                   help="generate: every request at t=0 (offline); server: --rate, --concurrency or --sweep")
    g.add_argument("--rate", type=float, help="server: requests/s, Poisson arrivals (gamma with --burstiness); "
                                              "with --sweep the starting rate (default 1)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival gaps (1 = Poisson)")
    g.add_argument("--concurrency", type=int, help="server: closed loop, C clients each with one request at a time")
    g.add_argument("--sweep", action="store_true", help="server: find the highest rate at which every target holds")
    g.add_argument("--sweep-doublings", type=int, default=6, help="sweep: most doublings (halvings) (default 6)")
    g.add_argument("--sweep-bisections", type=int, default=3, help="sweep: bisection steps afterwards (default 3)")
    g.add_argument("--dataset", help="prompts: a text file (one per line) or JSONL {prompt, output_len?}")
    g.add_argument("--num-requests", type=int, default=100, help="measured requests per run point (default 100)")
    g.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals (default 0)")
    for name, default in (("input-len", 128), ("output-len", 128)):
        g.add_argument(f"--{name}", type=int, default=default,
                       help=f"{name.split('-')[0]} tokens per request, the mean of --{name}-dist (default {default})")
        g.add_argument(f"--{name}-dist", choices=["fixed", "uniform", "normal"], default="fixed",
                       help=f"distribution of --{name} (default fixed)")
        g.add_argument(f"--{name}-range", type=float, help="uniform: mean*(1-R) .. mean*(1+R)")
        g.add_argument(f"--{name}-min", type=int, help="uniform: smallest length (with -max)")
        g.add_argument(f"--{name}-max", type=int, help="uniform: largest length; normal: clip above")
        g.add_argument(f"--{name}-std", type=float, help="normal: standard deviation")
    g.add_argument("--vocab-size", type=int, help="--url with synthetic prompts: token ids are drawn below this")
    g.add_argument("--tokenizer", help="--url: a tokenizer directory (its vocabulary size for synthetic prompts)")
    g.add_argument("--targets", dest="targets_file", metavar="FILE.yaml", help="targets: a YAML list of "
                   "{metric, percentile, limit_ms} (also accepted: --target METRIC:STAT:MS, repeatable)")
    g.add_argument("--preset", choices=["mlperf-server", "mlperf-interactive", "chat"],
                   help="targets: mlperf-server (TTFT p99 2000, TPOT p99 100 ms), mlperf-interactive (500, 30 ms), "
                        "chat (inferforge's own: TTFT p95 1000, ITL p95 100 ms)")
    g.add_argument("--max-num-seqs", type=int, default=8, help="in-process engine: sequence slots (default 8)")
    g.add_argument("--max-failed-pct", type=float, default=1.0,
                   help="more failed requests than this share (%%) makes the run invalid (default 1)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="--url: seconds per request (default 600)")
    g.add_argument("-o", "--output", help="run directory (default runs/bench-TIMESTAMP)")
    LLM_ONLY_FLAGS[:] = [(a.dest, a.option_strings[-1], a.default) for a in g._group_actions]


def _length(args, name: str, mean: int):
    from inferforge.bench.serving.workload import LengthDist

    key = name.replace("-", "_")
    return LengthDist(kind=getattr(args, f"{key}_dist"), mean=mean, range_ratio=getattr(args, f"{key}_range"),
                      std=getattr(args, f"{key}_std"), min=getattr(args, f"{key}_min"),
                      max=getattr(args, f"{key}_max"), name=name)


def _load_config(args):
    from inferforge.bench.serving.schedule import LoadConfig

    if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
        if args.rate == math.inf:
            raise UserInputError("--rate inf: every request at t=0 is the offline scenario; use --scenario generate "
                                 "(a finite --rate is an open-loop Poisson load)")
        raise UserInputError(f"--rate must be a finite number > 0 requests/s, got {args.rate}")
    chosen = [f for f, on in (("--rate", args.rate is not None and not args.sweep),
                              ("--concurrency", args.concurrency is not None), ("--sweep", args.sweep)) if on]
    if args.scenario == "generate":
        if chosen:
            raise UserInputError(f"--scenario generate submits every request at t=0; {chosen[0]} needs --scenario server")
        return LoadConfig(mode="offline", burstiness=args.burstiness)
    if len(chosen) != 1:
        raise UserInputError("--scenario server needs exactly one of --rate R, --concurrency C or --sweep"
                             + (f" (got {' and '.join(chosen)})" if chosen else ""))
    if args.sweep:
        return LoadConfig(mode="sweep", rate=args.rate or 1.0, burstiness=args.burstiness,
                          sweep_max_doublings=args.sweep_doublings, sweep_bisections=args.sweep_bisections)
    if args.concurrency is not None:
        return LoadConfig(mode="concurrency", concurrency=args.concurrency, burstiness=args.burstiness)
    return LoadConfig(mode="rate", rate=args.rate, burstiness=args.burstiness)


def _targets(args) -> list:
    from inferforge.bench.serving.targets import load_targets_file, parse_target, preset

    targets = [parse_target(t) for t in args.target]
    if args.targets_file:
        targets += load_targets_file(args.targets_file)
    if args.preset:
        targets += preset(args.preset)
    return targets


def _tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserInputError(f"{path}: cannot load a tokenizer ({e})") from None


class _SweepStopped(Exception):
    """A sweep point had too few samples for a target: no other rate can decide it."""


def _check_token_ids(requests, vocab_size: int | None, dataset: str | None) -> None:
    """In-process: every prompt token id must be an embedding row of the model."""
    if not vocab_size:
        return
    for r in requests:
        if isinstance(r.prompt, list):
            bad = next((t for t in r.prompt if not 0 <= t < vocab_size), None)
            if bad is not None:
                source = f"--dataset {Path(dataset).name}" if dataset else "the workload"
                raise UserInputError(f"{source}: request {r.id} has token id {bad}, outside the model's vocabulary "
                                     f"(0..{vocab_size - 1})")


async def _measure(backend, requests, load, targets, *, warmup: int, seed: int, max_failed_pct: float, progress):
    from inferforge.bench.serving import results, runner
    from inferforge.bench.serving.targets import INSUFFICIENT

    if warmup:
        with progress.spinner(f"warm-up: {warmup} requests"):
            warm = await runner.warm_up(backend, requests[:warmup])
        if not any(r.success for r in warm):
            raise runner.AllFailed(f"every warm-up request ({warmup}) failed, so the measured ones would too; first "
                                   f"error: {warm[0].error}")
    measured = requests[warmup:]
    points, records_of = [], {}

    async def point(config):
        task = progress.task(f"rate {config.rate:g}/s" if config.mode == "rate" else config.mode, total=len(measured))
        try:
            records = await runner.run_point(backend, measured, config, seed=seed, on_done=task.advance,
                                             stop_after_failures=None if warmup else runner.FIRST_FAILURES)
        finally:
            task.close()
        summary = results.summarize_point(records, load=config, targets=targets, max_failed_pct=max_failed_pct)
        points.append(summary)
        records_of[len(points) - 1] = records
        return summary

    if load.mode == "sweep":
        async def meets(rate):
            summary = await point(load.at_rate(rate))
            if any(t["status"] == INSUFFICIENT for t in summary["targets"]):
                # Another rate gives no more samples: the sweep stops here instead of halving the rate on and on.
                raise _SweepStopped
            return results.meets(summary)

        try:
            await runner.sweep_rates(load.rate, meets, max_doublings=load.sweep_max_doublings,
                                     bisections=load.sweep_bisections)
        except _SweepStopped:
            pass
    else:
        await point(load)
    return points, records_of


def cmd_bench_llm(args) -> int:
    """Benchmark a causal LM (in-process engine or --url server) against latency targets; see README."""
    from inferforge.bench.serving import backends, output, results
    from inferforge.bench.serving.targets import check_sample_counts
    from inferforge.bench.serving.workload import WorkloadConfig, build_workload, length_stats
    from inferforge.checkpoint_files import read_config
    from inferforge.manifest import environment, utc_now
    from inferforge.progress import Progress

    load, targets = _load_config(args), _targets(args)
    out = Path(args.output or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    output.check_output_dir(out)
    if load.mode == "sweep" and not targets:
        raise UserInputError("--sweep searches for the highest rate that meets the targets: give --target, --targets "
                             "or --preset")
    workload = WorkloadConfig(num_requests=args.num_requests, input_len=_length(args, "input-len", args.input_len),
                              output_len=_length(args, "output-len", args.output_len), dataset=args.dataset,
                              seed=args.seed, warmup=args.warmup)
    progress = Progress(quiet=args.quiet or args.json)
    created, start_load = utc_now(), results.load_average()
    if args.url:
        if not args.model:
            raise UserInputError("--url needs --model NAME, the model name the server serves")
        vocab, tokenize = args.vocab_size, None
        if args.tokenizer:
            vocab = vocab or len(_tokenizer(args.tokenizer))
        requests = build_workload(workload, vocab_size=vocab, tokenize=tokenize)
        check_sample_counts(targets, [r.output_len for r in requests[workload.warmup:]])
        target = {"backend": "openai-http", "model": args.model, "url": args.url}
        backend = backends.OpenAIHTTPBackend(args.url, args.model, timeout_s=args.request_timeout)
        engine = None
    else:
        if not args.artifact:
            raise UserInputError("give TARGET (a causal-LM artifact or model directory) or --url URL --model NAME")
        path = Path(args.artifact)
        config = read_config(path, what="a causal-LM artifact or a Llama-family model directory")
        tokenize = None
        if args.dataset:
            loaded = {}

            def tokenize(text):       # the tokenizer loads only for text prompts (JSONL token ids need none)
                if "tok" not in loaded:
                    loaded["tok"] = _tokenizer(path)
                return loaded["tok"](text)["input_ids"]
        requests = build_workload(workload, vocab_size=config.get("vocab_size"), tokenize=tokenize)
        check_sample_counts(targets, [r.output_len for r in requests[workload.warmup:]])
        _check_token_ids(requests, config.get("vocab_size"), args.dataset)
        longest = max(len(r.prompt) + r.output_len for r in requests)
        window = config.get("max_position_embeddings") or longest
        if longest > window:
            raise UserInputError(f"the longest request (prompt + output = {longest} tokens) exceeds the model's context "
                                 f"window ({window}); lower --input-len / --output-len")
        with progress.spinner("loading the engine"):
            engine = backends.load_engine(path, max_num_seqs=args.max_num_seqs, max_context=longest)
        target = backends.engine_target(engine, path)
        backend = None

    async def main():
        nonlocal backend
        async_engine = None
        if engine is not None:
            from inferforge.runtime.async_engine import AsyncEngine

            async_engine = AsyncEngine(engine)
            async_engine.start()
            backend = backends.EngineBackend(async_engine)
        try:
            return await _measure(backend, requests, load, targets, warmup=workload.warmup, seed=args.seed,
                                  max_failed_pct=args.max_failed_pct, progress=progress)
        finally:
            await backend.close()
            if async_engine is not None:
                async_engine.shutdown()

    points, records_of = asyncio.run(main())
    measured = requests[workload.warmup:]
    env = environment()
    end_load = results.load_average()
    env.update({"load_average": start_load, "busy_warning": results.busy_warning(start_load, end_load)})
    workload_info = {"settings": workload.settings(),
                     "input_tokens": length_stats(r.prompt_tokens for r in measured),
                     "output_tokens": length_stats(r.output_len for r in measured)}
    report = results.build_report(points, sweep=load.mode == "sweep", target=target, scenario=args.scenario,
                                  workload=workload_info, load=load, environment=env, created=created)
    rows = []
    for index, records in records_of.items():
        for r in records:
            row = r.as_row()
            if load.mode == "sweep":
                row["rate"] = points[index]["load"]["rate"]
            rows.append(row)
    output.write_outputs(out, report, rows)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report, out)
    for line in results.verdict_lines(report):
        print(line, file=sys.stderr)
    return results.exit_code(report)


def _print_table(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from inferforge.bench.serving.metrics import LATENCY_METRICS

    table = Table(title=f"{report['target']['model']}: {report['completed']} completed, {report['failed']} failed, "
                        f"{report['duration']:.2f} s, {report['request_throughput'] or 0:.2f} req/s, "
                        f"{report['output_throughput'] or 0:.1f} output tokens/s")
    for col in ("metric (ms)", "mean", "median", "p90", "p95", "p99"):
        table.add_column(col, justify="right")
    for m in LATENCY_METRICS:
        table.add_row(m, *("-" if report[f"{s}_{m}"] is None else f"{report[f'{s}_{m}']:.2f}"
                           for s in ("mean", "median", "p90", "p95", "p99")))
    console = Console()
    console.print(table)
    for t in report["targets"]:
        measured = "-" if t["measured"] is None else format(t["measured"], ".2f")
        if t["status"] == "insufficient samples":
            verdict = f"INSUFFICIENT SAMPLES ({t['samples']} of {t['needed']} needed; measured {measured} ms)"
        else:
            verdict = f"{'PASS' if t['passed'] else 'MISS'} (measured {measured} ms)"
        console.print(f"{t['percentile']} {t['metric']} <= {t['limit_ms']:g}: {verdict}", highlight=False)
    console.print(f"report: {out}/report.md", highlight=False)
