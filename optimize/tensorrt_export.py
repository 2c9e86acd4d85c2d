"""`--format tensorrt`: TensorRT readiness files for an exported ONNX graph, and the checks before them.

- `check_profile_flags`: --max-batch (TensorRT profiles, Triton's max_batch_size) and --max-sequence
  (TensorRT profiles) only where they are used, and no longer than the model's positions;
- `check_tensorrt_opset`: the opset TensorRT's parser takes (the range in `data/tensorrt_ops.json`),
  refused before any work;
- `tensorrt_files`: profiles sized by `tensorrt_profiles.model_profiles` and the readiness report
  (`tensorrt_ready.write_tensorrt_files`) into a staging directory; a graph that is not ready raises
  `GateFailed`, so the caller publishes nothing and leaves the report in `OUT.failed/`. The user asked
  for a graph TensorRT can build; an artifact that is not one would pass for one in scripts that only
  check the exit code. `--format onnx` writes the ONNX artifact alone;
- `tensorrt_artifact`: the same for an ONNX artifact already written (a copy at another path).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from inferforge.errors import GateFailed, UserInputError
from inferforge.optimize.llm_export_artifact import _import_optional


def check_profile_flags(fmt: str, *, max_batch: int | None, max_sequence: int | None, position_limit) -> None:
    """--max-batch (tensorrt profiles, Triton's max_batch_size) and --max-sequence (tensorrt profiles only),
    refused where they would be ignored, or beyond the model's positions."""
    if max_batch is not None and fmt not in ("tensorrt", "triton"):
        raise UserInputError(f"--max-batch sizes TensorRT profiles and Triton's max_batch_size; --format {fmt} has "
                             "neither, add --format tensorrt|triton or drop --max-batch")
    if max_sequence is not None and fmt != "tensorrt":
        raise UserInputError(f"--max-sequence sizes TensorRT profiles; --format {fmt} has none, add --format tensorrt "
                             "or drop --max-sequence")
    if max_batch is not None and max_batch < 1:
        raise UserInputError(f"--max-batch {max_batch}: must be at least 1")
    if max_sequence is not None and (max_sequence < 1 or (position_limit and max_sequence > position_limit)):
        raise UserInputError(f"--max-sequence {max_sequence}: the model takes 1 to {position_limit or 'any number of'} "
                             "tokens (max_position_embeddings); choose a value in that range")


def check_tensorrt_opset(opset: int, trt) -> None:
    """TensorRT's ONNX parser takes the opsets of its operator table (tensorrt_ops.json)."""
    table = trt.operator_table()
    low, high = table["opset"]["min"], table["opset"]["max"]
    if not low <= opset <= high:
        raise UserInputError(f"--opset {opset} with --format tensorrt: TensorRT {table['trt_version']} parses opsets "
                             f"{low} to {high}; choose one in that range")


def tensorrt_files(staging: Path, limit: int | None, max_batch: int | None = None, max_sequence: int | None = None,
                   onnx_name: str = "model.onnx") -> dict:
    """TensorRT readiness files for the graph `staging/onnx_name`, profiles bounded by the model's
    `limit` positions (None: unknown); raises GateFailed when the report says it is not ready."""
    trt = _import_optional("inferforge.optimize.tensorrt_ready", "--format tensorrt")
    profiles = trt.model_profiles(staging / onnx_name, position_limit=limit,
                                  max_batch=8 if max_batch is None else max_batch, max_sequence=max_sequence)
    summary = trt.write_tensorrt_files(staging, onnx_name, profiles=profiles, position_limit=limit)
    if not summary.get("ready"):
        readiness = staging / "tensorrt" / "readiness.md"
        raise GateFailed(f"TensorRT readiness: not ready, {summary.get('errors')} errors "
                         f"({summary.get('error_summary') or 'see the readiness report'}); --format tensorrt writes "
                         "only a graph TensorRT can build: export with --format onnx for the ONNX artifact alone",
                         check={"name": "tensorrt readiness", "kind": "gate", "measured": summary.get("errors"),
                                "op": "==", "limit": 0, "passed": False,
                                "readiness_md": readiness.read_text(encoding="utf-8") if readiness.is_file() else None})
    return summary


def tensorrt_artifact(artifact: str | Path, out_dir: str | Path, *, name: str | None = None,
                      max_batch: int | None = None, max_sequence: int | None = None) -> dict:
    """A copy of the ONNX artifact `artifact` (sentence-encoder or onnx-causal-lm, hashes verified) at
    `out_dir` with TensorRT readiness files under `tensorrt/`; the input artifact is not changed.
    Profiles: `tensorrt_profiles.model_profiles`, bounded by the artifact's config.json
    `max_position_embeddings` when it has one. `name`: the copy's name (default the artifact's).
    A graph that is not TensorRT-ready raises GateFailed and writes nothing (reports in `OUT.failed/`)."""
    from inferforge.checkpoint_files import read_config
    from inferforge.manifest import (
        failed_report_dir,
        staged_artifact,
        utc_now,
        verify_artifact,
        write_failed_report,
        write_manifest,
    )

    artifact, out = Path(artifact), Path(out_dir).resolve()
    if out == artifact.resolve():
        raise UserInputError(f"--output {out_dir} is the input artifact; give another --output for the copy with "
                             "TensorRT files")
    manifest = verify_artifact(artifact)
    limit = read_config(artifact).get("max_position_embeddings") if (artifact / "config.json").is_file() else None
    check_profile_flags("tensorrt", max_batch=max_batch, max_sequence=max_sequence, position_limit=limit)
    trt = _import_optional("inferforge.optimize.tensorrt_ready", "--format tensorrt")
    check_tensorrt_opset(_graph_opset(artifact / manifest["runtime"]["model"]), trt)
    model_name = manifest["runtime"]["model"]
    started = time.perf_counter()
    try:
        with staged_artifact(out) as staging:
            for relative in manifest["files"]:
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(artifact / relative, staging / relative)
            summary = tensorrt_files(staging, limit, max_batch, max_sequence, onnx_name=model_name)
            body = {k: v for k, v in manifest.items() if k not in ("format", "files", "version", "manifest_sha256")}
            step = {"name": "tensorrt", "settings": {"max_batch": max_batch, "max_sequence": max_sequence},
                    "duration_s": time.perf_counter() - started, "summary": "TensorRT readiness: ready"}
            body.update(created=utc_now(), tensorrt=summary, steps=[*manifest.get("steps", []), step],
                        name=name or manifest.get("name"),
                        parent={"name": manifest.get("name"), "kind": manifest.get("kind"),
                                "version": manifest.get("version"), "manifest_sha256": manifest.get("manifest_sha256"),
                                "path": str(artifact.resolve())})
            return write_manifest(staging, body)
    except GateFailed as e:
        report = {"kind": manifest.get("kind"), "passed": False, "error": str(e),
                  "check": {k: v for k, v in (e.check or {}).items() if k != "readiness_md"}, "source": str(artifact)}
        text = (f"# TensorRT copy of {artifact.name}: FAILED\n\n{e}\n\nNo artifact was written.\n\n"
                f"{(e.check or {}).get('readiness_md') or ''}")
        write_failed_report(out, {"report.json": json.dumps(report, indent=2, default=str) + "\n", "report.md": text})
        raise GateFailed(f"{e} (no artifact written; report in {failed_report_dir(out)})",
                         report_dir=str(failed_report_dir(out)), check=report["check"]) from None


def _graph_opset(onnx_path: Path) -> int:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
