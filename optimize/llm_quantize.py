"""Quantize a Hugging Face causal LM directory into an artifact (the `inferforge quantize --config` path).

Steps: load the checkpoint (float32), read calibration text if given (the first `num_samples`
sequences calibrate, the next `num_samples // 2` are held out), quantize with the chosen format,
compare with the original on the held-out sequences (perplexity change, top-1 agreement, KL) and
apply the gate, then write the artifact: quantized safetensors + quantization.json + config and
tokenizer files + manifest. `inferforge.load(DIR)` rebuilds the quantized model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

import torch

from inferforge.errors import UserInputError

FORMATS = ("int8-weight-only", "int4-g128", "int4-gptq", "int4-awq", "w8a8", "fp8")
CALIBRATED_FORMATS = ("int4-gptq", "int4-awq", "w8a8")   # these need calibration text


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


def quantize_checkpoint(model_dir, out_dir, *, fmt: str, calibration_file=None, num_samples: int = 16,
                        seq_len: int = 128, gate=None, auto_skip: bool = False, skip: tuple[str, ...] = (),
                        group_size: int = 128, progress=None, name: str | None = None,
                        recipe: dict | None = None) -> dict:
    """Quantize `model_dir` to the artifact `out_dir`; returns the manifest. `name` (default: the
    output directory's name) and the normalized `recipe`, when a recipe ran this, go to the manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inferforge.artifact import CHECKPOINT_FILES
    from inferforge.checkpoint_files import check_safetensors_files, read_config
    from inferforge.manifest import (
        check_output_dir,
        environment,
        staged_artifact,
        tool_versions,
        utc_now,
        write_manifest,
    )
    from inferforge.models import weights_sha256
    from inferforge.optimize.calibration import load_token_batches
    from inferforge.optimize.lm_eval import compare_lms
    from inferforge.optimize.quantize import quantize, save_quantized

    model_dir, out = Path(model_dir), Path(out_dir).resolve()
    read_config(model_dir, what="a Hugging Face causal LM directory")   # named errors for a corrupt config.json
    check_safetensors_files(model_dir)                                  # or a truncated safetensors file
    config = make_config(fmt, tuple(skip), group_size)
    needs_data = fmt in CALIBRATED_FORMATS
    if (needs_data or gate is not None) and calibration_file is None:
        raise UserInputError(f"--config {fmt}{' with a gate' if gate else ''} needs --calibration FILE (.txt or .jsonl)")
    check_output_dir(out)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calibration = held_out = None
    calibration_sha = None
    if calibration_file is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        batches = load_token_batches(calibration_file, tokenizer, num_samples=num_samples + max(1, num_samples // 2),
                                     seq_len=seq_len, progress=progress)
        calibration, held_out = batches[:num_samples], batches[num_samples:]
        calibration_sha = hashlib.sha256(torch.cat(calibration).numpy().tobytes()).hexdigest()
    original = copy.deepcopy(model) if held_out and gate is None else None
    report = quantize(model, config, calibration=calibration if needs_data else None, gate=gate,
                      eval_data=held_out if gate is not None else None, auto_skip=auto_skip)
    if original is not None:
        report.metrics = compare_lms(original, model, held_out)
    # A gate that failed has raised GateFailed by now: what is recorded here passed.
    checks = [{"name": "gate", "kind": "gate", "passed": True, "limits": dataclasses.asdict(gate)}] if gate else []
    with staged_artifact(out) as staging:
        save_quantized(model, staging, report)
        for file_name in CHECKPOINT_FILES:
            if (model_dir / file_name).is_file():
                shutil.copyfile(model_dir / file_name, staging / file_name)
        worst = [{"layer": n, "sqnr_db": v} for n, v in report.worst(5)]
        manifest = write_manifest(staging, {
            "name": name or out.name, "created": utc_now(), "kind": "quantized-causal-lm",
            "runtime": {"format": fmt, "loader": "transformers AutoModelForCausalLM + inferforge quantized layers"},
            "source": {"model": str(model_dir), "path": str(model_dir.resolve()), "weights_sha256": weights_sha256(model_dir)},
            "steps": [{"name": "quantize", "settings": {"format": fmt, "skip": list(skip), "group_size": group_size,
                                                         "num_samples": num_samples,
                                                         "seq_len": seq_len, "auto_skip": auto_skip},
                       "duration_s": time.perf_counter() - started, "tools": tool_versions(),
                       "summary": f"{len(report.layers)} layers quantized, {len(report.skipped)} skipped, "
                                  f"{len(report.auto_skipped)} kept in float by auto_skip"}],
            "quantization": {"skipped": report.skipped, "auto_skipped": report.auto_skipped, "worst_layers": worst,
                             "calibration_sha256": calibration_sha},
            "validation": report.metrics, "checks": checks, "passed": True, "accuracy_passed": True,
            "environment": environment(),
            **({"recipe": recipe} if recipe is not None else {}),
        })
    return manifest


def load_quantized_artifact(path: Path, manifest: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    from inferforge.optimize.quantize import load_quantized

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).eval()
    model = load_quantized(model, path)
    model.manifest = manifest
    return model
