"""Rewrite the float MatMuls of an exported decoder into quantized ONNX ops, one layer at a time.

The float graph (`export_decoder_onnx` of the dequantized checkpoint) computes every projection as
`MatMul(x [batch, seq, K], W^T [K, N])`, the node named after its module
(`model.layers.0.self_attn.q_proj` -> `/model/layers.0/self_attn/q_proj/MatMul`). Each quantized
layer's node is replaced in place (so the node order stays topological) by:

- `NBitsWeight` -> ONNX Runtime's contrib op `com.microsoft.MatMulNBits(x, B, scales[, zero_points])`:
  B uint8 `[N, k_blocks, block_size * bits / 8]` (4 bits: element 2i in the low nibble, 2i+1 in the
  high one, the layout `pack_int4` writes), scales float32 `[N * k_blocks]`, zero points uint8 per
  row `[N, ceil(k_blocks * bits / 8)]` packed the same way, flattened. Without zero points ORT
  uses 2^(bits-1) (8 for int4, 128 for int8). Dequantized weight = (q - zero_point) * scale.
  AWQ's per-input-channel `input_scale` s becomes `Div(x, s)` in front (the codes hold W * s).
- `QDQWeight` -> explicit symmetric QDQ, the form TensorRT builds int8 / fp8 engines from:
  `[Mul(x, 1/smooth)] -> QuantizeLinear(s_x, 0) -> DequantizeLinear(s_x, 0)` for the activation
  with a constant per-tensor scale s_x, and `DequantizeLinear(W_q^T [K, N], s_w, 0, axis=1)` for the
  weight (a scale per output channel, i.e. per column of W^T; a scalar for per-tensor fp8),
  feeding the original `MatMul`. With no activation scale (int8-weight-only) only the weight is
  dequantized: `DequantizeLinear(W_q^T int8, s_w, 0, axis=1) -> MatMul`; ONNX Runtime CPU, told
  `session.disable_quant_qdq=1`, folds the DequantizeLinear into a float weight at session creation
  (float32 speed and numbers, the file stays int8), where its default QDQ fusion would turn the pair
  into MatMulNBits with accuracy_level 4 (int8 activations: faster, but logits move by ~0.2).

The float weight initializers that no node reads any more are dropped; the model is written with
external data when its tensors exceed 2 GB, and checked with `onnx.checker` on the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CONTRIB_DOMAIN = "com.microsoft"
MAX_PROTOBUF_BYTES = 2 * 1024**3
INT8_MAX, E4M3_MAX = 127.0, 448.0


def matmul_node_name(layer: str) -> str:
    """'model.layers.0.self_attn.q_proj' -> '/model/layers.0/self_attn/q_proj/MatMul' (the exporter's
    scope names: module path segments joined by '/', a list index kept with its list)."""
    parts: list[str] = []
    for part in layer.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{part}"
        else:
            parts.append(part)
    return "/" + "/".join(parts) + "/MatMul"


def check_block_size(block_size: int, layer: str) -> None:
    from inferforge.errors import UserInputError

    if block_size < 16 or block_size & (block_size - 1):
        raise UserInputError(f"{layer}: group size {block_size} cannot be exported as MatMulNBits, whose block size "
                             "must be a power of two >= 16; re-quantize with --group-size 32, 64 or 128")


@dataclass
class NBitsWeight:
    """One layer as MatMulNBits: see the module docstring for the layouts."""

    k: int
    n: int
    bits: int
    block_size: int
    packed: np.ndarray                  # uint8 [N, k_blocks, blob]
    scales: np.ndarray                  # float32 [N * k_blocks]
    zero_points: np.ndarray | None      # uint8 [N * ceil(k_blocks * bits / 8)], None: the default 2^(bits-1)
    input_divisor: np.ndarray | None    # float32 [K] (AWQ), or None


@dataclass
class QDQWeight:
    """One layer as QDQ: weight codes W_q^T [K, N] (int8 or float8e4m3fn), their scale, the static
    activation scale (None: the activation stays float, weight-only) and, for SmoothQuant, the
    multiplier 1/smooth [K]."""

    k: int
    n: int
    weight_t: torch.Tensor              # int8 or float8_e4m3fn [K, N]
    weight_scale: np.ndarray            # float32 [N] (per output channel) or [] (per tensor)
    act_scale: float | None
    input_multiplier: np.ndarray | None


def _pack_nibbles_rows(values: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols] of 0..15 -> [rows, ceil(cols / 2)], element 2i in the low nibble."""
    rows, cols = values.shape
    padded = np.zeros((rows, cols + cols % 2), dtype=np.uint8)
    padded[:, :cols] = values
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def int4_nbits(module) -> NBitsWeight:
    """An `Int4WeightOnlyLinear` as MatMulNBits(bits=4, block_size=group_size). Zero points are kept
    unless every one is 8 (symmetric quantization), which is MatMulNBits' default."""
    n, k, g = module.out_features, module.in_features, module.group_size
    check_block_size(g, "int4 layer")
    k_blocks = k // g
    packed = module.packed_in("int4-kpairs-v0").cpu().numpy().reshape(n, k_blocks, g // 2)   # MatMulNBits' order
    zeros = module.zeros.cpu()
    if not torch.equal(zeros, torch.round(zeros)) or zeros.min() < 0 or zeros.max() > 15:
        raise ValueError("int4 zero points must be integers in 0..15 to be stored as MatMulNBits zero points")
    symmetric = bool((zeros == 8).all())
    zero_points = None if symmetric else _pack_nibbles_rows(zeros.numpy().astype(np.uint8)).reshape(-1)
    divisor = None if module.input_scale is None else module.input_scale.float().cpu().numpy()
    return NBitsWeight(k, n, 4, g, np.ascontiguousarray(packed), module.scales.float().cpu().numpy().reshape(-1),
                       zero_points, divisor)


def int8_nbits(module, block_size: int = 128) -> NBitsWeight:
    """An `Int8WeightOnlyLinear` (symmetric, a scale per output channel) as MatMulNBits(bits=8): the
    codes shifted to uint8 (q + 128, so the default zero point 128 applies), the channel's scale
    repeated over its K blocks, K padded with zero codes (128) to whole blocks."""
    n, k = module.out_features, module.in_features
    block = min(block_size, max(16, 1 << (k - 1).bit_length()))
    k_blocks = -(-k // block)
    codes = np.full((n, k_blocks * block), 128, dtype=np.uint8)
    codes[:, :k] = (module.weight_int8.cpu().numpy().astype(np.int16) + 128).astype(np.uint8)
    scales = np.repeat(module.scale.float().cpu().numpy()[:, None], k_blocks, axis=1).reshape(-1)
    return NBitsWeight(k, n, 8, block, codes.reshape(n, k_blocks, block), scales, None, None)


def int8_dq(module) -> QDQWeight:
    """An `Int8WeightOnlyLinear` (symmetric, a scale per output channel) as DequantizeLinear + MatMul:
    codes transposed to [K, N], the scale per column (axis 1), no activation quantization."""
    codes = module.weight_int8.detach().cpu().to(torch.int8)
    return QDQWeight(module.in_features, module.out_features, codes.T.contiguous(),
                     module.scale.detach().float().cpu().numpy(), None, None)


def _tensor(name: str, array: np.ndarray):
    from onnx import numpy_helper

    array = np.asarray(array)      # (np.ascontiguousarray would make a scalar 1-D)
    return numpy_helper.from_array(array if array.flags.c_contiguous else np.ascontiguousarray(array), name)


def _raw_tensor(name: str, elem_type: int, dims, data: bytes):
    from onnx import helper

    return helper.make_tensor(name, elem_type, list(dims), data, raw=True)


def _nbits_nodes(layer: str, prefix: str, x: str, y: str, w: NBitsWeight):
    from onnx import helper

    inits, nodes = [], []
    if w.input_divisor is not None:
        inits.append(_tensor(f"{layer}.input_scale", w.input_divisor.astype(np.float32)))
        nodes.append(helper.make_node("Div", [x, f"{layer}.input_scale"], [f"{prefix}/input_scale/Div_output_0"],
                                      name=f"{prefix}/input_scale/Div"))
        x = nodes[-1].output[0]
    inits += [_tensor(f"{layer}.qweight", w.packed), _tensor(f"{layer}.scales", w.scales.astype(np.float32))]
    inputs = [x, f"{layer}.qweight", f"{layer}.scales"]
    if w.zero_points is not None:
        inits.append(_tensor(f"{layer}.zero_points", w.zero_points))
        inputs.append(f"{layer}.zero_points")
    nodes.append(helper.make_node("MatMulNBits", inputs, [y], name=f"{prefix}/MatMulNBits", domain=CONTRIB_DOMAIN,
                                  K=w.k, N=w.n, bits=w.bits, block_size=w.block_size))
    return nodes, inits


def _qdq_nodes(layer: str, prefix: str, x: str, y: str, w: QDQWeight):
    from onnx import TensorProto, helper

    fp8 = w.weight_t.dtype == torch.float8_e4m3fn
    elem = TensorProto.FLOAT8E4M3FN if fp8 else TensorProto.INT8
    inits, nodes = [], []
    if w.input_multiplier is not None:
        inits.append(_tensor(f"{layer}.inv_smooth", w.input_multiplier.astype(np.float32)))
        nodes.append(helper.make_node("Mul", [x, f"{layer}.inv_smooth"], [f"{prefix}/smooth/Mul_output_0"],
                                      name=f"{prefix}/smooth/Mul"))
        x = nodes[-1].output[0]
    act_dq = x
    if w.act_scale is not None:
        act_q, act_dq = f"{prefix}/input/QuantizeLinear_output_0", f"{prefix}/input/DequantizeLinear_output_0"
        inits += [_tensor(f"{layer}.input_scale", np.array(w.act_scale, dtype=np.float32)),
                  _raw_tensor(f"{layer}.input_zero_point", elem, [], bytes(1))]
        nodes += [helper.make_node("QuantizeLinear", [x, f"{layer}.input_scale", f"{layer}.input_zero_point"],
                                   [act_q], name=f"{prefix}/input/QuantizeLinear"),
                  helper.make_node("DequantizeLinear", [act_q, f"{layer}.input_scale", f"{layer}.input_zero_point"],
                                   [act_dq], name=f"{prefix}/input/DequantizeLinear")]
    per_channel = w.weight_scale.ndim == 1
    zero_dims = [w.n] if per_channel else []
    inits += [_raw_tensor(f"{layer}.weight_quantized", elem, [w.k, w.n],
                          w.weight_t.contiguous().view(torch.uint8).cpu().numpy().tobytes()),
              _tensor(f"{layer}.weight_scale", w.weight_scale.astype(np.float32)),
              _raw_tensor(f"{layer}.weight_zero_point", elem, zero_dims, bytes(w.n if per_channel else 1))]
    weight_dq = f"{prefix}/weight/DequantizeLinear_output_0"
    nodes += [helper.make_node("DequantizeLinear", [f"{layer}.weight_quantized", f"{layer}.weight_scale",
                                                    f"{layer}.weight_zero_point"], [weight_dq],
                               name=f"{prefix}/weight/DequantizeLinear", **({"axis": 1} if per_channel else {})),
              helper.make_node("MatMul", [act_dq, weight_dq], [y], name=f"{prefix}/MatMul")]
    return nodes, inits


def _used_names(graph) -> set[str]:
    from onnx import AttributeProto

    used = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:       # If / Loop bodies read outer tensors too
            if attr.type == AttributeProto.GRAPH:
                used |= _used_names(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    used |= _used_names(sub)
    used.update(o.name for o in graph.output)
    return used


def rewrite_quantized_matmuls(float_onnx: str | Path, out_path: str | Path, layers: dict, *, progress=None) -> dict:
    """Write `out_path`: the graph of `float_onnx` with each layer of `layers` ({transformers name:
    NBitsWeight | QDQWeight}) rewritten (module docstring). Raises RuntimeError naming the layer when
    its MatMul node is missing or its weight is not a [K, N] initializer of the expected shape.
    Returns {"rewritten": n, "dropped_initializers": n, "external_data": bool, "bytes": n}."""
    import onnx
    from onnx import helper

    model = onnx.load(str(float_onnx))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    by_name = {node.name: i for i, node in enumerate(graph.node)}
    replacements, new_inits = {}, []
    task = progress.task("rewriting quantized layers", total=len(layers)) if progress else None
    for layer, weight in layers.items():
        node_name = matmul_node_name(layer)
        if node_name not in by_name:
            raise RuntimeError(f"{float_onnx}: no node {node_name!r} for quantized layer {layer!r}; the exporter named "
                               "its MatMuls differently, so the layer cannot be rewritten")
        node = graph.node[by_name[node_name]]
        init = inits.get(node.input[1])
        if init is None or list(init.dims) != [weight.k, weight.n]:
            found = "not an initializer" if init is None else f"shape {list(init.dims)}"
            raise RuntimeError(f"{node_name}: its weight {node.input[1]!r} is {found}, expected a [K, N] = "
                               f"[{weight.k}, {weight.n}] initializer for layer {layer!r}")
        prefix = node_name[: -len("/MatMul")]
        build = _nbits_nodes if isinstance(weight, NBitsWeight) else _qdq_nodes
        nodes, tensors = build(layer, prefix, node.input[0], node.output[0], weight)
        replacements[by_name[node_name]] = nodes
        new_inits += tensors
        if task:
            task.advance()
    if task:
        task.close()
    nodes = []
    for i, node in enumerate(graph.node):   # in place: every input of a replacement is produced before it
        nodes.extend(replacements.get(i, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    used = _used_names(graph)
    kept = [t for t in graph.initializer if t.name in used]
    dropped = len(graph.initializer) - len(kept)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if any(isinstance(w, NBitsWeight) for w in layers.values()) and \
            not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return {"rewritten": len(replacements), "dropped_initializers": dropped, **save_checked(model, out_path)}


def save_checked(model, out_path: str | Path) -> dict:
    """Save `model` (external data beside it when its tensors exceed 2 GB) and check it on the path."""
    import onnx

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    external = size > MAX_PROTOBUF_BYTES - 64 * 1024**2     # room for the graph itself
    if external:
        onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out_path.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(out_path))
    onnx.checker.check_model(str(out_path))
    return {"external_data": external, "bytes": sum(p.stat().st_size for p in out_path.parent.glob(out_path.name + "*"))}
