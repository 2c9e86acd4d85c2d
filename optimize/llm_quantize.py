"""Quantize a Hugging Face causal LM directory into an artifact (the `inferforge quantize --config` path).

Steps: check the directory holds a Llama / Mistral / Qwen2 causal LM (an encoder is refused with the
encoder path to use), load it (float32), read the calibration text (the first `num_samples`
sequences calibrate, the next `num_samples // 2` are held out), quantize with the chosen format,
compare with the original on the held-out sequences (perplexity change, top-1 agreement, KL) and
apply the gate, which is on by default (`LMGate.default`) and off only when asked. A run that keeps
more than `max_float_share` of the linear layers in float (by skip patterns and auto-skip together)
fails: such an artifact would be called quantized while it mostly is not. Nothing is written unless
every check passed; then the artifact gets quantized safetensors + quantization.json + config and
tokenizer files + report.md / report.json + manifest. `inferforge.load(DIR)` returns an `LLMEngine`
running the quantized layers on the toolkit's kernels.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from inferforge.errors import GateFailed, UserInputError

FORMATS = ("int8-weight-only", "int4-g128", "int4-gptq", "int4-awq", "w8a8", "fp8")
CALIBRATED_FORMATS = ("int4-gptq", "int4-awq", "w8a8")   # these need calibration text
DEFAULT_MAX_FLOAT_SHARE = 0.5
# What to try when a format keeps too many layers in float: a milder format for each one.
MILDER = {"int4-g128": "int4-awq or int4-gptq (calibrated), or int8-weight-only",
          "int4-gptq": "int4-awq or int8-weight-only", "int4-awq": "int4-gptq or int8-weight-only",
          "w8a8": "int8-weight-only", "fp8": "int8-weight-only",
          "int8-weight-only": "none is milder: keep this model in float, or check the held-out text"}
# How messages name the options: the command line's flags, or a recipe's keys.
CLI_NAMES = {"auto_skip": "--auto-skip", "no_gate": "--no-gate", "calibration": "--calibration FILE",
             "num_samples": "--num-samples", "seq_len": "--seq-len",
             "max_float_share": "--max-float-share", "gate": "--max-ppl-increase / --min-top1-agreement",
             "skip": "--skip", "min_speedup": "--min-speedup"}
RECIPE_NAMES = {"auto_skip": "auto_skip: true", "no_gate": "gate: none", "calibration": "calibration: FILE",
                "num_samples": "num_samples", "seq_len": "seq_len",
                "max_float_share": "max_float_share", "gate": "gate: {max_ppl_increase: ..., min_top1_agreement: ...}",
                "skip": "skip pattern", "min_speedup": "min_speedup"}
DEFAULT_GATE = "default"


def make_config(fmt: str, skip: tuple[str, ...] = (), group_size: int = 128):
    from inferforge.optimize.quantize import FP8, W8A8, Int4WeightOnly, Int8WeightOnly

    factories = {"int8-weight-only": lambda: Int8WeightOnly(skip=skip),
                 "int4-g128": lambda: Int4WeightOnly(group_size=group_size, skip=skip),
                 "int4-gptq": lambda: Int4WeightOnly(group_size=group_size, method="gptq", skip=skip),
                 "int4-awq": lambda: Int4WeightOnly(group_size=group_size, method="awq", skip=skip),
                 "w8a8": lambda: W8A8(skip=skip), "fp8": lambda: FP8(skip=skip)}
    if fmt not in factories:
        raise UserInputError(f"--config {fmt!r}: choose one of {', '.join(FORMATS)}")
    return factories[fmt]()


def check_causal_lm_dir(model_dir: Path) -> dict:
    """The directory's config.json when it holds a Llama / Mistral / Qwen2 causal LM; otherwise a
    `UserInputError` that says which path handles what it holds (an encoder: the ONNX int8 path)."""
    from inferforge.checkpoint_files import read_config
    from inferforge.runtime.llama import SUPPORTED

    config = read_config(model_dir, what="a Hugging Face causal LM directory")   # named errors for a bad file
    architectures = [str(a) for a in config.get("architectures") or []]
    model_type = config.get("model_type")
    if not any(a.endswith("ForCausalLM") for a in architectures):
        found = ", ".join(architectures) or f"model_type {model_type!r}"
        raise UserInputError(f"{model_dir} holds {found}, not a causal LM, and --config formats are judged by "
                             "language-model metrics; quantize an encoder with `inferforge quantize MODEL` "
                             "(without --config: ONNX int8 with the embedding-cosine gate), or export it and run "
                             "`inferforge quantize ARTIFACT --onnx`")
    if model_type not in SUPPORTED:
        raise UserInputError(f"{model_dir}: model_type {model_type!r} is not supported; quantized artifacts run on "
                             f"the engine, which runs {', '.join(SUPPORTED)} checkpoints")
    return config


def _resolve_gate(gate, fmt: str):
    from inferforge.optimize.lm_eval import LMGate

    return LMGate.default(fmt) if isinstance(gate, str) and gate == DEFAULT_GATE else gate


def _allowed_in_float(total: int, max_float_share: float) -> int:
    # Compared as integers: exactly the stated share is allowed, one layer more is not.
    return math.floor(max_float_share * total + 1e-9)


def _name_layers(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _float_share_failure(fmt, float_layers, total, max_float_share, names, *, gate_failures=()) -> GateFailed:
    allowed = _allowed_in_float(total, max_float_share)
    if len(float_layers) >= total and not gate_failures:
        return GateFailed(f"not quantized: all {total} linear layers would stay in float ({_name_layers(float_layers)}), "
                          "and an artifact that quantizes nothing is not a quantized model; no artifact was written. "
                          f"Skip fewer layers, or try a milder format: {MILDER[fmt]}")
    limit = f"{names['max_float_share']} {max_float_share:.0%} allows {allowed} of {total}"
    if gate_failures:
        what = (f"the gate is still missed ({'; '.join(gate_failures)}) with {len(float_layers)} of {total} linear "
                f"layers in float ({_name_layers(float_layers)}), and keeping more in float is more than {limit}")
    else:
        what = (f"{len(float_layers)} of {total} linear layers would stay in float ({_name_layers(float_layers)}), "
                f"more than {limit}")
    return GateFailed(f"not quantized enough: {what}; no artifact was written. Try a milder format: {MILDER[fmt]}; "
                      f"or allow more with {names['max_float_share']}")


def quantize_checkpoint(model_dir, out_dir, *, fmt: str, calibration_file=None, num_samples: int = 16,
                        seq_len: int = 128, gate=DEFAULT_GATE, auto_skip: bool = False, skip: tuple[str, ...] = (),
                        group_size: int = 128, max_float_share: float = DEFAULT_MAX_FLOAT_SHARE, progress=None,
                        name: str | None = None, recipe: dict | None = None, names: dict = CLI_NAMES,
                        speed_gate=None) -> dict:
    """Quantize `model_dir` to the artifact `out_dir`; returns the manifest.

    `gate`: "default" (`LMGate.default(fmt)`), an `LMGate`, or None to turn it off (recorded in the
    manifest). A missed gate, or more than `max_float_share` of the linear layers kept in float,
    raises `GateFailed` and writes nothing. `name` (default: the output directory's name) and the
    normalized `recipe`, when a recipe ran this, go to the manifest; `names` words the messages
    (`CLI_NAMES` or `RECIPE_NAMES`). `speed_gate` (a `SpeedGate`) compares the quantized model's speed
    with bf16's on a CUDA GPU (see optimize/speed_gate.py): missed, it raises `GateFailed`, writes nothing
    at `out_dir` and leaves the reports in `OUT.failed/`; without a GPU it is recorded as skipped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inferforge.checkpoint_files import check_safetensors_files
    from inferforge.manifest import check_output_dir
    from inferforge.optimize.calibration import load_token_batches
    from inferforge.optimize.lm_eval import LMGate, compare_lms
    from inferforge.optimize.quantize import quantize

    model_dir, out = Path(model_dir), Path(out_dir).resolve()
    config = check_causal_lm_dir(model_dir)
    check_safetensors_files(model_dir)    # a truncated safetensors file is named before any work
    quant_config = make_config(fmt, tuple(skip), group_size)
    gate = _resolve_gate(gate, fmt)
    if gate is not None and not isinstance(gate, LMGate):
        raise UserInputError(f"gate must be 'default', an LMGate or None (off), got {gate!r}")
    if not 0 <= max_float_share <= 1:
        raise UserInputError(f"{names['max_float_share']} must be a share between 0 and 1 (0.5 or 50%), "
                             f"got {max_float_share}")
    if auto_skip and gate is None:
        raise UserInputError(f"{names['auto_skip']} keeps layers in float until the gate passes; it cannot run with "
                             f"{names['no_gate']}")
    needs_data = fmt in CALIBRATED_FORMATS
    if calibration_file is None and needs_data:
        raise UserInputError(f"--config {fmt} needs {names['calibration']} (.txt or .jsonl): it calibrates on that "
                             "text, and the gate compares with the original on the part held out")
    if calibration_file is None and gate is not None:
        raise UserInputError(
            f"--config {fmt} checks a gate ({gate.describe()}) on held-out text: pass {names['calibration']} (.txt, "
            f"one text per line, or .jsonl; {num_samples + max(1, num_samples // 2)} sequences of {seq_len} tokens "
            f"are read, the last third held out), or {names['no_gate']} to write the artifact unchecked "
            "(its manifest then says the gate was off)")
    check_output_dir(out)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    by_pattern = [n for n in linears if any(fnmatch.fnmatch(n, p) for p in quant_config.skip)]
    unmatched = [p for p in quant_config.skip if not any(fnmatch.fnmatch(n, p) for n in linears)]
    if unmatched:
        raise UserInputError(f"{names['skip']} {unmatched[0]!r} matches no linear layer of {model_dir}; layers are "
                             f"named like {linears[0]!r} or {linears[-1]!r} (fnmatch patterns: 'lm_head', "
                             "'*.mlp.down_proj', 'model.layers.0.*')")
    allowed = _allowed_in_float(len(linears), max_float_share)
    if len(by_pattern) > allowed:
        raise _float_share_failure(fmt, by_pattern, len(linears), max_float_share, names)
    calibration = held_out = None
    data_record = None
    if calibration_file is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        held = max(1, num_samples // 2)
        hint = (f"{num_samples + held} were asked for ({num_samples} to calibrate, {held} held out for the gate): give "
                f"more text or lower {names['num_samples']} / {names['seq_len']}")
        batches = load_token_batches(calibration_file, tokenizer, num_samples=num_samples + held, seq_len=seq_len,
                                     progress=progress, too_short_hint=hint)
        calibration, held_out = batches[:num_samples], batches[num_samples:]
        data_record = {"file": Path(calibration_file).name, "seq_len": seq_len,
                       "calibration_sequences": len(calibration), "held_out_sequences": len(held_out),
                       "calibration_sha256": _tokens_sha256(calibration), "held_out_sha256": _tokens_sha256(held_out)}
    from inferforge.optimize import speed_gate as speed

    measure_speed = speed_gate is not None and speed.cuda_available()
    original = copy.deepcopy(model) if (held_out and gate is None) or measure_speed else None
    report = quantize(model, quant_config, calibration=calibration if needs_data else None, gate=gate,
                      eval_data=held_out if gate is not None else None, auto_skip=auto_skip,
                      max_auto_skipped=allowed - len(by_pattern), raise_on_gate=False)
    float_layers = report.skipped + report.auto_skipped
    if report.gate_failures:
        if auto_skip and len(float_layers) >= allowed and report.layers:
            raise _float_share_failure(fmt, float_layers, len(linears), max_float_share, names,
                                       gate_failures=report.gate_failures)
        hint = "" if auto_skip else f"; {names['auto_skip']} keeps the most sensitive layers in float"
        raise GateFailed(f"quantization gate missed: {'; '.join(report.gate_failures)} (limits: {gate.describe()}); "
                         f"no artifact was written{hint}, or try a milder format: {MILDER[fmt]}")
    if len(float_layers) > allowed or not report.layers:
        raise _float_share_failure(fmt, float_layers, len(linears), max_float_share, names)
    if original is not None and held_out and gate is None:
        report.metrics = compare_lms(original, model, held_out)
    speed_record = None
    if speed_gate is not None:
        speed_record = speed.evaluate(speed_gate, original, model, vocab_size=config["vocab_size"]) \
            if measure_speed else speed.skipped(speed_gate)
        if speed_record["status"] == "failed":
            _fail_speed_gate(out, fmt, speed_record, report, names)
    dispatch_rows = None
    if speed.cuda_available() and fmt not in ("w8a8", "fp8"):
        # Which kernel each weight-only layer runs at the measured batch sizes, from the dispatcher's cache.
        from inferforge.kernels.weight_only_dispatch import dispatch_report

        batches = sorted({1, speed_gate.at_batch if speed_gate is not None else 1})
        dispatch_rows = dispatch_report(model, batches, gpu=torch.cuda.get_device_name())
    return _write_artifact(model, report, out, model_dir=model_dir, config=config, fmt=fmt, gate=gate,
                           layers_total=len(linears), max_float_share=max_float_share, data_record=data_record,
                           settings={"format": fmt, "skip": list(skip), "group_size": group_size,
                                     "num_samples": num_samples, "seq_len": seq_len, "auto_skip": auto_skip,
                                     "max_float_share": max_float_share},
                           started=started, name=name, recipe=recipe, names=names,
                           snapshot_texts=_snapshot_texts(calibration_file)
                           if calibration_file is not None else None, speed_record=speed_record,
                           dispatch_rows=dispatch_rows)


def _fail_speed_gate(out: Path, fmt: str, record: dict, report, names: dict):
    """Write the reports of a run that missed its speed gate to `OUT.failed/` and raise `GateFailed`."""
    from inferforge.manifest import write_failed_report
    from inferforge.optimize.speed_gate import describe_record

    line = describe_record(record)
    body = {"artifact": None, "passed": False, "kind": "quantized-causal-lm", "quantization": {"format": fmt},
            "speed_gate": record, "validation": report.metrics, "sqnr_db": report.layers}
    md = (f"# {out.name}: not written\n\n{line}\n\nThe {fmt} model is not faster than bf16 by the required "
          "factor on this GPU, so no artifact was written.\n")
    failed = write_failed_report(out, {"report.json": json.dumps(body, indent=2, default=str) + "\n", "report.md": md})
    raise GateFailed(f"{line}; no artifact was written (reports in {failed}). {fmt} does not pay at this batch size "
                     f"on this GPU: try w8a8 or fp8, which run on int8/fp8 tensor cores, another batch size, or lower "
                     f"{names.get('min_speedup', '--min-speedup')}")


def _snapshot_texts(calibration_file, limit: int = 200) -> list[str]:
    """The calibration file's first `limit` documents: the drift snapshot is taken over them, one
    document at a time (the calibration sequences themselves are cut from the first of them)."""
    from inferforge.optimize.calibration import read_texts

    return read_texts(calibration_file)[:limit]


def _tokens_sha256(batches: list[torch.Tensor]) -> str:
    return hashlib.sha256(torch.cat(batches).numpy().tobytes()).hexdigest()


def _write_artifact(model, report, out: Path, *, model_dir: Path, config: dict, fmt: str, gate, layers_total: int,
                    max_float_share: float, data_record: dict | None, settings: dict, started: float,
                    name: str | None, recipe: dict | None, names: dict, snapshot_texts=None,
                    speed_record: dict | None = None, dispatch_rows: list | None = None) -> dict:
    from inferforge.artifact import CHECKPOINT_FILES
    from inferforge.bench.report import render_causal_lm_markdown
    from inferforge.fileio import atomic_write_json, atomic_write_text
    from inferforge.manifest import environment, staged_artifact, tool_versions, utc_now, write_manifest
    from inferforge.models import weights_sha256
    from inferforge.optimize.lm_eval import LMGate
    from inferforge.optimize.quantize import save_quantized

    float_layers = report.skipped + report.auto_skipped
    checks = gate.checks(report.metrics) if gate is not None else []
    allowed = _allowed_in_float(layers_total, max_float_share)
    checks.append({"name": "layers kept in float", "kind": "gate", "measured": len(float_layers), "op": "<=",
                   "limit": allowed, "passed": len(float_layers) <= allowed})
    default = LMGate.default(fmt)
    gate_record = {"enabled": gate is not None,
                   "limits": None if gate is None else {"max_ppl_increase": gate.max_ppl_increase,
                                                        "min_top1_agreement": gate.min_top1_agreement,
                                                        "max_kl": gate.max_kl},
                   "default_limits": {"max_ppl_increase": default.max_ppl_increase,
                                      "min_top1_agreement": default.min_top1_agreement},
                   "note": (f"turned off ({names['no_gate']}): the quantized model was not checked against the "
                            "original" if gate is None else f"{gate.describe()} on held-out text")}
    summary = (f"{len(report.layers)} layers quantized, {len(report.skipped)} skipped, "
               f"{len(report.auto_skipped)} kept in float by auto-skip")
    spec_type = config.get("model_type")
    body = {
        "name": name or out.name, "created": utc_now(), "kind": "quantized-causal-lm",
        "runtime": {"format": fmt, "engine": "inferforge.runtime.engine.LLMEngine", "model_type": spec_type},
        "source": {"model": str(model_dir), "path": str(model_dir.resolve()), "weights_sha256": weights_sha256(model_dir)},
        "steps": [{"name": "quantize", "settings": settings, "duration_s": time.perf_counter() - started,
                   "tools": tool_versions(), "summary": summary}],
        "quantization": {"format": fmt, "layers_total": layers_total, "layers_quantized": len(report.layers),
                         "skipped": report.skipped, "auto_skipped": report.auto_skipped,
                         "float_share": len(float_layers) / layers_total if layers_total else 0.0,
                         "max_float_share": max_float_share,
                         "worst_layers": [{"layer": n, "sqnr_db": v} for n, v in report.worst(5)],
                         "calibration_sha256": data_record and data_record["calibration_sha256"],
                         "held_out_sha256": data_record and data_record["held_out_sha256"], "data": data_record},
        "gate": gate_record, "validation": report.metrics, "checks": checks, "passed": True, "accuracy_passed": True,
        "environment": environment(),
    }
    if dispatch_rows is not None:
        body["dispatch"] = dispatch_rows
    if speed_record is not None:    # "skipped" stays out of checks: it is recorded here, never counted as passed
        body["speed_gate"] = speed_record
        if speed_record["status"] == "skipped":     # top level, so a job reading `passed` sees it too
            body["skipped_checks"] = [{"name": speed_record["name"], "reason": speed_record["reason"]}]
        if speed_record["status"] == "passed":
            checks.append({k: speed_record[k] for k in ("name", "kind", "measured", "op", "limit", "passed")})
    with staged_artifact(out) as staging:
        save_quantized(model, staging, report)
        for file_name in CHECKPOINT_FILES:
            if (model_dir / file_name).is_file():
                shutil.copyfile(model_dir / file_name, staging / file_name)
        # The reports carry no absolute paths: the source as it was given, the artifact by name.
        report_json = {**body, "artifact": out.name, "sqnr_db": report.layers,
                       "source": {"model": model_dir.name, "weights_sha256": body["source"]["weights_sha256"]}}
        atomic_write_json(staging / "report.json", report_json)
        speed_md = ""
        if speed_record is not None:
            from inferforge.optimize.speed_gate import describe_record

            speed_md = f"\n## Speed gate\n\n{describe_record(speed_record)}\n"
        atomic_write_text(staging / "report.md", render_causal_lm_markdown(report_json) + speed_md)
        if snapshot_texts:
            from transformers import AutoTokenizer

            from inferforge.optimize.drift import build_lm_snapshot, write_snapshot

            snapshot = build_lm_snapshot(model, AutoTokenizer.from_pretrained(model_dir), snapshot_texts,
                                         max_length=settings["seq_len"], layer_names=[*report.layers, *float_layers])
            body["drift_snapshot"] = write_snapshot(staging, snapshot)
        return write_manifest(staging, {**body, **({"recipe": recipe} if recipe is not None else {})})


def load_as_transformers(path: str | Path):
    """The artifact's quantized model as a transformers `AutoModelForCausalLM` with the quantized
    layers of `inferforge.optimize.quantize` (no hash check; `inferforge.load` returns the engine)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from inferforge.optimize.quantize import load_quantized

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).eval()
    return load_quantized(model, path)
