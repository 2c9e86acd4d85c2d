"""Can TensorRT build an engine from this ONNX graph? A static readiness report, plus the trtexec line.

`readiness_report` checks a graph against the ONNX-TensorRT operator matrix in
`data/tensorrt_ops.json` (the TensorRT version and source page are recorded there):

- opset: the default-domain opset lies in the range TensorRT's parser supports;
- contrib-op: every node is in the default ONNX domain (ONNX Runtime's `com.microsoft` operators
  such as MatMulNBits or SkipLayerNormalization have no TensorRT parser);
- unsupported-op: every op type is in the supported list;
- input-type: the first (data) input of each node has a type the operator takes in TensorRT;
- non-qdq-quantization: quantization only as explicit, symmetric, signed QuantizeLinear /
  DequantizeLinear pairs (QLinear*, MatMulInteger, ConvInteger, DynamicQuantizeLinear, MatMulNBits
  are ONNX Runtime's integer formats); qdq-zero-point: Q/DQ zero points are signed and zero;
- profile: every dynamic dimension of every input has a min / opt / max in the profile;
- position-limit: given the model's `max_position_embeddings`, no sequence axis of the profile
  (sequence, past, or their sum) goes beyond it;
- int64 (warnings): INT64 initializers and casts to INT64, and INT64 constants beyond the INT32 range.

Errors make `ready` False; warnings do not. Each finding names the node (or initializer / input) and
its op type. Subgraphs (If / Loop bodies) are walked too. `write_tensorrt_files` writes the report
(JSON and Markdown), the profiles and a `trtexec.sh` beside a model; `build_and_compare` builds an
engine where the `tensorrt` package and a CUDA GPU are present.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

from inferforge.errors import UserInputError
from inferforge.fileio import atomic_write_json, atomic_write_text
from inferforge.optimize.tensorrt_profiles import (
    PROFILE_KEYS,
    default_profiles,
    graph_inputs,
    model_profiles,
    position_problems,
    profile_problems,
    shape_arg,
)

__all__ = ["default_profiles", "model_profiles", "readiness_report", "write_tensorrt_files", "build_and_compare"]

DATA_FILE = Path(__file__).parent / "data" / "tensorrt_ops.json"
DEFAULT_DOMAINS = ("", "ai.onnx")
# ONNX Runtime's integer quantization formats: TensorRT takes quantization only as Q/DQ pairs.
NON_QDQ_QUANT_OPS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
                     "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSoftmax", "QGemm",
                     "QAttention", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
                     "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized"}
SIGNED_QUANT_TYPES = {"INT8", "FP8", "INT4"}
INT32_MAX = 2**31 - 1
# ONNX TensorProto element types by the names the operator matrix uses.
_TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
               9: "BOOL", 10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 16: "BF16", 17: "FP8", 18: "FP8",
               19: "FP8", 20: "FP8", 21: "UINT4", 22: "INT4"}


@cache
def operator_table() -> dict:
    """The operator matrix: trt_version, source, opset {min, max}, operators {op: {types, note}}."""
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def _walk(graph):
    """Every node of `graph` and of its subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _walk(sub)


def _finding(check, message, *, name=None, op_type=None, severity="error") -> dict:
    return {"severity": severity, "check": check, "name": name, "op_type": op_type, "message": message}


def _constant_arrays(model) -> tuple[dict, dict]:
    """({tensor name: numpy array}, {tensor name: (owner name, owner kind)}) of every integer
    initializer stored inline and every Constant node's value (external-data weights are not read)."""
    import onnx
    from onnx import numpy_helper

    # Integer initializers only (INT64 values, Q/DQ zero points); float weights are not converted.
    arrays, owners = {}, {}
    for t in model.graph.initializer:
        if t.data_type not in (1, 10, 11, 16) and t.data_location != onnx.TensorProto.EXTERNAL:
            arrays[t.name], owners[t.name] = numpy_helper.to_array(t), (t.name, "initializer")
    for node in _walk(model.graph):
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value":
                    arrays[node.output[0]] = numpy_helper.to_array(attr.t)
                    owners[node.output[0]] = (node.name or node.output[0], "Constant")
    return arrays, owners


def _element_types(model) -> dict[str, int]:
    """Tensor name -> ONNX element type, from the graph and ONNX shape inference."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a help here; without it fewer types are known
        inferred = model
    types = {}
    for graph_values in (inferred.graph.value_info, inferred.graph.input, inferred.graph.output):
        for value in graph_values:
            types[value.name] = value.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    for node in _walk(model.graph):
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def readiness_report(onnx_path: str | Path, *, profiles: dict | None, position_limit: int | None = None) -> dict:
    """Check the graph at `onnx_path` for a TensorRT engine build with `profiles`
    ({input: {"min": [...], "opt": [...], "max": [...]}}; None: `default_profiles(onnx_path)`).
    `position_limit`, when known, is the model's `max_position_embeddings`: a profile whose sequence
    axes go beyond it is an error (shapes the model cannot run).

    Returns {"ready", "trt_version", "source", "opset", "opset_range", "errors", "warnings",
    "op_counts", "profiles"}; each error or warning is {"severity", "check", "name", "op_type",
    "message"}. Weights in external data are not read.
    """
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserInputError(f"{onnx_path}: no such ONNX file; export the model first")
    table = operator_table()
    model = onnx.load(str(onnx_path), load_external_data=False)
    if profiles is None:
        profiles = default_profiles(onnx_path)
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise UserInputError('a TensorRT profile is a JSON object {input: {"min": [...], "opt": [...], "max": [...]}}')
    findings = []
    low, high = table["opset"]["min"], table["opset"]["max"]
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset is None or not low <= opset <= high:
        findings.append(_finding("opset", f"opset {opset} is outside TensorRT {table['trt_version']}'s range {low}..{high}; "
                                          f"re-export with an opset in that range", name="ai.onnx", op_type="opset"))
    types = _element_types(model)
    arrays, owners = _constant_arrays(model)
    op_counts: dict[str, int] = {}
    for node in _walk(model.graph):
        label = node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
        op_counts[label] = op_counts.get(label, 0) + 1
        findings += _node_findings(node, table, types, arrays)
    for t in model.graph.initializer:
        if t.data_type == 7:
            findings.append(_finding("int64", "INT64 initializer: TensorRT 10 keeps INT64 only for shape and index "
                                     "arithmetic; older TensorRT narrows it to INT32", name=t.name,
                                     op_type="initializer", severity="warning"))
    for name, array in arrays.items():
        if array.dtype == np.int64 and array.size and int(np.abs(array).max()) > INT32_MAX:
            findings.append(_finding("int64", "INT64 constant beyond the INT32 range (often INT64_MAX as a Slice end); "
                                     "an INT32 build clamps it to 2^31-1", name=owners[name][0],
                                     op_type=owners[name][1], severity="warning"))
    for name, problem in profile_problems(graph_inputs(model), profiles):
        findings.append(_finding("profile", problem, name=name, op_type="input"))
    if position_limit:
        for name, problem in position_problems(graph_inputs(model), profiles, position_limit):
            findings.append(_finding("position-limit", problem, name=name, op_type="input"))
    errors = [f for f in findings if f["severity"] == "error"]
    return {
        "ready": not errors,
        "onnx": onnx_path.name,
        "trt_version": table["trt_version"],
        "source": table["source"],
        "opset": opset,
        "opset_range": [low, high],
        "position_limit": position_limit,
        "errors": errors,
        "warnings": [f for f in findings if f["severity"] == "warning"],
        "op_counts": dict(sorted(op_counts.items())),
        "profiles": profiles,
    }


def _node_findings(node, table: dict, types: dict, arrays: dict) -> list[dict]:
    found = []
    name, op = node.name or (node.output[0] if node.output else "?"), node.op_type
    version = table["trt_version"]
    if op in NON_QDQ_QUANT_OPS:
        found.append(_finding("non-qdq-quantization", f"{op} is ONNX Runtime integer quantization; TensorRT takes "
                              "quantization only as explicit QuantizeLinear/DequantizeLinear pairs", name=name, op_type=op))
    if node.domain not in DEFAULT_DOMAINS:
        found.append(_finding("contrib-op", f"operator of domain '{node.domain}' (an ONNX Runtime contrib op); "
                              "TensorRT parses only the default ONNX domain", name=name, op_type=op))
        return found
    spec = table["operators"].get(op)
    if spec is None:
        found.append(_finding("unsupported-op", f"{op} is not in TensorRT {version}'s ONNX operator list",
                              name=name, op_type=op))
        return found
    data_type = _TYPE_NAMES.get(types.get(node.input[0], 0)) if node.input and node.input[0] else None
    if data_type and spec["types"] and data_type not in spec["types"]:
        if data_type == "DOUBLE":
            found.append(_finding("input-type", f"{op} on DOUBLE: TensorRT narrows it to FP32", name=name, op_type=op,
                                  severity="warning"))
        else:
            found.append(_finding("input-type", f"{op} takes {', '.join(spec['types'])} in TensorRT {version}, "
                                  f"not {data_type}", name=name, op_type=op))
    if op == "Cast" and any(a.name == "to" and a.i == 7 for a in node.attribute):
        found.append(_finding("int64", "Cast to INT64: TensorRT 10 computes INT64 only in shape and index layers; "
                              "older TensorRT narrows it to INT32", name=name, op_type=op, severity="warning"))
    if op in ("QuantizeLinear", "DequantizeLinear"):
        found += _qdq_findings(node, types, arrays, name)
    return found


def _qdq_findings(node, types: dict, arrays: dict, name: str) -> list[dict]:
    """TensorRT's Q/DQ: signed quantized type (INT8, FP8, INT4) and zero point 0 (symmetric)."""
    zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zero_point is None:
        # No zero point: QuantizeLinear then outputs UINT8 (DequantizeLinear's type is its input's).
        zp_type = "UINT8" if node.op_type == "QuantizeLinear" else None
    else:
        zp_type = _TYPE_NAMES.get(types.get(zero_point, 0))
    found = []
    if zp_type and zp_type not in SIGNED_QUANT_TYPES:
        found.append(_finding("qdq-zero-point", f"{node.op_type} quantizes to {zp_type}; TensorRT needs INT8, FP8 or "
                              "INT4 (quantize with signed, symmetric activations and weights)", name=name,
                              op_type=node.op_type))
    values = arrays.get(zero_point) if zero_point else None
    if values is not None and np.any(values != 0):
        found.append(_finding("qdq-zero-point", f"{node.op_type} has a nonzero zero point (asymmetric); TensorRT needs "
                              "zero points of 0", name=name, op_type=node.op_type))
    return found


def _precision_flag(onnx_path: Path) -> tuple[str, str]:
    """(trtexec flag, why): the graph's own types decide for FP16 and Q/DQ graphs."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = {n.op_type for n in _walk(model.graph)}
    float_types = {t.data_type for t in model.graph.initializer} | {
        v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        return "--stronglyTyped", "explicit Q/DQ quantization: the graph's types decide each layer's precision"
    if 10 in float_types or 16 in float_types:
        return "--stronglyTyped", "an FP16/BF16 graph: build it in the types it was exported with"
    return "", "an FP32 graph built in FP32; add --fp16 to let TensorRT pick FP16 kernels (check accuracy after)"


def write_tensorrt_files(dest_dir: str | Path, onnx_name: str = "model.onnx", *, profiles: dict | None,
                         position_limit: int | None = None) -> dict:
    """Write `dest_dir/tensorrt/{readiness.json, readiness.md, profiles.json, trtexec.sh}` for the graph
    `dest_dir/onnx_name`, each file atomically (`position_limit`: see `readiness_report`). Returns
    {"ready", "errors", "warnings" (counts), "trt_version", "precision_flag", "files",
    "error_summary" (the errors grouped by check and op type, `error_summary`)} for the caller's manifest."""
    dest_dir = Path(dest_dir)
    onnx_path = dest_dir / onnx_name
    report = readiness_report(onnx_path, profiles=profiles, position_limit=position_limit)
    profiles = report["profiles"]
    out = dest_dir / "tensorrt"
    flag, why = _precision_flag(onnx_path)
    atomic_write_json(out / "readiness.json", report)
    atomic_write_text(out / "readiness.md", render_readiness_markdown(report))
    atomic_write_json(out / "profiles.json", profiles)
    atomic_write_text(out / "trtexec.sh", trtexec_script(onnx_name, profiles, flag, why))
    (out / "trtexec.sh").chmod(0o755)
    return {"ready": report["ready"], "errors": len(report["errors"]), "warnings": len(report["warnings"]),
            "trt_version": report["trt_version"], "precision_flag": flag or None,
            "files": [f"tensorrt/{n}" for n in ("readiness.json", "readiness.md", "profiles.json", "trtexec.sh")],
            "error_summary": error_summary(report["errors"])}


def error_summary(errors: list[dict], *, shown: int = 3) -> str:
    """'contrib-op: 12 x com.microsoft MatMulNBits (e.g. /model/...); opset: ...' grouped by check and op."""
    groups: dict[tuple, list[str]] = {}
    for f in errors:
        groups.setdefault((f["check"], f["op_type"]), []).append(str(f["name"]))
    parts = [f"{check}: {len(names)} x {op} (e.g. {names[0]})" for (check, op), names in groups.items()]
    return "; ".join(parts[:shown]) + (f"; and {len(parts) - shown} more kinds" if len(parts) > shown else "")


def trtexec_script(onnx_name: str, profiles: dict, flag: str, why: str) -> str:
    engine = Path(onnx_name).with_suffix(".plan").name
    args = [f"--onnx=../{onnx_name}", f"--saveEngine={engine}"] + [
        f"--{key}Shapes={shape_arg(profiles, key)}" for key in PROFILE_KEYS] + ([flag] if flag else [])
    lines = " \\\n    ".join(f"'{a}'" for a in args)
    return ("#!/usr/bin/env bash\n"
            "# Build a TensorRT engine from the ONNX graph one directory up, with the optimization profile\n"
            f"# in profiles.json. Precision: {why}.\n"
            "set -euo pipefail\n"
            'cd "$(dirname "$0")"\n'
            f"trtexec {lines} \"$@\"\n")


def render_readiness_markdown(report: dict) -> str:
    verdict = "READY" if report["ready"] else "NOT READY"
    lines = [f"# TensorRT readiness: {verdict}", "",
             f"Graph `{report['onnx']}`, opset {report['opset']}, checked against TensorRT {report['trt_version']}'s "
             f"ONNX operator list (opsets {report['opset_range'][0]}..{report['opset_range'][1]}; "
             f"source: {report['source']}).", "",
             f"{len(report['errors'])} errors, {len(report['warnings'])} warnings. Errors stop an engine build; "
             "warnings are worth a look.", ""]
    findings = report["errors"] + report["warnings"]
    if findings:
        lines += ["| severity | check | node | op type | problem |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {f['severity']} | {f['check']} | `{f['name']}` | {f['op_type']} | {f['message']} |" for f in findings]
        lines.append("")
    lines += ["## Optimization profile", "", "| input | min | opt | max |", "| --- | --- | --- | --- |"]
    for name, shape in report["profiles"].items():
        lines.append(f"| `{name}` | " + " | ".join("x".join(map(str, shape[k])) for k in PROFILE_KEYS) + " |")
    return "\n".join(lines) + "\n"


def _example_feeds(onnx_path: Path, profiles: dict, key: str = "opt") -> dict:
    """Inputs at the profile's `key` shapes: attention masks of ones, position ids counting up,
    other integers in 0..9, floats from a seeded normal * 0.1."""
    import onnx

    rng = np.random.default_rng(0)
    dtypes = {1: np.float32, 10: np.float16, 6: np.int32, 7: np.int64, 9: np.bool_}
    feeds = {}
    for name, elem_type, _ in graph_inputs(onnx.load(str(onnx_path), load_external_data=False)):
        shape, dtype = profiles[name][key], dtypes[elem_type]
        if "mask" in name:
            feeds[name] = np.ones(shape, dtype)
        elif "position" in name:
            feeds[name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        elif np.issubdtype(dtype, np.integer):
            feeds[name] = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            feeds[name] = (rng.standard_normal(shape) * 0.1).astype(dtype)
    return feeds


def build_and_compare(onnx_path: str | Path, profiles: dict, reference_fn, *, atol: float = 1e-2) -> dict:
    """Build a TensorRT engine for `onnx_path` with `profiles`, run it on inputs at the opt shapes and
    compare every output with `reference_fn(feeds) -> {output name: array}` (e.g. ONNX Runtime).
    Needs the `tensorrt` package and a CUDA GPU. Returns {"max_abs_diff": {output: float}, "passed"}."""
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise UserInputError("build_and_compare needs a CUDA GPU; none is visible")
    onnx_path = Path(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser refused {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, shape in profiles.items():
        profile.set_shape(name, *(shape[k] for k in PROFILE_KEYS))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path.name}; see its log above")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    feeds = _example_feeds(onnx_path, profiles)
    buffers = {}
    for name, array in feeds.items():
        context.set_input_shape(name, array.shape)
        buffers[name] = torch.from_numpy(array).cuda()
    outputs = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
               if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT]
    for name in outputs:
        dtype = trt.nptype(engine.get_tensor_dtype(name))
        buffers[name] = torch.from_numpy(np.zeros(tuple(context.get_tensor_shape(name)), dtype)).cuda()
    for name, tensor in buffers.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()
    context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    reference = reference_fn(feeds)
    diffs = {name: float(np.abs(buffers[name].cpu().numpy().astype(np.float64) - reference[name]).max())
             for name in outputs}
    return {"max_abs_diff": diffs, "passed": all(d <= atol for d in diffs.values())}
