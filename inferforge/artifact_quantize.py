"""Quantize an ONNX export artifact (`inferforge quantize ARTIFACT --onnx`) into a new artifact.

The input is an artifact written by `inferforge export` (or a recipe whose only model step is the
export): `model.onnx` in fp32, the tokenizer files and a manifest. Its hashes are verified, then the
recipe pipeline's own quantize and validate steps run on it, with one difference: every candidate is
compared with the artifact's fp32 ONNX model instead of the PyTorch source model (which may no longer
be around). The gate is the same (min cosine of mean-pooled embeddings on held-out sentences); a
missed gate writes no artifact (an earlier one at the output is unchanged) and leaves the reports in
`OUT.failed/`. The new artifact's manifest records its parent (path, content version, sha256 of the
parent's manifest and model), the settings and the sha256 of the calibration and held-out sentences.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from inferforge.data import SentenceSplit, bucketed, read_sentences, sentence_record, split_sentences
from inferforge.errors import UserInputError
from inferforge.fileio import sha256_file
from inferforge.manifest import MANIFEST_NAME, failed_report_dir, read_manifest, verify_artifact
from inferforge.models import ModelSource
from inferforge.pipeline import (
    MODEL_FILE,
    RunContext,
    RunResult,
    check_results,
    run_steps,
    staged_run,
    write_run_outputs,
)
from inferforge.progress import Progress
from inferforge.recipe import DataConfig, Gates, QuantizeConfig, Targets, ValidateConfig

CAUSAL_LM_KINDS = ("causal-lm", "quantized-causal-lm")
_SUFFIX = {"dynamic-int8": "int8", "static-qdq": "qdq"}   # of the default name and output
_EXPORT_HINT = "`inferforge export MODEL --output DIR` writes one"


def _is_causal_lm_checkpoint(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") or []
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def _causal_lm_error(path: Path) -> UserInputError:
    return UserInputError(f"{path} is a causal LM, and --onnx quantizes ONNX encoder export artifacts; quantize "
                          f"a causal LM with `inferforge quantize {path} --config FORMAT` (without --onnx)")


def check_export_artifact(path: str | Path) -> dict:
    """The verified manifest of the fp32 ONNX export artifact `path`, or a UserInputError naming the fix."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path}: no such directory; --onnx needs an ONNX export artifact directory "
                             f"({_EXPORT_HINT})")
    if not (path / MANIFEST_NAME).is_file():
        if _is_causal_lm_checkpoint(path):
            raise _causal_lm_error(path)
        if (path / "config.json").is_file():
            raise UserInputError(f"{path} is a model directory, not an export artifact: export it first "
                                 f"(`inferforge export {path} --output DIR`, then `inferforge quantize DIR --onnx`), "
                                 "or drop --onnx to export and quantize in one run")
        raise UserInputError(f"{path}: no {MANIFEST_NAME}, so not an inferforge artifact; --onnx needs an ONNX "
                             f"export artifact ({_EXPORT_HINT})")
    manifest = read_manifest(path)
    kind, runtime = manifest.get("kind"), manifest.get("runtime") or {}
    if kind in CAUSAL_LM_KINDS:
        raise _causal_lm_error(path)
    if kind != "sentence-encoder" or runtime.get("model") != MODEL_FILE or MODEL_FILE not in manifest["files"]:
        raise UserInputError(f"{path}: this {kind or 'unknown'} artifact holds no {MODEL_FILE}; --onnx needs an "
                             f"ONNX export artifact ({_EXPORT_HINT})")
    if runtime.get("provider") != "onnx-fp32":
        raise UserInputError(f"{path}: the model is already quantized ({runtime.get('provider')}); give the fp32 "
                             "export artifact it was made from")
    manifest = verify_artifact(path)   # every file against its sha256, before anything is used
    if not manifest.get("accuracy_passed", False):
        raise UserInputError(f"{path}: this export failed its own accuracy gate; re-export the model before "
                             "quantizing it")
    return manifest


def _sentences(data: DataConfig, calibration_file: str | Path | None, tokenizer) -> tuple[SentenceSplit, dict]:
    """Calibration and held-out texts (never overlapping) and a record of them for the manifest.

    Without `calibration_file`, `data.sentences` is split as in a recipe run. With it, the file's
    first `calibration_size` distinct lines (.txt) or "text" fields (.jsonl) calibrate, and the
    held-out sentences are the first `held_out_size` of `data.sentences` not among them. Either way
    both sets get the recipe run's length buckets (short queries and long passages, `bucketed`).
    """
    if calibration_file is None:
        split = split_sentences(data.sentences, data.calibration_size, data.held_out_size)
    else:
        from inferforge.optimize.calibration import read_texts

        calibration = tuple(dict.fromkeys(t.strip() for t in read_texts(calibration_file)))[:data.calibration_size]
        used = set(calibration)
        held_out = tuple(s for s in read_sentences(data.sentences) if s not in used)[:data.held_out_size]
        if len(held_out) < data.held_out_size:
            raise UserInputError(f"{data.sentences}: {len(held_out)} sentences not in the calibration file, but "
                                 f"--held-out-size is {data.held_out_size}; lower it or give more text with --sentences")
        split = SentenceSplit(calibration, held_out)
    split = bucketed(split, tokenizer, data.max_length)
    record = sentence_record(split, calibration_source=str(calibration_file or data.sentences),
                             held_out_source=data.sentences)
    record["held_out_buckets"] = {name: len(idx) for name, idx in split.buckets().items()}
    return split, record


def _copy_verified_model(artifact: Path, manifest: dict, dest: Path) -> Path:
    """Copy the artifact's model into scratch space (ONNX Runtime's quantizer writes files next to its
    input) and check the copy against the manifest, so the model quantized is the one verified."""
    dest.mkdir(parents=True, exist_ok=True)
    copy = dest / MODEL_FILE
    shutil.copyfile(artifact / MODEL_FILE, copy)
    if sha256_file(copy) != manifest["files"][MODEL_FILE]["sha256"]:
        raise UserInputError(f"{artifact}: {MODEL_FILE} changed while it was read; make sure nothing writes to "
                             "the artifact and run again")
    return copy


def quantize_artifact(artifact: str | Path, out: str | Path, *, quantize: QuantizeConfig | None = None,
                      gates: Gates | None = None, data: DataConfig | None = None,
                      validate: ValidateConfig | None = None, calibration_file: str | Path | None = None,
                      name: str | None = None, progress: Progress | None = None) -> RunResult:
    """Quantize the fp32 ONNX export artifact `artifact` into the new artifact `out`.

    `quantize` picks the method (dynamic int8 with SmoothQuant, or static symmetric QDQ with its
    calibration method), `gates.min_cosine` the accuracy gate against the artifact's fp32 model on
    held-out sentences (from `data`, see `_sentences` for `calibration_file`). The sequence length is
    the parent's. When a gate is missed, nothing is written at `out` and the result's `failure_report`
    (`OUT.failed/`) holds the reports. `inferforge.load(out)` loads the result.
    """
    quantize, gates = quantize or QuantizeConfig(), gates or Gates()
    data, validate = data or DataConfig(), validate or ValidateConfig()
    progress = progress or Progress(quiet=True)
    artifact, out = Path(artifact).resolve(), Path(out).resolve()
    parent = check_export_artifact(artifact)
    if out == artifact or out in artifact.parents or artifact in out.parents:
        raise UserInputError(f"output {out} overlaps the artifact being quantized ({artifact}); choose another "
                             "--output")
    started = time.perf_counter()
    data = replace(data, max_length=parent["runtime"]["max_length"])
    from transformers import AutoTokenizer

    from inferforge.encoder import OnnxEncoder
    from inferforge.ort_config import read_session_options

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
    except (OSError, ValueError) as e:
        raise UserInputError(f"{artifact}: cannot load the tokenizer from the artifact ({e}); re-export the "
                             "model with `inferforge export`") from None
    split, sentences = _sentences(data, calibration_file, tokenizer)
    source = ModelSource(spec=parent["source"]["model"], path=Path(parent["source"]["path"]),
                         weights_sha256=parent["source"]["weights_sha256"])
    parent_record = {"path": str(artifact), "name": parent["name"], "version": parent["version"],
                     "manifest_sha256": sha256_file(artifact / MANIFEST_NAME),
                     "model_sha256": parent["files"][MODEL_FILE]["sha256"]}
    with staged_run(out) as (staging, work):
        fp32 = _copy_verified_model(artifact, parent, work / "onnx-fp32")
        ctx = RunContext(data=data, gates=gates, source=source, sentences=split, work=work, staging=staging,
                         progress=progress, reference=OnnxEncoder(fp32, tokenizer, max_length=data.max_length,
                                                                  session_options=read_session_options(artifact, parent)),
                         fp32_onnx=fp32, final_onnx=fp32,
                         max_length_origin=f"parent artifact ({parent['runtime'].get('max_length_origin', 'runtime.max_length')})")
        steps = run_steps(ctx, (quantize, validate))
        checks = ctx.step_checks + check_results(gates, Targets(), ctx.results, ctx.final_provider)
        quantization = {"method": quantize.method,
                        "reference": f"onnx-fp32 model of the parent artifact {artifact.name}", **sentences}
        # The report names the parent by its directory; the manifest keeps its local path.
        report = write_run_outputs(ctx, name=name or f"{parent['name']}-{_SUFFIX[quantize.method]}", out=out,
                                   tokenizer_dir=artifact, steps=steps, checks=checks, started=started,
                                   provenance={"parent": parent_record, "quantization": quantization},
                                   report_extra={"parent": {**parent_record, "path": artifact.name},
                                                 "quantization": quantization})
    passed = report["passed"]
    return RunResult(output=out, report=report, passed=passed, failure_report=None if passed else failed_report_dir(out))


def default_output(artifact: str | Path, method: str) -> Path:
    """`runs/DIR-int8` or `runs/DIR-qdq`, DIR the artifact directory's name."""
    return Path("runs") / f"{Path(artifact).resolve().name}-{_SUFFIX[method]}"
