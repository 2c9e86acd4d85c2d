"""Keep ONNX Runtime's SkipLayerNormFusion off an encoder graph, in the file itself.

ONNX Runtime's extended graph optimizations (on by default) fuse a residual `Add` feeding a
`LayerNormalization` into the contrib op `SkipLayerNormalization`. On the int8 encoders here the
fused CPU kernel is slower than the two ops it replaces (all-MiniLM-L6-v2 int8, batch 8 x 128
tokens, 2 threads: 7-17% slower than the same graph with the fusion disabled; see the README), so
`inferforge.load` used to open every model with that fusion disabled, and anyone else opening
the same `model.onnx` got the slow graph.

The fusion matches the op type `Add` only. `Sum` of two tensors is the same elementwise float
addition (bit-identical results) and a standard ONNX op every runtime reads, so rewriting each
residual `Add -> LayerNormalization` as `Sum` leaves the math and the portability of the file
unchanged while the fusion can no longer match, whatever session options open it. Every other
fusion (LayerNorm, Gelu, MatMulIntegerToFloat, DynamicQuantizeMatMul) still happens at load time,
tuned to the machine that runs the model; nothing hardware specific is stored in the file.
"""

from __future__ import annotations

from pathlib import Path


def _starts_a_norm(output: str, users: list) -> bool:
    """Whether `output` is the data input of a LayerNormalization, or of the ReduceMean/Sub pattern that
    ONNX Runtime's LayerNormFusion turns into one at load time (exports below opset 17)."""
    if len(users) == 1:
        return users[0].op_type == "LayerNormalization" and users[0].input[0] == output
    kinds = {u.op_type for u in users}
    return "ReduceMean" in kinds and kinds <= {"ReduceMean", "Sub"}


def residual_adds(model, *, op_type: str = "Add") -> list:
    """The `op_type` nodes (not producing a graph output) whose output feeds only a layer normalization."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    return [node for node in model.graph.node
            if node.op_type == op_type and node.domain in ("", "ai.onnx") and node.output[0] not in graph_outputs
            and _starts_a_norm(node.output[0], consumers.get(node.output[0], []))]


def block_skip_layer_norm_fusion(model) -> int:
    """Rewrite every residual `Add -> LayerNormalization` of `model` (an onnx.ModelProto, changed in
    place) as `Sum -> LayerNormalization`; returns how many were rewritten. Idempotent."""
    nodes = residual_adds(model)
    for node in nodes:
        node.op_type = "Sum"     # same inputs, outputs and name; neither op takes attributes
    return len(nodes)


def block_skip_layer_norm_fusion_file(onnx_path: str | Path) -> int:
    """`block_skip_layer_norm_fusion` on a file, in place (rewritten only when something changes);
    returns how many residual additions the file now carries as `Sum`."""
    import onnx

    model = onnx.load(str(onnx_path))
    if block_skip_layer_norm_fusion(model):
        onnx.save(model, str(onnx_path))
    return len(residual_adds(model, op_type="Sum"))


def fused_op_counts(onnx_path: str | Path, *, disabled_optimizers=(), work_dir: str | Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs for `onnx_path` on CPU (all optimizations on, except
    `disabled_optimizers`), read from the optimized model it saves under `work_dir`."""
    import collections

    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(Path(work_dir) / "ort-optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(disabled_optimizers))
    return dict(collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node))
