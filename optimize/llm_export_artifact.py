"""`export_llm`: a Llama / Mistral / Qwen2 checkpoint or causal-LM artifact -> a validated ONNX decoder artifact.

Steps, all in a staging directory (`staged_artifact`), so a failed or interrupted run writes nothing
and leaves an earlier artifact in place:

1. export: optimum-onnx's decoder with past (`export_decoder_onnx`); a quantized-causal-lm artifact
   goes through `inferforge.optimize.onnx_llm_quant.export_quantized_graph` instead. `fp16=True`
   converts the graph (`onnx_graph_files.convert_to_fp16`). The graph is saved as `model.onnx`, with
   `model.onnx_data` beside it when its weights pass 2 GB (`external_data_threshold`).
2. validate: ONNX Runtime against PyTorch (`validate_decoder`): logits and present key/values, then
   16 greedy tokens through the past; a mismatch raises `GateFailed` and its report goes to
   `OUT.failed/`.
3. bench: decode tokens/s at batch 1 on this machine (`decode_tokens_per_second`).
4. `fmt="tensorrt"`: TensorRT readiness files under `tensorrt/` (`inferforge.optimize.tensorrt_export`:
   profiles within the model's positions; a graph that is not ready is a `GateFailed`).
5. manifest, kind `onnx-causal-lm`; `inferforge.load` returns an `OnnxDecoder` for it.
   `fmt="triton"`: then a Triton model repository version is written from the artifact
   (`inferforge.optimize.triton_repo.write_triton_repository`).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from inferforge.errors import GateFailed, UserInputError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
FORMATS = ("onnx", "tensorrt", "triton")
OPSET_RANGE = (14, 21)      # scaled_dot_product_attention needs 14; ONNX Runtime 1.20 runs up to 21
LLM_INPUT_KINDS = ("causal-lm", "quantized-causal-lm", "distilled-causal-lm")
DEFAULT_OPSET = 18
# The lowest opset each quantized format exports at. MatMulNBits is a com.microsoft op (any ai.onnx
# opset); int8 QDQ with a per-channel DequantizeLinear (axis) needs 13; float8e4m3fn QuantizeLinear /
# DequantizeLinear need 19. opset "auto" (None) is DEFAULT_OPSET, or this when it is higher.
MIN_OPSET = {"fp8": 19, "w8a8": 13}
CALIBRATED_FORMATS = ("w8a8", "fp8")
EXPORTER_PACKAGES = ("optimum", "optimum-onnx", "onnx", "onnxruntime", "torch", "transformers")


@dataclass(frozen=True)
class ExportSource:
    """What `export_llm` reads: a checkpoint directory, or an artifact (then `parent` describes it)."""

    model_dir: Path
    config: dict
    kind: str                   # "checkpoint", or an LLM_INPUT_KINDS artifact kind
    parent: dict | None = None
    quant_format: str | None = None     # a quantized-causal-lm's format ("int4-g128", "fp8", ...)


def unsupported_architecture(model_type) -> UserInputError:
    return UserInputError(f"unsupported architecture {model_type}; supported: {', '.join(SUPPORTED_TYPES)}")


def resolve_source(path: str | Path) -> ExportSource:
    """Check `path` (a Llama-family checkpoint or a causal-LM artifact, hashes verified) before any work."""
    from inferforge.checkpoint_files import check_safetensors_files, read_config
    from inferforge.manifest import MANIFEST_NAME, verify_artifact

    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path} does not exist; give a Llama/Mistral/Qwen2 checkpoint directory (config.json "
                             "and *.safetensors) or a causal-LM artifact")
    kind, parent, quant_format = "checkpoint", None, None
    if (path / MANIFEST_NAME).is_file():
        manifest = verify_artifact(path)
        kind = manifest.get("kind")
        if kind not in LLM_INPUT_KINDS:
            raise UserInputError(f"{path} is a {kind} artifact; `export` makes an ONNX decoder from a causal-LM "
                                 "checkpoint or a causal-lm / quantized-causal-lm / distilled-causal-lm artifact")
        parent = {"name": manifest.get("name"), "kind": kind, "version": manifest.get("version"),
                  "manifest_sha256": manifest.get("manifest_sha256"), "path": str(path.resolve()),
                  "source_weights_sha256": (manifest.get("source") or {}).get("weights_sha256")}
        quant_format = (manifest.get("quantization") or {}).get("format") if kind == "quantized-causal-lm" else None
    config = read_config(path, what="a Llama/Mistral/Qwen2 checkpoint directory")
    if config.get("model_type") not in SUPPORTED_TYPES:
        raise unsupported_architecture(config.get("model_type"))
    if kind == "checkpoint" and not check_safetensors_files(path):
        raise UserInputError(f"{path}: no *.safetensors weights; give a Hugging Face checkpoint directory")
    return ExportSource(path, config, kind, parent, quant_format)


def choose_opset(opset: int | None, source: ExportSource | None) -> int:
    """`opset`, or for None ("auto") DEFAULT_OPSET raised to the quantized format's minimum."""
    need = MIN_OPSET.get(source.quant_format, 0) if source is not None else 0
    if opset is None:
        return max(DEFAULT_OPSET, need)
    if opset < need:
        raise UserInputError(f"--opset {opset}: {source.quant_format} needs opset >= {need} (float8e4m3fn "
                             f"QuantizeLinear/DequantizeLinear); pass --opset {need} or higher, or leave --opset out "
                             f"(auto picks {max(DEFAULT_OPSET, need)})")
    return opset


def check_export_args(*, opset: int | None, fp16: bool, fmt: str, repository, source: ExportSource | None = None,
                      calibration=None, max_batch: int | None = None, max_sequence: int | None = None) -> None:
    low, high = OPSET_RANGE
    if opset is not None and not low <= opset <= high:
        raise UserInputError(f"--opset {opset} is out of range; a decoder exports at opset {low} to {high} "
                             f"(default auto: {DEFAULT_OPSET}, {MIN_OPSET['fp8']} for fp8)")
    choose_opset(opset, source)
    if calibration is not None:
        quant = source.quant_format if source is not None else None
        if quant not in CALIBRATED_FORMATS:
            what = f"{quant} is weight-only" if quant else "the input is not a quantized artifact"
            raise UserInputError(f"--calibration FILE sets the static activation scales of a w8a8 / fp8 artifact's "
                                 f"export; {what}, drop --calibration")
        if not Path(calibration).is_file():
            raise UserInputError(f"--calibration {calibration}: no such file; give the .txt / .jsonl text to "
                                 "calibrate the static activation scales on")
    if fmt not in FORMATS:
        raise UserInputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "triton" and repository is None:
        raise UserInputError("--format triton needs --repository DIR, the Triton model repository to write into")
    if repository is not None and fmt != "triton":
        raise UserInputError("--repository is for --format triton; add --format triton or drop --repository")
    if repository is not None:
        blocking = next((p for p in (Path(repository), *Path(repository).parents) if p.exists() and not p.is_dir()),
                        None)
        if blocking is not None:
            raise UserInputError(f"--repository {repository}: {blocking} is a file, not a directory; choose another")
    if fp16 and source is not None and source.kind == "quantized-causal-lm":
        raise UserInputError("--fp16 converts a float graph; a quantized artifact exports as it was quantized, "
                             "drop --fp16")
    from inferforge.optimize.tensorrt_export import check_profile_flags, check_tensorrt_opset

    check_profile_flags(fmt, max_batch=max_batch, max_sequence=max_sequence,
                        position_limit=(source.config.get("max_position_embeddings") if source is not None else None))
    if fmt == "tensorrt":
        trt = _import_optional("inferforge.optimize.tensorrt_ready", "--format tensorrt")
        check_tensorrt_opset(choose_opset(opset, source), trt)
    if fmt == "triton":
        _import_optional("inferforge.optimize.triton_repo", "--format triton")


def _import_optional(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserInputError(f"{what} needs {module}, which this inferforge does not have ({e}); "
                             "use --format onnx") from None


def exporter_versions() -> dict:
    from inferforge.manifest import _version as version
    from inferforge.manifest import tool_versions

    versions = {name: version(name) for name in EXPORTER_PACKAGES}
    versions["onnxruntime"] = tool_versions()["onnxruntime"]
    return versions


def decode_tokens_per_second(onnx_path, spec, *, new_tokens: int = 32, prompt_tokens: int = 8, repeats: int = 3,
                             provider: str | None = None, session_config: dict[str, str] | None = None) -> dict:
    """Decode speed of the graph at batch 1 on this machine: `new_tokens` / wall time of one `generate`
    call (the prefill of a `prompt_tokens` prompt included, EOS ignored), median of `repeats` after a
    warm-up call."""
    from inferforge.optimize.onnx_decoder import OnnxDecoder

    decoder = OnnxDecoder(onnx_path, spec, max_num_seqs=1, provider=provider, session_config=session_config)
    prompt = [i % spec.vocab_size for i in range(3, 3 + prompt_tokens)]
    decoder.generate([prompt], max_new_tokens=4, stop_token_ids=[])
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        decoder.generate([prompt], max_new_tokens=new_tokens, stop_token_ids=[])
        seconds.append(time.perf_counter() - started)
    return {"tokens_per_s": new_tokens / statistics.median(seconds), "batch": 1, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "repeats": repeats, "provider": decoder.provider,
            "definition": "new tokens / wall time of one generate call (prompt prefill included), median"}


def export_llm(model_or_artifact: str | Path, out_dir: str | Path, *, opset: int | None = None, fp16: bool = False,
               fmt: str = "onnx", repository: str | Path | None = None, name: str | None = None, progress=None,
               external_data_threshold: int | None = None, calibration: str | Path | None = None,
               max_batch: int | None = None, max_sequence: int | None = None) -> dict:
    """Export, validate and write the `onnx-causal-lm` artifact `out_dir` (see the module docstring);
    returns its manifest. `opset` None ("auto"): 18, or the quantized format's minimum when higher
    (fp8: 19). `calibration`: the text for a w8a8 / fp8 artifact's static activation scales. With
    `fmt="triton"` the manifest's `triton.version_dir` is the Triton model version written under
    `repository` (`max_batch`: its max_batch_size, default 8). With `fmt="tensorrt"`, `max_batch` and
    `max_sequence` size the profiles (`tensorrt_profiles.model_profiles`). `name` defaults to the
    model directory's name. Raises `UserInputError` for bad arguments (before any work) and
    `GateFailed` when ONNX Runtime does not match PyTorch, or with `fmt="tensorrt"` when the graph is
    not TensorRT-ready (nothing is written then; the reports go to `OUT.failed/`)."""
    from inferforge.manifest import failed_report_dir, staged_artifact, write_failed_report
    from inferforge.progress import Progress

    source = resolve_source(model_or_artifact)
    check_export_args(opset=opset, fp16=fp16, fmt=fmt, repository=repository, source=source, calibration=calibration,
                      max_batch=max_batch, max_sequence=max_sequence)
    requested, opset = "auto" if opset is None else opset, choose_opset(opset, source)
    progress = progress or Progress(quiet=True)
    out = Path(out_dir).resolve()
    try:
        with staged_artifact(out) as staging:
            manifest = _build(source, staging, opset=(opset, requested), fp16=fp16, fmt=fmt,
                              name=name or source.model_dir.resolve().name, given=str(model_or_artifact),
                              progress=progress, external_data_threshold=external_data_threshold,
                              calibration=calibration, profile_limits=(max_batch, max_sequence))
    except GateFailed as e:
        check = {k: v for k, v in (e.check or {}).items() if k != "readiness_md"}
        report = {"kind": "onnx-causal-lm", "passed": False, "error": str(e), "check": check,
                  "source": str(model_or_artifact), "opset": opset, "dtype": "fp16" if fp16 else "fp32"}
        text = f"# ONNX export of {Path(model_or_artifact).name}: FAILED\n\n{e}\n\nNo artifact was written.\n"
        text += f"\n{(e.check or {}).get('readiness_md')}" if (e.check or {}).get("readiness_md") else ""
        write_failed_report(out, {"report.json": json.dumps(report, indent=2, default=str) + "\n", "report.md": text})
        raise GateFailed(f"{e} (no artifact written; report in {failed_report_dir(out)})",
                         report_dir=str(failed_report_dir(out)), check=check) from None
    if fmt == "triton":
        triton = _import_optional("inferforge.optimize.triton_repo", "--format triton")
        version_dir = triton.write_triton_repository(out, repository, max_batch_size=8 if max_batch is None else max_batch)
        manifest["triton"] = {"version_dir": str(version_dir)}
    return manifest


def _build(source: ExportSource, staging: Path, *, opset, fp16, fmt, name, given, progress,
           external_data_threshold, calibration, profile_limits=(None, None)) -> dict:
    from inferforge.artifact import CHECKPOINT_FILES
    from inferforge.manifest import environment, utc_now, write_manifest
    from inferforge.models import weights_sha256
    from inferforge.optimize import llm_export
    from inferforge.optimize.onnx_decoder import validate_decoder
    from inferforge.optimize.onnx_graph_files import (
        EXTERNAL_DATA_THRESHOLD,
        convert_to_fp16,
        load_graph,
        save_graph,
    )
    from inferforge.ort_config import decoder_ort_config, write_ort_config
    from inferforge.runtime.llama import LlamaSpec

    spec = LlamaSpec.from_config(source.config, source=str(source.model_dir / "config.json"))
    opset, requested = opset
    work = staging / "_work"
    steps, extra, session_config = [], {}, {}
    started = time.perf_counter()
    with progress.spinner(f"exporting {source.model_dir.name} to ONNX (opset {opset})"):
        if source.kind == "quantized-causal-lm":
            quant = _import_optional("inferforge.optimize.onnx_llm_quant", "exporting a quantized artifact")
            graph = quant.export_quantized_graph(source.model_dir, work, opset=opset, calibration=calibration,
                                                 progress=progress)
            exported, reference = Path(graph.onnx_path), graph.reference
            exact_tokens, logits_atol = graph.exact_tokens, graph.logits_atol
            extra.update(graph.manifest)      # quantized_export, parent (the quantized artifact), parent_gate, lineage
            session_config = dict((graph.manifest.get("quantized_export") or {}).get("onnxruntime_session_config") or {})
        else:
            exported = llm_export.export_decoder_onnx(source.model_dir, work, opset=opset)
            reference, exact_tokens, logits_atol = _torch_reference(source.model_dir), True, None
        model = convert_to_fp16(exported) if fp16 else load_graph(exported)
        files = save_graph(model, staging / "model.onnx",
                           external_data_threshold=external_data_threshold or EXTERNAL_DATA_THRESHOLD)
        del model
    dtype = "fp16" if fp16 else "fp32"
    quantized = extra.get("quantized_export")
    # A quantized graph's weights are in its format (int4 MatMulNBits, int8 QDQ...), not fp32: say so.
    weights = " ".join(str(quantized[k]) for k in ("format", "op") if quantized.get(k)) if quantized else dtype
    steps.append(_step("export", started, {"opset": opset, "dtype": quantized["format"] if quantized else dtype,
                                           "task": llm_export.DECODER_TASK},
                       f"{', '.join(files)} ({weights}, opset {opset})", progress))

    started = time.perf_counter()
    with progress.spinner("validating ONNX Runtime against PyTorch"):
        validation = validate_decoder(staging / "model.onnx", reference, spec, fp16=fp16, logits_atol=logits_atol,
                                      exact_tokens=exact_tokens, session_config=session_config)
    worst = max(c["logits_max_abs_diff"] for c in validation["cases"])
    limit = min(c["logits_limit"] for c in validation["cases"])
    agreement = min(g["agreement"] for g in validation["greedy"])
    steps.append(_step("validate", started, {"greedy_steps": validation["greedy_steps"]},
                       f"logits max |diff| {worst:.3g}, greedy tokens "
                       f"{'identical' if validation['identical'] else f'{agreement:.0%} agree'}", progress))

    started = time.perf_counter()
    with progress.spinner("measuring decode tokens/s at batch 1"):
        throughput = decode_tokens_per_second(staging / "model.onnx", spec, session_config=session_config)
        if source.kind == "quantized-causal-lm":
            extra["throughput_float"] = decode_tokens_per_second(graph.float_onnx_path, spec)
    steps.append(_step("bench", started, {"batch": 1, "new_tokens": throughput["new_tokens"]},
                       f"{throughput['tokens_per_s']:.1f} tokens/s at batch 1 ({throughput['provider']})", progress))
    shutil.rmtree(work, ignore_errors=True)
    for file_name in CHECKPOINT_FILES:
        if (source.model_dir / file_name).is_file():
            shutil.copyfile(source.model_dir / file_name, staging / file_name)
    if fmt == "tensorrt":
        from inferforge.optimize.tensorrt_export import tensorrt_files

        extra["tensorrt"] = tensorrt_files(staging, spec.max_position_embeddings, *profile_limits)
    # Other runtimes read how to open the graph from here; OnnxDecoder.from_artifact applies it too.
    write_ort_config(staging, decoder_ort_config(opset=opset, config_entries=session_config,
                                                 quantized_export=extra.get("quantized_export")))

    # The quantized parent: this module's record (manifest_sha256 = the parent manifest's own digest, as
    # for any parent) plus what export_quantized_graph adds (manifest_file_sha256, ...).
    parent = {**extra.pop("parent", {}), **(source.parent or {})} or None
    checks = [{"name": "onnx-vs-pytorch logits", "kind": "gate", "measured": worst, "op": "<=", "limit": limit,
               "passed": True},
              {"name": "greedy tokens agree", "kind": "gate", "measured": agreement, "op": ">=",
               "limit": 1.0 if exact_tokens else 0.0, "passed": True}]
    return write_manifest(staging, {
        "name": name, "created": utc_now(), "kind": "onnx-causal-lm",
        "runtime": {"engine": "inferforge.optimize.onnx_decoder.OnnxDecoder", "model": "model.onnx",
                    "model_type": spec.model_type, "dtype": dtype, "onnxruntime_session_config": session_config,
                    "external_data": "model.onnx_data" if len(files) > 1 else None},
        "source": {"model": given, "path": str(source.model_dir.resolve()),
                   "weights_sha256": weights_sha256(source.model_dir)},
        "parent": parent,
        # export.dtype: the graph's weights (fp32, fp16, or the quantized format); runtime.dtype: its activations.
        "export": {"format": fmt, "opset": opset, "opset_requested": requested,
                   "dtype": quantized["format"] if quantized else dtype, "task": llm_export.DECODER_TASK,
                   "exporter": exporter_versions()},
        "validation": validation, "throughput": throughput, **extra,
        "steps": steps, "checks": checks, "passed": True, "accuracy_passed": True, "environment": environment(),
    })


def _torch_reference(model_dir: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir)).float().eval()
    finally:
        hf_logging.set_verbosity(verbosity)


def _step(name: str, started: float, settings: dict, summary: str, progress) -> dict:
    seconds = time.perf_counter() - started
    progress.done(name, seconds, summary)
    return {"name": name, "settings": settings, "duration_s": seconds, "summary": summary}
