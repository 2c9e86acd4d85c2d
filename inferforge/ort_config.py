"""`ort_config.json`: how an ONNX artifact's `model.onnx` is meant to be opened, for any reader
(encoders; decoders from `inferforge export` through `decoder_ort_config`).

The file follows optimum's `ORTConfig` layout (`optimum.onnxruntime.ORTConfig.from_pretrained(DIR)`
reads it): `opset`, `use_external_data_format`, `one_external_file`, `optimization` (the graph
optimization level the model was validated at, 99 = ORT_ENABLE_ALL, and that the SkipLayerNorm
fusions are off) and `quantization` (optimum's `QuantizationConfig` fields for the int8 model, `{}`
for fp32). Two blocks optimum ignores carry the rest:

- `session_options`: what `inferforge.load` passes to ONNX Runtime (`graph_optimization_level`,
  `disabled_optimizers`, `config_entries`; see `inferforge.encoder.ort_session`). For artifacts
  written by this version nothing in it is needed for speed: the graph itself keeps ONNX Runtime's
  slow SkipLayerNormFusion from matching (`inferforge.optimize.ort_fusions`), so a plain
  `onnxruntime.InferenceSession("model.onnx")` runs the same graph. `allow_spinning: 0` only helps
  when other work shares the cores.
- `inferforge`: the graph rewrites and the embedding quantization applied to the file.

An artifact without `ort_config.json` (written before it existed) is opened with the manifest's
`runtime.onnxruntime_disabled_optimizers`, else `DEFAULT_SESSION_OPTIONS` (SkipLayerNormFusion off).
"""

from __future__ import annotations

import json
from pathlib import Path

from inferforge.encoder import DEFAULT_SESSION_OPTIONS
from inferforge.errors import ArtifactError
from inferforge.fileio import atomic_write_text

ORT_CONFIG_NAME = "ort_config.json"

# What the models this version writes are validated and benchmarked with (the pipeline's own sessions).
SESSION_OPTIONS = {
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "disabled_optimizers": [],
    "config_entries": {"session.intra_op.allow_spinning": "0"},
}

_LEVELS = {"ORT_DISABLE_ALL": 0, "ORT_ENABLE_BASIC": 1, "ORT_ENABLE_EXTENDED": 2, "ORT_ENABLE_ALL": 99}
_KEYS = {"graph_optimization_level", "disabled_optimizers", "config_entries"}


def _optimum_quantization(record: dict | None) -> dict:
    """optimum `QuantizationConfig` fields for the quantize step's record (`{}` without one)."""
    if not record:
        return {}
    static = record.get("method") == "static-qdq"
    return {"is_static": static, "format": "QDQ" if static else "QOperator",
            "mode": "QLinearOps" if static else "IntegerOps",
            "activations_dtype": "QInt8" if static else "QUInt8", "activations_symmetric": static,
            "weights_dtype": "QInt8", "weights_symmetric": True, "per_channel": bool(record.get("per_channel")),
            "reduce_range": False, "nodes_to_quantize": [], "nodes_to_exclude": list(record.get("excluded_nodes", [])),
            "operators_to_quantize": ["MatMul"]}


def ort_config(*, opset: int, quantization: dict | None = None, rewrites: dict | None = None,
               embeddings: dict | None = None, session_options: dict | None = None) -> dict:
    """The `ort_config.json` content. `quantization` is the quantize step's record (None for fp32),
    `rewrites` the graph rewrites applied (name -> count), `embeddings` the embedding quantization."""
    options = SESSION_OPTIONS if session_options is None else session_options
    return {
        "opset": opset,
        "use_external_data_format": False,
        "one_external_file": True,
        "optimization": {"optimization_level": _LEVELS[options["graph_optimization_level"]], "optimize_for_gpu": False,
                         "fp16": False, "enable_transformers_specific_optimizations": False,
                         "disable_skip_layer_norm_fusion": True, "disable_bias_skip_layer_norm_fusion": True},
        "quantization": _optimum_quantization(quantization),
        "session_options": options,
        "inferforge": {"graph_rewrites": rewrites or {}, "embeddings": embeddings},
    }


def model_opset(onnx_path: str | Path) -> int:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def write_ort_config(directory: str | Path, config: dict) -> Path:
    path = Path(directory) / ORT_CONFIG_NAME
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")
    return path


def check_session_options(options, source: str) -> dict:
    """`options` if it is a session-options block this version can apply; else ArtifactError naming `source`."""
    if not isinstance(options, dict):
        raise ArtifactError(f"{source}: session_options must be an object; re-run the command or recipe that wrote the artifact")
    unknown = sorted(set(options) - _KEYS)
    if unknown:
        raise ArtifactError(f"{source}: unknown session option {unknown[0]!r} (this version reads "
                            f"{', '.join(sorted(_KEYS))}); upgrade inferforge or re-run the command or recipe that wrote the artifact")
    level = options.get("graph_optimization_level", "ORT_ENABLE_ALL")
    if level not in _LEVELS:
        raise ArtifactError(f"{source}: graph_optimization_level {level!r} is not one of {', '.join(_LEVELS)}")
    disabled = options.get("disabled_optimizers", [])
    entries = options.get("config_entries", {})
    if not isinstance(disabled, list) or not all(isinstance(d, str) for d in disabled):
        raise ArtifactError(f"{source}: disabled_optimizers must be a list of graph transformer names")
    if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
        raise ArtifactError(f"{source}: config_entries must map session config keys to strings")
    return options


def read_session_options(directory: str | Path, manifest: dict) -> dict:
    """The session options an encoder artifact asks for: its `ort_config.json`'s `session_options`,
    else (older artifacts) the manifest's disabled optimizers, else `DEFAULT_SESSION_OPTIONS`."""
    path = Path(directory) / ORT_CONFIG_NAME
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: not valid JSON ({e}); re-run the command or recipe that wrote the artifact") from None
        if not isinstance(config, dict) or "session_options" not in config:
            raise ArtifactError(f"{path}: no session_options block; re-run the command or recipe that wrote the artifact")
        return check_session_options(config["session_options"], str(path))
    disabled = (manifest.get("runtime") or {}).get("onnxruntime_disabled_optimizers")
    if disabled is not None:
        return check_session_options({**DEFAULT_SESSION_OPTIONS, "disabled_optimizers": disabled},
                                     f"{directory}: manifest runtime.onnxruntime_disabled_optimizers")
    return DEFAULT_SESSION_OPTIONS


def decoder_ort_config(*, opset: int, config_entries: dict[str, str] | None = None,
                       quantized_export: dict | None = None) -> dict:
    """`ort_config.json` of an `onnx-causal-lm` artifact (`inferforge export` of a decoder): the same
    layout, with `session_options.config_entries` the entries the graph needs on ONNX Runtime (fp8 QDQ
    on the CPU: `session.disable_quant_qdq=1`) and `inferforge.quantized_export` naming the format and
    its ops (None for a float graph). The decoder's own quantization is in the graph, so optimum's
    `quantization` block stays `{}`."""
    options = {"graph_optimization_level": "ORT_ENABLE_ALL", "disabled_optimizers": [],
               "config_entries": dict(config_entries or {})}
    config = ort_config(opset=opset, session_options=options)
    config["optimization"].update(disable_skip_layer_norm_fusion=False, disable_bias_skip_layer_norm_fusion=False)
    config["inferforge"] = {"quantized_export": None if quantized_export is None else
                            {k: quantized_export.get(k) for k in ("format", "op", "bits", "block_size", "opset")}}
    return config


def decoder_session_config(directory: str | Path) -> dict[str, str]:
    """Session config entries an `onnx-causal-lm` artifact asks for: its `ort_config.json`'s
    `session_options.config_entries`, else (written before that file) the manifest's
    `quantized_export.onnxruntime_session_config`; `{}` when neither has any."""
    from inferforge.manifest import MANIFEST_NAME, read_manifest

    directory = Path(directory)
    if (directory / ORT_CONFIG_NAME).is_file():
        return dict(read_session_options(directory, {}).get("config_entries", {}))
    if not (directory / MANIFEST_NAME).is_file():
        return {}
    return dict((read_manifest(directory).get("quantized_export") or {}).get("onnxruntime_session_config") or {})
