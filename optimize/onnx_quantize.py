"""Int8 quantization of an ONNX transformer for CPU serving, with SmoothQuant to keep fidelity.

ONNX Runtime's dynamic quantization turns each weighted MatMul into an int8 x int8 product
(`DynamicQuantizeLinear` + `MatMulInteger`): weights are quantized offline (per output channel
here), activations at run time with one scale per tensor. Transformer activations that come out of a
LayerNorm carry a few outlier channels (in MiniLM, values near 30 in three of 384 channels where the
median channel peaks near 2), so one per-tensor scale wastes most of the int8 range on them.

SmoothQuant (Xiao et al., 2022) moves that range into the weights: for an input X feeding weights W,
X W = (X diag(1/s)) (diag(s) W), with s_j = max|X_j|^alpha / max|W_j|^(1-alpha) measured on
calibration data. We insert the per-channel `Mul(1/s)` once per LayerNorm output (Q, K and V share
it) and fold `s` into the weights before quantizing. `alpha` is chosen on the calibration set.

Only LayerNorm-fed MatMuls are smoothed: the inputs of the attention output and FFN down
projections have token-dependent outliers that smoothing does not help (measured: it hurts).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np


class SettingError(ValueError):
    """A quantization setting this model cannot take (bad input, with the fix in the message)."""


NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization")
_SCALE_CLIP = (1e-2, 1e2)


def _weighted_matmuls(model) -> dict[str, list]:
    """Group MatMul nodes with a constant weight by their activation input name."""
    inits = {i.name for i in model.graph.initializer}
    groups = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[0] not in inits:
            groups[node.input[0]].append(node)
    return groups


SMOOTHQUANT_SCOPES = ("norm", "all")


def smoothable_groups(model, scope: str = "norm") -> dict[str, list]:
    """The weighted-MatMul groups SmoothQuant smooths: scope "norm", those whose shared input comes
    straight out of a normalization (the usual choice: Q/K/V and the MLP's first projection); "all",
    every weighted MatMul, also the attention output and the MLP's second projection, whose inputs
    (attention context, GELU output) carry outliers of their own. The smoothing is an explicit Mul
    before the group either way, so both scopes give a model equal to the original in float."""
    if scope not in SMOOTHQUANT_SCOPES:
        raise SettingError(f"smoothquant_scope {scope!r}: choose norm or all")
    groups = _weighted_matmuls(model)
    if scope == "all":
        return dict(groups)
    producers = {out: node for node in model.graph.node for out in node.output}
    return {x: nodes for x, nodes in groups.items() if x in producers and producers[x].op_type in NORM_OPS}


def activation_absmax(onnx_path: str | Path, tensor_names: Sequence[str],
                      batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of the named tensors over calibration batches (padding tokens excluded)."""
    import onnx

    model = onnx.load(str(onnx_path))
    for name in tensor_names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    if model.ByteSize() >= 2**31 - 2**20:
        raise SettingError("SmoothQuant calibration supports ONNX models under 2 GB (protobuf's limit); set "
                           "smoothquant_alpha: off")
    session = ort_session_from_bytes(model.SerializeToString())
    input_names = [i.name for i in session.get_inputs()]
    absmax: dict[str, np.ndarray] = {}
    for batch in batches:
        outs = session.run(list(tensor_names), {n: batch[n] for n in input_names})
        real = batch["attention_mask"].astype(bool)
        for name, value in zip(tensor_names, outs):
            m = np.abs(value[real]).max(axis=0)
            absmax[name] = m if name not in absmax else np.maximum(absmax[name], m)
    return absmax


def ort_session_from_bytes(model_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def apply_smoothquant(onnx_path: str | Path, out_path: str | Path, absmax: dict[str, np.ndarray],
                      alpha: float, *, scope: str = "norm") -> int:
    """Write a mathematically equivalent model with smoothed activations (the groups of
    `smoothable_groups(model, scope)`); returns the groups smoothed."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    groups = smoothable_groups(model, scope)
    new_nodes = {}
    for x, nodes in groups.items():
        if x not in absmax:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]   # each [in, out]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)       # [in]
        s = np.maximum(absmax[x], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)
        s = np.clip(s, *_SCALE_CLIP).astype(np.float32)
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{x}_smoothquant_inv_scale")
        model.graph.initializer.append(inv)
        smoothed = f"{x}_smoothquant"
        new_nodes[x] = helper.make_node("Mul", [x, inv.name], [smoothed], name=f"{x}_smoothquant_mul")
        for node, w in zip(nodes, weights):
            # A weight shared with another consumer would change that consumer too: copy instead.
            scaled = numpy_helper.from_array((w * s[:, None]).astype(w.dtype), f"{node.input[1]}_smoothed")
            model.graph.initializer.append(scaled)
            node.input[1] = scaled.name
            node.input[0] = smoothed
    # Keep the graph topologically sorted: each Mul goes right after the node producing its input.
    ordered = []
    for node in model.graph.node:
        ordered.append(node)
        ordered.extend(new_nodes[out] for out in node.output if out in new_nodes)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    _drop_unused_initializers(model)
    onnx.save(model, str(out_path))
    return len(new_nodes)


def _drop_unused_initializers(model) -> None:
    used = {i for node in model.graph.node for i in node.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def quantize_dynamic_int8(onnx_path: str | Path, out_path: str | Path, *, per_channel: bool = True,
                          exclude_nodes: Sequence[str] = ()) -> None:
    """Dynamic int8 quantization of the weighted MatMuls (embeddings and attention products stay float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # ORT logs hints at WARNING
    quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=list(exclude_nodes),
                     extra_options={"DefaultTensorType": 1})


def outlier_ratio(absmax: np.ndarray) -> float:
    """How much one per-tensor scale is stretched by a few channels: max over the 99th percentile."""
    return float(absmax.max() / max(np.percentile(absmax, 99), 1e-12))


class CandidateSearch:
    """Quantized candidates scored on calibration data: each one is recorded, the file of the best
    (by min, then mean cosine) is kept and every other candidate's file is deleted."""

    def __init__(self, on_candidate: Callable[[str, tuple[float, float]], None] | None = None):
        self.records: list[dict] = []
        self.best = None        # (score, smoothquant alpha, excluded nodes, path) of the best so far
        self._on_candidate = on_candidate

    def offer(self, alpha, excluded: tuple[str, ...], path: Path, result: tuple[float, float]) -> bool:
        """Record the candidate at `path`; returns whether it became the best."""
        self.records.append({"smoothquant_alpha": alpha, "excluded_nodes": list(excluded),
                             "calibration_min_cosine": result[0], "calibration_mean_cosine": result[1]})
        if self._on_candidate:
            self._on_candidate(f"alpha={alpha} excluded={len(excluded)}", result)
        improved = self.best is None or result > self.best[0]
        if improved:
            if self.best is not None:
                self.best[3].unlink()
            self.best = (result, alpha, excluded, path)
        else:
            path.unlink()
        return improved


def quantize_onnx_int8(fp32_path: str | Path, out_path: str | Path, *,
                       calibration_batches: Sequence[dict[str, np.ndarray]],
                       score: Callable[[Path], tuple[float, float]],
                       per_channel: bool = True,
                       smoothquant_alpha: float | str = "auto",
                       alpha_grid: Sequence[float] = (0.4, 0.5, 0.6, 0.7, 0.8),
                       smoothquant_scope: str = "norm",
                       exclude_nodes: Sequence[str] = (),
                       target_min_cosine: float | None = None,
                       max_auto_excluded: int = 0,
                       on_candidate: Callable[[str, tuple[float, float]], None] | None = None) -> dict:
    """Quantize `fp32_path` to int8 at `out_path`, choosing the settings on calibration data.

    `score(path)` returns (min cosine, mean cosine) of a candidate model against the source on the
    calibration sentences. First SmoothQuant's alpha: with `smoothquant_alpha="auto"` every alpha in
    `alpha_grid` and no smoothing are tried, and the best (by min, then mean cosine) is kept. Then, if
    the best still scores below `target_min_cosine`, up to `max_auto_excluded` of the MatMuls that
    smoothing left alone (with `smoothquant_scope` "norm": inputs not fed by a norm) are kept in
    float, one at a time, the one with
    the most outlier-dominated activations first, until the target is met; an exclusion that does
    not raise the score is undone. Returns a record of every candidate and the choice.
    """
    import onnx

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    work = out_path.parent
    model = onnx.load(str(fp32_path))
    groups = smoothable_groups(model, smoothquant_scope)
    others = {x: nodes for x, nodes in _weighted_matmuls(model).items() if x not in groups}
    node_names = {n.name for n in model.graph.node}
    missing = [n for n in exclude_nodes if n not in node_names]
    if missing:
        raise SettingError(f"exclude_nodes: no node named {missing[0]!r} in the exported model")
    del model

    if smoothquant_alpha == "off" or not groups:
        alphas = ["off"]
    elif smoothquant_alpha == "auto":
        alphas = ["off", *alpha_grid]
    else:
        alphas = [float(smoothquant_alpha)]
    need_stats = alphas != ["off"] or (target_min_cosine is not None and max_auto_excluded > 0)
    absmax = activation_absmax(fp32_path, list(groups) + list(others), calibration_batches) if need_stats else {}

    search = CandidateSearch(on_candidate)

    def try_candidate(alpha, excluded: tuple[str, ...]) -> bool:
        path = work / f"int8-candidate-{len(search.records)}.onnx"
        source = fp32_path
        if alpha != "off":
            source = work / "smoothed.onnx"
            apply_smoothquant(fp32_path, source, absmax, float(alpha), scope=smoothquant_scope)
        quantize_dynamic_int8(source, path, per_channel=per_channel, exclude_nodes=excluded)
        if source != fp32_path:
            source.unlink()
        return search.offer(alpha, excluded, path, score(path))

    for alpha in alphas:
        try_candidate(alpha, tuple(exclude_nodes))
    auto_excluded = []
    if target_min_cosine is not None and absmax:
        # Most outlier-dominated inputs first: one per-tensor int8 scale serves them worst.
        ranked = sorted(others, key=lambda x: -outlier_ratio(absmax[x]))
        for x in ranked[:max_auto_excluded]:
            if search.best[0][0] >= target_min_cosine:
                break
            names = tuple(n.name for n in others[x])
            if try_candidate(search.best[1], search.best[2] + names):
                auto_excluded.extend(names)
    search.best[3].replace(out_path)
    return {
        "per_channel": per_channel,
        "smoothquant_alpha": search.best[1],
        "smoothed_groups": len(groups) if search.best[1] != "off" else 0,
        "smoothquant_scope": smoothquant_scope,
        "excluded_nodes": list(search.best[2]),
        "auto_excluded_nodes": auto_excluded,
        "target_min_cosine": target_min_cosine,
        "calibration_min_cosine": search.best[0][0],
        "calibration_mean_cosine": search.best[0][1],
        "candidates": search.records,
        "quantized_ops": "MatMul with constant weights (int8 weights, dynamic per-tensor uint8 activations)",
    }
