"""Export a quantized language-model artifact (`inferforge quantize LLAMA_DIR --config FORMAT`) to ONNX.

    graph = export_quantized_graph("llama-int4", "work/")
    graph.onnx_path          # the quantized decoder (inputs/outputs of `export_decoder_onnx`)
    graph.float_onnx_path    # the float decoder it was rewritten from (dequantized weights)
    graph.reference          # the PyTorch model to validate the ONNX graph against

How: the artifact's quantized model is turned into a float checkpoint whose weights are each
layer's `dequantized_weight()` (for AWQ that includes the division by the input scale, so the float
graph is equivalent), exported with `export_decoder_onnx`, and each quantized layer's MatMul is
rewritten (`onnx_quant_graph`):

    int4-g128 / int4-gptq / int4-awq  MatMulNBits bits=4, block = group size, zero points when
                                      asymmetric (AWQ: Div by the input scale in front)
    int8-weight-only                  int8 weights + per-channel DequantizeLinear -> MatMul, run with
                                      session.disable_quant_qdq=1 (INT8_WEIGHT_ONLY_CPU below)
    w8a8                              int8 QDQ: Mul by 1/smooth, QuantizeLinear/DequantizeLinear
                                      with a static per-tensor scale, int8 weights + per-channel DQ
    fp8                               the same with float8e4m3fn (opset >= 19)

The reference for weight-only formats is the artifact's quantized model with each layer computing
`x @ dequantize(W_q)^T` in float32 (what the artifact computes on the CPU, and what MatMulNBits
computes), so greedy tokens must match. W8A8 and FP8 artifacts quantize activations
dynamically; the graph uses static scales from calibration text, so its reference is a PyTorch model
doing the same static arithmetic, and the cost of static scales is measured against the artifact's
dynamic model on held-out text: top-1 agreement below the artifact's own gate
(`min_top1_agreement`, default 0.9) raises `GateFailed`.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from inferforge.errors import GateFailed, UserInputError

KIND = "quantized-causal-lm"
WEIGHT_ONLY = ("int4-g128", "int4-gptq", "int4-awq", "int8-weight-only")
QDQ_FORMATS = ("w8a8", "fp8")
FP8_MIN_OPSET = 19
# ONNX Runtime's CPU QDQ fusion turns QuantizeLinear/DequantizeLinear + MatMul into MatMulIntegerToFloat,
# which has no float8 kernel (session creation fails); with this entry the fp8 QDQ nodes run as written.
FP8_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}
# int8-weight-only on ONNX Runtime 1.31 CPU, decode tokens/s at batch 1 of a random Llama (hidden 512,
# 4 layers, vocab 4096; 2 shared cores, rough; scripts/bench_onnx_nbits_variants.py): MatMulNBits
# bits=8 16-22 (float32 graph 85-139); MatMulNBits accuracy_level=4 135-260 and DQ + MatMul under the
# default QDQ fusion 127-263, but both quantize activations (logits move by ~0.2, greedy tokens
# differ); DQ + MatMul with this entry 81 (= float32, same logits). So int8 exports as DQ + MatMul
# with this entry: float32 speed and numbers, a quarter of the float file.
INT8_WEIGHT_ONLY_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}
# Tolerances of the ONNX graph against `reference` (float32). Weight-only: the same dequantized
# weights, only the summation order differs. QDQ: the same, but a value that lands next to a
# rounding boundary may round the other way in one engine and move by one quantization step.
LOGITS_ATOL = {"weight-only": 1e-3, "qdq": 5e-2}


@dataclass
class QuantizedGraph:
    onnx_path: Path
    float_onnx_path: Path
    reference: nn.Module
    exact_tokens: bool
    logits_atol: float
    manifest: dict


def _stage(progress, text: str):
    return progress.spinner(text) if progress is not None else contextlib.nullcontext()


def read_quantized_artifact(artifact: Path) -> tuple[dict, dict]:
    """(manifest, quantization.json) of a verified quantized-causal-lm artifact, else a one-line error."""
    from inferforge.manifest import verify_artifact
    from inferforge.runtime.llama_quantized import read_quantization

    manifest = verify_artifact(artifact)
    if manifest.get("kind") != KIND:
        raise UserInputError(f"{artifact}: a {manifest.get('kind')!r} artifact, not a {KIND}; give an artifact written "
                             "by `inferforge quantize LLAMA_DIR --config FORMAT`")
    meta = read_quantization(artifact)
    if meta is None or not meta["layers"]:
        raise UserInputError(f"{artifact}: no quantized layers in quantization.json; the artifact is damaged, "
                             "re-run `inferforge quantize`")
    return manifest, meta


def _check_formats(artifact: Path, fmt: str, meta: dict, opset: int) -> None:
    from inferforge.optimize.onnx_quant_graph import check_block_size

    if fmt not in WEIGHT_ONLY + QDQ_FORMATS:
        raise UserInputError(f"{artifact}: quantization format {fmt!r} has no ONNX export; supported: "
                             f"{', '.join(WEIGHT_ONLY + QDQ_FORMATS)}")
    for name, info in meta["layers"].items():
        if info["format"] == "int4":
            check_block_size(int(info["group_size"]), name)
    if fmt == "fp8" and opset < FP8_MIN_OPSET:
        raise UserInputError(f"--opset {opset}: float8e4m3fn QuantizeLinear/DequantizeLinear need opset >= "
                             f"{FP8_MIN_OPSET}; pass --opset {FP8_MIN_OPSET} or higher, or leave --opset out (the "
                             f"export picks {FP8_MIN_OPSET} for fp8)")


def dequantized_model(model: nn.Module, layers: list[str]) -> nn.Module:
    """A float copy of the quantized `model`: each named layer an nn.Linear holding `dequantized_weight()`."""
    dense = copy.deepcopy(model)
    for name in layers:
        module = dense.get_submodule(name)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.dequantized_weight().float())
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent) if parent else dense, child, linear)
    if "lm_head" in layers and getattr(dense.config, "tie_word_embeddings", False):
        dense.config.tie_word_embeddings = False     # the quantized head no longer equals the embeddings
    return dense.eval()


def _export_float(model: nn.Module, artifact: Path, work: Path, opset: int) -> Path:
    from inferforge.artifact import CHECKPOINT_FILES
    from inferforge.optimize.llm_export import export_decoder_onnx

    checkpoint = work / "float-checkpoint"
    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    model.save_pretrained(checkpoint, safe_serialization=True)
    for name in CHECKPOINT_FILES:
        if (artifact / name).is_file() and not (checkpoint / name).is_file():
            shutil.copyfile(artifact / name, checkpoint / name)
    try:
        return export_decoder_onnx(checkpoint, work / "onnx-float", opset=opset)
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)    # a second copy of the weights; the graph holds them


def _layer_weights(model: nn.Module, meta: dict, scales: dict[str, float]) -> dict:
    from inferforge.optimize.onnx_quant_graph import QDQWeight, int4_nbits, int8_dq
    from inferforge.optimize.onnx_quant_reference import input_multiplier, weight_codes

    weights = {}
    for name, info in meta["layers"].items():
        module = model.get_submodule(name)
        if info["format"] == "int4":
            weights[name] = int4_nbits(module)
        elif info["format"] == "int8":
            weights[name] = int8_dq(module)
        else:
            codes, w_scale = weight_codes(module)
            mult = input_multiplier(module)
            w_scale_np = w_scale.cpu().numpy()
            weights[name] = QDQWeight(module.in_features, module.out_features, codes.T.contiguous(),
                                      w_scale_np.reshape(()) if w_scale.numel() == 1 and info["format"] == "fp8"
                                      else w_scale_np, scales[name], None if mult is None else mult.cpu().numpy())
    return weights


def export_quantized_graph(artifact_dir, work_dir, *, opset: int = 21, calibration=None,
                           progress=None) -> QuantizedGraph:
    """Export the quantized-causal-lm artifact `artifact_dir` to `work_dir/onnx-quantized/model.onnx`
    (and its float counterpart to `work_dir/onnx-float/model.onnx`); see the module docstring.

    `calibration`: a .txt / .jsonl file for the static activation scales of w8a8 / fp8 (default: the
    artifact's own calibration file when it is found unchanged). Raises `UserInputError` for a
    directory that is not such an artifact, a group size MatMulNBits cannot take, or missing
    calibration text; `GateFailed` when static scales lose too much top-1 agreement."""
    from inferforge.optimize.llm_quantize import load_as_transformers
    from inferforge.optimize.onnx_quant_graph import rewrite_quantized_matmuls
    from inferforge.optimize.onnx_quant_reference import (
        collect_static_scales,
        resolve_calibration,
        static_agreement,
        static_reference,
        weight_only_reference,
    )

    artifact, work = Path(artifact_dir).resolve(), Path(work_dir)
    manifest, meta = read_quantized_artifact(artifact)
    fmt = manifest["quantization"]["format"]
    _check_formats(artifact, fmt, meta, opset)
    qdq = fmt in QDQ_FORMATS
    cal_file = cal_batches = held_out = None
    if qdq:
        cal_file, cal_batches, held_out = resolve_calibration(artifact, manifest, calibration)
    work.mkdir(parents=True, exist_ok=True)
    with _stage(progress, "loading the quantized model"):
        model = load_as_transformers(artifact).eval()
    layers = list(meta["layers"])
    with _stage(progress, "exporting the dequantized float decoder"):
        float_onnx = _export_float(dequantized_model(model, layers), artifact, work, opset)
    scales, agreement = {}, None
    if not qdq:
        reference = weight_only_reference(model, layers)
    else:
        with _stage(progress, "calibrating static activation scales"):
            scales = collect_static_scales(model, layers, cal_batches)
            reference = static_reference(model, scales)
            agreement = static_agreement(model, reference, held_out)
    out_dir = work / "onnx-quantized"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    weights = _layer_weights(model, meta, scales)
    stats = rewrite_quantized_matmuls(float_onnx, out_dir / "model.onnx", weights, progress=progress)
    stats["zero_points"] = any(getattr(w, "zero_points", None) is not None for w in weights.values())
    blocks = sorted({w.block_size for w in weights.values() if hasattr(w, "block_size")})
    stats["block_size"] = blocks[0] if len(blocks) == 1 else blocks
    for extra in float_onnx.parent.iterdir():          # config, generation config, tokenizer
        if extra.is_file() and not extra.name.startswith(float_onnx.name):
            shutil.copyfile(extra, out_dir / extra.name)
    record = _manifest(artifact, manifest, meta, fmt, opset, stats, cal_file, agreement)
    check = record["quantized_export"].get("checks", [{}])[0]
    if qdq and not check["passed"]:
        raise GateFailed(f"{artifact.name}: static activation scales (from {cal_file.name}) agree with the artifact's "
                         f"dynamic {fmt} model on {agreement['top1_agreement']:.2%} of held-out top-1 tokens, below its "
                         f"gate's {check['limit']:.2%}; calibrate on text closer to the served traffic (--calibration "
                         "FILE), or export int8-weight-only / int4 instead")
    reference.eval()
    return QuantizedGraph(onnx_path=out_dir / "model.onnx", float_onnx_path=float_onnx, reference=reference,
                          exact_tokens=not qdq, logits_atol=LOGITS_ATOL["qdq" if qdq else "weight-only"],
                          manifest=record)


def _manifest(artifact: Path, parent: dict, meta: dict, fmt: str, opset: int, stats: dict, cal_file, agreement) -> dict:
    from inferforge.manifest import DIGEST_KEY, MANIFEST_NAME
    from inferforge.optimize.onnx_quant_reference import sha256_of

    formats = {info["format"] for info in meta["layers"].values()}
    op = "QDQ" if fmt in QDQ_FORMATS else "DequantizeLinear+MatMul" if fmt == "int8-weight-only" else "MatMulNBits"
    export = {"format": fmt, "op": op, "opset": opset,
              "layers": stats["rewritten"], "layers_float": len(meta.get("skipped", [])) + len(meta.get("auto_skipped", [])),
              "float_layers": [*meta.get("skipped", []), *meta.get("auto_skipped", [])],
              "external_data": stats["external_data"], "graph_bytes": stats["bytes"]}
    if "int4" in formats:
        groups = sorted({int(i["group_size"]) for i in meta["layers"].values() if i["format"] == "int4"})
        export.update(bits=4, block_size=groups[0] if len(groups) == 1 else groups,
                      zero_points=stats["zero_points"], awq_input_scale=fmt == "int4-awq")
    elif "int8" in formats:
        export.update(bits=8, block_size=None, zero_points=False, weights="int8 per output channel",
                      note="symmetric int8 W^T [K, N] with a per-channel DequantizeLinear (axis 1) feeding the float "
                           "MatMul; ONNX Runtime CPU folds it to float32 weights at session creation with "
                           "session.disable_quant_qdq=1 (without it, its QDQ fusion quantizes activations)",
                      onnxruntime_session_config=dict(INT8_WEIGHT_ONLY_SESSION_CONFIG))
    else:
        limits = (parent.get("gate") or {}).get("limits") or (parent.get("gate") or {}).get("default_limits") or {}
        limit = limits.get("min_top1_agreement")
        limit = 0.9 if limit is None else float(limit)
        export.update(weights="int8 per output channel" if fmt == "w8a8" else "float8e4m3fn", zero_points=False,
                      activations="int8" if fmt == "w8a8" else "float8e4m3fn",
                      activation_scales=f"static per-tensor from {cal_file.name} sha256 {sha256_of(cal_file)}",
                      smoothquant=fmt == "w8a8",
                      reference="PyTorch with the graph's static QDQ arithmetic; the artifact's dynamic per-token "
                                "activations cannot match a static graph token for token",
                      static_vs_dynamic=agreement,
                      checks=[{"name": "top-1 agreement, static vs dynamic activation scales (held-out)", "kind": "gate",
                               "measured": agreement["top1_agreement"], "op": ">=", "limit": limit,
                               "passed": agreement["top1_agreement"] >= limit}])
        if fmt == "fp8":
            export["onnxruntime_session_config"] = dict(FP8_SESSION_CONFIG)
            export["onnxruntime_cpu"] = ("runs with session config session.disable_quant_qdq=1 (ONNX Runtime's QDQ "
                                         "fusion has no float8 MatMulIntegerToFloat kernel)")
    # manifest_sha256 means what it means everywhere: the parent manifest's own digest (its DIGEST_KEY);
    # the sha256 of the manifest.json file's bytes is another number, under its own name.
    record = {"name": parent.get("name"), "version": parent.get("version"), "manifest_sha256": parent.get(DIGEST_KEY),
              "manifest_file_sha256": sha256_of(artifact / MANIFEST_NAME), "path": str(artifact),
              "kind": parent.get("kind")}
    return {"quantized_export": export, "parent": record,
            "parent_gate": {"gate": parent.get("gate"), "checks": parent.get("checks"),
                            "validation": parent.get("validation")},
            "lineage": lineage_chain(parent, str(artifact))}


def lineage_chain(manifest: dict, path: str) -> list[dict]:
    """The artifact and its ancestors, nearest first (each through its recorded parent, as
    `registry_lineage` follows them), ending with the source checkpoint."""
    from inferforge.errors import ArtifactError
    from inferforge.manifest import read_manifest
    from inferforge.registry_lineage import MAX_DEPTH, data_hashes, parent_record

    chain = []
    for _ in range(MAX_DEPTH):
        chain.append({"name": manifest.get("name"), "version": manifest.get("version"), "kind": manifest.get("kind"),
                      "path": path, "steps": [s.get("name") for s in manifest.get("steps") or [] if isinstance(s, dict)],
                      "data": data_hashes(manifest)})
        record = parent_record(manifest)
        if record is None:
            if manifest.get("source"):
                chain.append({"source": manifest["source"]})
            break
        path = record.get("path")
        try:
            manifest = read_manifest(path) if path else None
        except ArtifactError:
            manifest = None
        if manifest is None or manifest.get("version") != record.get("version"):
            chain.append({"name": record.get("name"), "version": record.get("version"), "path": path,
                          "note": "not found at its recorded path; as its child recorded it"})
            break
    return chain
