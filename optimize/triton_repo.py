"""Publish an exported ONNX artifact into an NVIDIA Triton Inference Server model repository.

Layout (Triton's): `REPOSITORY/<name>/config.pbtxt` and `REPOSITORY/<name>/<version>/model.onnx`
(+ its external data file, e.g. `model.onnx_data`, at the same relative location). Each export into
the same repository adds version max + 1; nothing is overwritten. The config serves the graph
with ONNX Runtime (platform `onnxruntime_onnx`) and carries the graph's input and output names,
types and dims: with `max_batch_size > 0` the leading batch axis is left out of `dims` (Triton adds
it), and dynamic axes are -1. Requests are grouped by Triton's dynamic batcher.

`instance_kind`: "gpu" -> KIND_GPU, "cpu" -> KIND_CPU, "auto" -> KIND_GPU for an FP16/BF16 graph
(exported for a GPU), KIND_CPU for a graph holding ONNX Runtime's CPU integer formats
(MatMulInteger, DynamicQuantizeLinear, ConvInteger, QLinear*), else KIND_AUTO (Triton's own rule:
the GPUs where there are any, the CPU otherwise). One instance each.

A decoder with past key/values is served stateless: each request sends `past_key_values.*` (empty,
past length 0, on the first step) and gets `present.*` back to send with the next one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from inferforge.errors import ArtifactError, UserInputError
from inferforge.fileio import atomic_write_text, make_public_dir, sha256_file

MODEL_FILE = "model.onnx"
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
CPU_INTEGER_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "QLinearMatMul", "QLinearConv"}
MAX_QUEUE_DELAY_US = 100
# ONNX TensorProto element type -> Triton data type.
TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
                7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
                12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}
_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def sanitize_model_name(name: str) -> str:
    """A Triton model (directory) name: letters, digits, '_', '.', '-', not starting with '.' or '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).lstrip(".-")
    return cleaned or "model"


def _signature(model, *, max_batch_size: int) -> dict:
    """{"input": [(name, TYPE_X, dims)], "output": [...]} as the config writes them."""
    initializers = {t.name for t in model.graph.initializer}
    signature = {}
    for section, values in (("input", model.graph.input), ("output", model.graph.output)):
        entries = []
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            if tensor.elem_type not in TRITON_TYPES:
                raise UserInputError(f"{section} '{value.name}' has ONNX element type {tensor.elem_type}, which Triton "
                                     "has no type for; export the model with standard tensor types")
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
            if max_batch_size > 0:
                if not dims or tensor.shape.dim[0].HasField("dim_value"):
                    raise UserInputError(f"{section} '{value.name}' has no dynamic batch axis first; pass "
                                         "max_batch_size=0 (the config then lists full shapes)")
                dims = dims[1:]
            entries.append((value.name, TRITON_TYPES[tensor.elem_type], dims))
        signature[section] = entries
    return signature


def _instance_kind(model, instance_kind: str) -> str:
    if instance_kind in INSTANCE_KINDS:
        return INSTANCE_KINDS[instance_kind]
    float_types = {t.data_type for t in model.graph.initializer} | {
        v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    if float_types & {10, 16}:
        return "KIND_GPU"
    if any(n.op_type in CPU_INTEGER_OPS for n in model.graph.node):
        return "KIND_CPU"
    return "KIND_AUTO"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(name: str, signature: dict, *, max_batch_size: int, kind: str, decoder: bool) -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig)."""
    lines = ["# Written by inferforge: ONNX Runtime serves the graph in each numbered version directory."]
    if decoder:
        lines += ["# A decoder with past key/values, served stateless: every request sends past_key_values.*",
                  "# (past length 0 on the first step) and receives present.* to send with the next request."]
    lines += [f"name: {_quote(name)}", 'platform: "onnxruntime_onnx"', 'backend: "onnxruntime"',
              f"max_batch_size: {max_batch_size}"]
    for section in ("input", "output"):
        lines.append(f"{section} [")
        entries = signature[section]
        for i, (tensor, data_type, dims) in enumerate(entries):
            lines += ["  {", f"    name: {_quote(tensor)}", f"    data_type: {data_type}",
                      f"    dims: [ {', '.join(str(d) for d in dims)} ]", "  }" + ("," if i < len(entries) - 1 else "")]
        lines.append("]")
    if max_batch_size > 0:
        # Requests with equal shapes are merged up to max_batch_size, waiting at most 100 µs for company.
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {max_batch_size} ]",
                  f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}", "}"]
    lines += ["instance_group [", "  {", "    count: 1", f"    kind: {kind}", "  }", "]"]
    return "\n".join(lines) + "\n"


def _external_files(model, artifact_dir: Path) -> list[str]:
    """Relative paths of the external data files the graph's initializers point at."""
    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == 1:   # TensorProto.EXTERNAL
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location is None:
                continue
            path = (artifact_dir / location).resolve()
            if artifact_dir.resolve() not in path.parents:
                raise ArtifactError(f"{artifact_dir / MODEL_FILE}: external data '{location}' lies outside the artifact")
            if not path.is_file():
                raise ArtifactError(f"{artifact_dir}: external data file '{location}' that {MODEL_FILE} needs is "
                                    "missing; re-export the model")
            files.add(location)
    return sorted(files)


def _versions(model_dir: Path) -> list[int]:
    """Triton's version directories: positive integers without a leading zero."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and re.fullmatch(r"[1-9][0-9]*", p.name))


def _check_same_model(model_dir: Path, name: str, signature: dict, *, max_batch_size: int) -> None:
    """Refuse to add a version whose inputs and outputs differ from the latest existing version's."""
    import onnx

    versions = _versions(model_dir)
    latest = next((model_dir / str(v) / MODEL_FILE for v in reversed(versions)
                   if (model_dir / str(v) / MODEL_FILE).is_file()), None)
    if latest is None:
        if versions or (model_dir / "config.pbtxt").exists():
            raise UserInputError(f"{model_dir} holds a model that is not an ONNX graph; pass another name")
        return
    existing = _signature(onnx.load(str(latest), load_external_data=False), max_batch_size=0)
    if existing != _signature_full(signature, max_batch_size):
        raise UserInputError(f"model '{name}' in {model_dir.parent} has other inputs/outputs ({latest.parent.name}); "
                             "pass another name (--name) or another repository")


def _signature_full(signature: dict, max_batch_size: int) -> dict:
    if max_batch_size <= 0:
        return signature
    return {section: [(n, t, [-1, *dims]) for n, t, dims in entries] for section, entries in signature.items()}


def write_triton_repository(artifact_dir: str | Path, repository: str | Path, *, name: str | None = None,
                            instance_kind: str = "auto", max_batch_size: int = 8) -> Path:
    """Add the ONNX graph of `artifact_dir` (model.onnx, + external data) to the Triton model
    repository `repository` as a new version of model `name` (default: the artifact manifest's name,
    sanitized). Writes `repository/<name>/config.pbtxt` and `repository/<name>/<version>/`; returns
    the version directory. A model of that name with other inputs or outputs is refused."""
    import onnx

    from inferforge.manifest import MANIFEST_NAME, read_manifest

    artifact_dir, repository = Path(artifact_dir), Path(repository)
    if instance_kind not in ("auto", *INSTANCE_KINDS):
        raise UserInputError(f"instance kind '{instance_kind}' is not one of auto, gpu, cpu")
    if max_batch_size < 0:
        raise UserInputError(f"max_batch_size must be 0 (no batching) or positive, not {max_batch_size}")
    source = artifact_dir / MODEL_FILE
    if not source.is_file():
        raise UserInputError(f"{artifact_dir}: no {MODEL_FILE}; give an artifact written by `inferforge export`")
    blocking = next((p for p in (repository, *repository.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserInputError(f"repository {repository}: {blocking} is a file, not a directory; choose another path")
    manifest = read_manifest(artifact_dir) if (artifact_dir / MANIFEST_NAME).is_file() else {}
    if name is None:
        name = sanitize_model_name(str(manifest.get("name") or artifact_dir.resolve().name))
    elif not _NAME_OK.match(name):
        raise UserInputError(f"model name '{name}': use letters, digits, '_', '.', '-' (not first), e.g. "
                             f"'{sanitize_model_name(name)}'")
    model = onnx.load(str(source), load_external_data=False)
    signature = _signature(model, max_batch_size=max_batch_size)
    decoder = any(n.startswith("past_key_values") for n, _, _ in signature["input"])
    config = render_config(name, signature, max_batch_size=max_batch_size, kind=_instance_kind(model, instance_kind),
                           decoder=decoder)
    model_dir = repository / name
    if model_dir.exists() and not model_dir.is_dir():
        raise UserInputError(f"{model_dir} is a file, not a model directory; pass another name")
    _check_same_model(model_dir, name, signature, max_batch_size=max_batch_size)
    expected = manifest.get("files", {}).get(MODEL_FILE, {}).get("sha256")
    files = [MODEL_FILE, *_external_files(model, artifact_dir)]

    repository.mkdir(parents=True, exist_ok=True)
    new_model = not model_dir.is_dir()
    # Build in a hidden sibling (Triton ignores names that are not positive integers) and rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=repository if new_model else model_dir))
    try:
        make_public_dir(staging)
        version_dir = staging / "1" if new_model else staging
        version_dir.mkdir(exist_ok=True)
        for rel in files:
            (version_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(artifact_dir / rel, version_dir / rel)
        if expected and sha256_file(version_dir / MODEL_FILE) != expected:
            raise ArtifactError(f"{source} does not match its sha256 in the manifest; the artifact was modified "
                                "after export, re-export it")
        if new_model:
            atomic_write_text(staging / "config.pbtxt", config)
            os.rename(staging, model_dir)       # fails if another writer filled it meanwhile
            return model_dir / "1"
        version = (_versions(model_dir) or [0])[-1] + 1
        target = model_dir / str(version)
        if target.exists():
            raise UserInputError(f"{target} appeared while writing; run the export again")
        os.rename(staging, target)
        atomic_write_text(model_dir / "config.pbtxt", config)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
