"""Writing an exported decoder graph: one `model.onnx`, with its weights in `model.onnx_data` when they
are too large for one protobuf (2 GB), and the fp16 conversion of a float32 graph.

fp16 (`convert_to_fp16`): every float tensor becomes float16 except what loses too much in 11 bits of
mantissa, which is computed in float32 from end to end (one Cast at each edge between the two): every
RMSNorm, whole (Pow, ReduceMean, Sqrt, Div and the scaling), Softmax and the other reductions, and the
rotary embedding (`/model/rotary_emb/*`: positions above 2048 are not even integers in fp16, and
Cos/Sin of a rounded angle is off). The `logits` output stays float32, so a caller compares and samples
in float32; the past and present key/values are float16 (half the cache). onnxruntime's own converter
(`onnxruntime.transformers.float16`) is not used: it rounds to fp16 between two blocked nodes, so a
blocked chain is not computed in fp32, and it names two Casts alike when one tensor feeds two of them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

# ONNX's protobuf limit is 2 GiB; leave room for the graph itself next to the weights.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
EXTERNAL_DATA_NAME = "model.onnx_data"
# Op types computed in float32 (reductions, Softmax, Cos/Sin; Range and CumSum have no fp16 CPU kernel).
FP32_OPS = ("Pow", "ReduceMean", "Sqrt", "Div", "Reciprocal", "Softmax", "ReduceSum", "ReduceMax", "ReduceMin",
            "ReduceL2", "ReduceLogSumExp", "Cos", "Sin", "Range", "CumSum", "TopK")
# Nodes computed in float32 by name: the rotary embedding and every RMSNorm, whole.
FP32_NODE_PARTS = ("/model/rotary_emb/", "layernorm/", "/model/norm/")
FP32_OUTPUTS = ("logits",)


def initializer_bytes(model) -> int:
    """Bytes of the weights stored in (or referenced by) the graph's initializers."""
    import numpy as np
    from onnx import helper

    total = 0
    for tensor in model.graph.initializer:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        total += count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return total


def save_graph(model, path: str | Path, *, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[str]:
    """Write `model` (a ModelProto with its weights loaded) to `path`; weights over
    `external_data_threshold` bytes in total go to `EXTERNAL_DATA_NAME` beside it. Returns the names of
    the files written."""
    import onnx

    path = Path(path)
    data = path.parent / EXTERNAL_DATA_NAME
    data.unlink(missing_ok=True)     # onnx appends to an existing data file
    if initializer_bytes(model) <= external_data_threshold:
        onnx.save_model(model, str(path))
        return [path.name]
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_NAME, size_threshold=1024, convert_attribute=False)
    return [path.name, EXTERNAL_DATA_NAME]


def load_graph(path: str | Path):
    """The graph at `path` with its weights loaded (external data read from beside it)."""
    import onnx

    return onnx.load_model(str(path), load_external_data=True)


def convert_to_fp16(onnx_path: str | Path):
    """The float32 graph at `onnx_path` (external data allowed) as an fp16 ModelProto; see the module
    docstring for what stays float32. Types come from ONNX shape inference, run on the file (which
    works past 2 GB)."""
    import onnx

    onnx_path = Path(onnx_path)
    with tempfile.TemporaryDirectory(dir=onnx_path.parent) as tmp:
        inferred = Path(tmp) / "inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(onnx_path), str(inferred))
        model = onnx.load_model(str(inferred), load_external_data=False)
    # The weights stay where the source graph keeps them (the inferred copy holds only the graph).
    onnx.external_data_helper.load_external_data_for_model(model, str(onnx_path.parent))
    _FloatToHalf(model).run()
    return model


def _keeps_fp32(node) -> bool:
    return node.op_type in FP32_OPS or any(part in node.name for part in FP32_NODE_PARTS)


class _FloatToHalf:
    """Each float tensor is fp16 when its producer computes in fp16, fp32 when it computes in fp32; an
    edge between the two gets one Cast per (tensor, direction), shared by every reader. Constants and
    initializers take the precision of their readers (fp16 when any reader is fp16)."""

    def __init__(self, model):
        from onnx import TensorProto

        self.model, self.graph = model, model.graph
        self.FLOAT, self.HALF = TensorProto.FLOAT, TensorProto.FLOAT16
        graph = self.graph
        if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
            raise ValueError("fp16 conversion of a graph with subgraphs (If, Loop, Scan) is not supported")
        self.types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
        self.types.update({t.name: t.data_type for t in graph.initializer})
        self.readers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.half: dict[str, bool] = {}        # float tensor -> stored as fp16
        self.casts: dict[tuple[str, bool], str] = {}

    def _is_float(self, name: str) -> bool:
        return self.types.get(name) == self.FLOAT

    def _any_half_reader(self, name: str) -> bool:
        return any(not _keeps_fp32(n) for n in self.readers.get(name, []))

    def run(self) -> None:
        from onnx import helper, numpy_helper

        graph = self.graph
        for value in graph.input:              # the past key/values
            if self._is_float(value.name):
                value.type.tensor_type.elem_type = self.HALF
                self.half[value.name] = True
        for i, tensor in enumerate(graph.initializer):
            if tensor.data_type == self.FLOAT:
                self.half[tensor.name] = self._any_half_reader(tensor.name)
                if self.half[tensor.name]:
                    graph.initializer[i].CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(tensor)),
                                                                          tensor.name))
        nodes = []
        for node in graph.node:
            half = not _keeps_fp32(node)
            if node.op_type == "Constant":
                half = self._any_half_reader(node.output[0])
            for i, name in enumerate(node.input):
                if name and self._is_float(name) and self.half.get(name, False) != half:
                    node.input[i] = self._cast(name, half, nodes)
            for attribute in node.attribute if half else ():
                if attribute.name == "to" and node.op_type == "Cast" and attribute.i == self.FLOAT:
                    attribute.i = self.HALF
                elif attribute.type == attribute.TENSOR and attribute.t.data_type == self.FLOAT:
                    attribute.t.CopyFrom(numpy_helper.from_array(_to_half(numpy_helper.to_array(attribute.t)),
                                                                 attribute.t.name))
            for name in node.output:
                if self._is_float(name):
                    self.half[name] = half
            nodes.append(node)
        for value in graph.output:
            if not self._is_float(value.name):
                continue
            if value.name in FP32_OUTPUTS:
                if self.half.get(value.name):      # rename the fp16 tensor, cast it back under the output's name
                    renamed = value.name + "_fp16"
                    for node in nodes:
                        node.output[:] = [renamed if o == value.name else o for o in node.output]
                        node.input[:] = [renamed if i == value.name else i for i in node.input]
                    nodes.append(helper.make_node("Cast", [renamed], [value.name], to=self.FLOAT,
                                                  name=f"{value.name}_cast_to_fp32"))
            elif self.half.get(value.name):      # the present key/values
                value.type.tensor_type.elem_type = self.HALF
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.value_info[:]                  # stale float types; ONNX Runtime infers them again

    def _cast(self, name: str, to_half: bool, nodes: list) -> str:
        from onnx import helper

        key = (name, to_half)
        if key not in self.casts:
            target = f"{name}_to_{'fp16' if to_half else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [target], to=self.HALF if to_half else self.FLOAT,
                                          name=f"{target}_cast"))
            self.casts[key] = target
        return self.casts[key]


def _to_half(array):
    """fp16 with values beyond its range clipped (a mask's -3.4e38 becomes -65504, still masking)."""
    import numpy as np

    return np.clip(array, -65504.0, 65504.0).astype(np.float16)
