"""Int8 word embeddings for an ONNX encoder: the table that dominates a small model's file.

In all-MiniLM-L6-v2 the word-embedding table is 30522 x 384 float32, 47 MB of the 62 MB int8
model (dynamic int8 quantizes the MatMuls only). Here it is stored as symmetric int8 with one
float scale per row (per token: rows differ in norm, so one scale for the whole table would waste
the int8 range on the largest ones), scale = max|row| / 127.

The graph gathers the int8 rows first and dequantizes only those, so the work per call is the
batch's tokens, not the table:

    Gather(W [V, H] f32, input_ids)          ->  Mul(Cast<f32>(Gather(W_int8 [V, H], input_ids)),
                                                     Gather(scale [V, 1] f32, input_ids))

All standard ONNX ops (Gather, Cast, Mul); the output keeps the original tensor's name, so the rest of
the graph is untouched. (A DequantizeLinear on the table feeding the Gather would dequantize all
30522 rows on every call: ONNX Runtime does not constant-fold DequantizeLinear on initializers.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferforge.optimize.onnx_quantize import SettingError

SCHEME = "int8 symmetric, one float32 scale per row (token)"


def word_embedding_gather(model, *, input_name: str = "input_ids"):
    """The Gather reading rows of a 2-D float initializer at the graph input `input_name` (directly or
    through one Cast), and that initializer; SettingError when the graph has no such Gather."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    graph_inputs = {i.name for i in model.graph.input}
    if input_name not in graph_inputs:
        raise SettingError(f"embeddings: int8 needs a graph input named {input_name!r}, the model has "
                           f"{', '.join(sorted(graph_inputs)) or 'none'}; keep embeddings: float")
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        table = inits[node.input[0]]
        indices = node.input[1]
        if indices in producers and producers[indices].op_type == "Cast":
            indices = producers[indices].input[0]
        # [V, 1] is a row-scale table this module wrote, not embeddings.
        if indices == input_name and len(table.dims) == 2 and table.dims[1] > 1 \
                and table.data_type == TensorProto.FLOAT:
            users = [n.name for n in model.graph.node if table.name in n.input and n is not node]
            if users:
                raise SettingError(f"embeddings: int8: the word-embedding table {table.name!r} is also read by "
                                   f"{users[0]!r} (tied weights); keep embeddings: float")
            return node, table
    raise SettingError(f"embeddings: int8: no Gather of a float32 [vocab, hidden] table at {input_name!r} in the "
                       "model (already quantized, or not a transformer encoder); keep embeddings: float")


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 of `table` [V, H] float32: (int8 [V, H], scale float32 [V, 1])."""
    scale = np.abs(table).max(axis=1, keepdims=True).astype(np.float32) / 127.0
    scale = np.maximum(scale, np.finfo(np.float32).tiny)         # an all-zero row (padding) stays zero
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_word_embeddings(onnx_path: str | Path, out_path: str | Path | None = None) -> dict:
    """Store the word-embedding table of `onnx_path` as per-row int8 (see the module docstring) and
    write the model to `out_path` (default: in place). Returns a record for the manifest: the table's
    name and shape, the scheme, its size before and after, the largest reconstruction error and the
    file sizes. SettingError when the model has no such table."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    onnx_path = Path(onnx_path)
    out_path = Path(out_path or onnx_path)
    size_before = onnx_path.stat().st_size
    model = onnx.load(str(onnx_path))
    gather, table_proto = word_embedding_gather(model)
    table = numpy_helper.to_array(table_proto)
    q, scale = quantize_rows(table)
    max_error = float(np.abs(q.astype(np.float32) * scale - table).max())

    base = table_proto.name
    q_init = numpy_helper.from_array(q, f"{base}_int8")
    s_init = numpy_helper.from_array(scale, f"{base}_row_scale")
    ids, out = gather.input[1], gather.output[0]
    prefix = gather.name or base
    new_nodes = [
        helper.make_node("Gather", [q_init.name, ids], [f"{out}_int8"], name=f"{prefix}_int8", axis=0),
        helper.make_node("Gather", [s_init.name, ids], [f"{out}_scale"], name=f"{prefix}_scale", axis=0),
        helper.make_node("Cast", [f"{out}_int8"], [f"{out}_int8_as_float"], name=f"{prefix}_cast",
                         to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{out}_int8_as_float", f"{out}_scale"], [out], name=f"{prefix}_dequantize"),
    ]
    # Replace the Gather where it stood, which keeps the node list topologically sorted.
    nodes = list(model.graph.node)
    at = nodes.index(gather)
    del model.graph.node[:]
    model.graph.node.extend(nodes[:at] + new_nodes + nodes[at + 1:])
    kept = [i for i in model.graph.initializer if i.name != base]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, q_init, s_init])
    onnx.save(model, str(out_path))
    return {"tensor": base, "shape": list(table.shape), "scheme": SCHEME,
            "table_bytes": {"float32": int(table.nbytes), "int8": int(q.nbytes + scale.nbytes)},
            "max_abs_error": max_error, "file_bytes": {"before": size_before, "after": out_path.stat().st_size}}
