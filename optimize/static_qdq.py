"""Static int8 quantization in QDQ format, the placement TensorRT fuses into int8 MatMuls.

Every MatMul gets QuantizeLinear/DequantizeLinear pairs on its inputs: symmetric int8 weights with
one scale per output channel, and symmetric int8 activations with one scale per tensor fixed ahead
of time from calibration data. That fixed scale is the hard part on a transformer: LayerNorm outputs
carry a few outlier channels, GELU outputs a long tail. So, as on the dynamic path:

1. ranges are measured one calibration sequence at a time, without padding (padding tokens would
   widen the ranges, and sequences of different lengths cannot be stacked; ONNX Runtime's own
   histogram calibrators fail on them), with MinMax (max |x|), Percentile (99.99th percentile of
   |x|) or Entropy (TensorRT's KL-divergence threshold), the last two by ONNX Runtime's
   `HistogramCollector`;
2. SmoothQuant (`onnx_quantize.apply_smoothquant`) may move LayerNorm outliers into the weights,
   `alpha` chosen on the calibration sentences;
3. if the best candidate scores below `target_min_cosine`, the activations with the lowest estimated
   signal-to-quantization-noise ratio (SQNR) are kept in float, one tensor at a time (every MatMul
   reading it), up to `max_auto_excluded`; an exclusion that does not raise the score is undone.

The ranges reach ONNX Runtime's QDQ quantizer as `TensorQuantOverrides`, so the QDQ graph is
ONNX Runtime's own.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

CALIBRATE_METHODS = ("minmax", "percentile", "entropy")
PERCENTILE = 99.99


def matmul_activations(model) -> dict[str, list[str]]:
    """Activation tensor -> the MatMul nodes reading it (inputs that are not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            for name in dict.fromkeys(node.input):
                if name not in inits:
                    readers.setdefault(name, []).append(node.name)
    return readers


def unpadded_sequences(batches: Iterable[dict[str, np.ndarray]]):
    """Each row of each tokenized batch as a batch of one, padding tokens dropped (left or right)."""
    for batch in batches:
        mask = batch["attention_mask"].astype(bool)
        for row in range(mask.shape[0]):
            yield {name: value[row, mask[row]][None] for name, value in batch.items()}


def activation_stats(onnx_path: str | Path, tensor_names: Sequence[str], batches: Sequence[dict[str, np.ndarray]],
                     method: str) -> dict[str, dict[str, float]]:
    """Per tensor: the symmetric clipping range `range` (by `method`), `absmax` and `rms` of its values."""
    import onnx

    from inferforge.optimize.onnx_quantize import ort_session_from_bytes

    if method not in CALIBRATE_METHODS:
        raise ValueError(f"calibrate_method must be one of {', '.join(CALIBRATE_METHODS)}, got {method!r}")
    model = onnx.load(str(onnx_path))
    present = {o.name for o in model.graph.output}
    for name in tensor_names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort_session_from_bytes(model.SerializeToString())
    input_names = [i.name for i in session.get_inputs()]
    collector = None
    if method != "minmax":
        from onnxruntime.quantization.calibrate import HistogramCollector

        bins = 2048 if method == "percentile" else 128
        collector = HistogramCollector(method=method, symmetric=True, num_bins=bins, num_quantized_bins=128,
                                       percentile=PERCENTILE, scenario="same")
    absmax = dict.fromkeys(tensor_names, 0.0)
    sum_sq, count = dict.fromkeys(tensor_names, 0.0), dict.fromkeys(tensor_names, 0)
    # The collector prints progress on every call; it has no quiet switch.
    with contextlib.redirect_stdout(io.StringIO()):
        for sequence in unpadded_sequences(batches):
            values = session.run(list(tensor_names), {n: sequence[n] for n in input_names})
            flat = {name: np.asarray(v, dtype=np.float32).ravel() for name, v in zip(tensor_names, values)}
            for name, v in flat.items():
                absmax[name] = max(absmax[name], float(np.abs(v).max(initial=0.0)))
                sum_sq[name] += float(np.square(v, dtype=np.float64).sum())
                count[name] += v.size
            if collector is not None:
                collector.collect(flat)
        ranges = collector.compute_collection_result() if collector is not None else {}
    stats = {}
    for name in tensor_names:
        r = absmax[name] if method == "minmax" else float(max(abs(float(ranges[name][0])), abs(float(ranges[name][1]))))
        stats[name] = {"range": max(r, 1e-8), "absmax": absmax[name],
                       "rms": (sum_sq[name] / max(count[name], 1)) ** 0.5}
    return stats


def estimated_sqnr_db(stat: dict[str, float]) -> float:
    """SQNR of symmetric int8 rounding of a signal of this RMS with this range: the step is range/127,
    uniform rounding noise has power step^2/12 (clipping ignored)."""
    step = stat["range"] / 127
    return float(10 * np.log10(max(stat["rms"], 1e-12) ** 2 / (step ** 2 / 12)))


def write_qdq(source: str | Path, out: str | Path, stats: dict[str, dict[str, float]], *, per_channel: bool,
              exclude_nodes: Sequence[str], sample: dict[str, np.ndarray]) -> None:
    """ONNX Runtime's QDQ quantizer on `source` with the activation ranges of `stats`.

    Its own calibration runs on `sample` (one unpadded sequence) only to satisfy the API: every
    quantized activation's range is overridden."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    names = [i.name for i in onnx.load(str(source), load_external_data=False).graph.input]

    class OneSequence(CalibrationDataReader):
        def __init__(self):
            self._items = iter([{n: sample[n] for n in names}])

        def get_next(self):
            return next(self._items, None)

    overrides = {name: [{"rmin": np.array(-s["range"], np.float32), "rmax": np.array(s["range"], np.float32)}]
                 for name, s in stats.items()}
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(source), str(out), OneSequence(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                        op_types_to_quantize=["MatMul"], nodes_to_exclude=list(exclude_nodes),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       # QDQ on the inputs only: a MatMul's output stays float.
                                       "OpTypesToExcludeOutputQuantization": ["MatMul"],
                                       "TensorQuantOverrides": overrides})


def quantize_static_qdq(fp32_path: str | Path, out_path: str | Path, *,
                        calibration_batches: Sequence[dict[str, np.ndarray]],
                        score: Callable[[Path], tuple[float, float]] | None = None,
                        calibrate_method: str = "percentile", per_channel: bool = True,
                        smoothquant_alpha: float | str = "auto",
                        alpha_grid: Sequence[float] = (0.4, 0.5, 0.6, 0.7, 0.8),
                        exclude_nodes: Sequence[str] = (), target_min_cosine: float | None = None,
                        max_auto_excluded: int = 0,
                        on_candidate: Callable[[str, tuple[float, float]], None] | None = None) -> dict:
    """Static symmetric int8 QDQ quantization of `fp32_path` to `out_path`; returns the record.

    `calibration_batches`: tokenized batches ([batch, seq] int64 arrays, any lengths, padded).
    `score(path)` returns (min cosine, mean cosine) of a candidate against the reference on the
    calibration sentences; without it only one candidate is built (the settings as given, SmoothQuant
    off under "auto"). Raises ValueError for a bad setting (an unknown method or node name).
    """
    import onnx

    from inferforge.optimize.onnx_quantize import (
        CandidateSearch,
        SettingError,
        apply_smoothquant,
        smoothable_groups,
    )

    if calibrate_method not in CALIBRATE_METHODS:
        raise SettingError(f"calibrate_method must be one of {', '.join(CALIBRATE_METHODS)}, got {calibrate_method!r}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    work = out_path.parent
    model = onnx.load(str(fp32_path))
    missing = [n for n in exclude_nodes if n not in {node.name for node in model.graph.node}]
    if missing:
        raise SettingError(f"exclude_nodes: no node named {missing[0]!r} in the exported model")
    has_groups = bool(smoothable_groups(model))
    del model
    if smoothquant_alpha == "off" or not has_groups or (smoothquant_alpha == "auto" and score is None):
        alphas = ["off"]
    elif smoothquant_alpha == "auto":
        alphas = ["off", *alpha_grid]
    else:
        alphas = [float(smoothquant_alpha)]
    absmax = {}
    if alphas != ["off"]:
        from inferforge.optimize.onnx_quantize import activation_absmax

        absmax = activation_absmax(fp32_path, list(smoothable_groups(onnx.load(str(fp32_path)))), calibration_batches)
    sample = next(unpadded_sequences(calibration_batches[:1]))
    search = CandidateSearch(on_candidate)

    def source_for(alpha) -> Path:
        if alpha == "off":
            return fp32_path
        path = work / f"smoothed-{alpha}.onnx"
        if not path.exists():
            apply_smoothquant(fp32_path, path, absmax, float(alpha))
        return path

    stats_cache: dict = {}

    def stats_for(alpha):
        if alpha not in stats_cache:
            src = source_for(alpha)
            readers = matmul_activations(onnx.load(str(src), load_external_data=False))
            stats_cache[alpha] = (readers, activation_stats(src, list(readers), calibration_batches, calibrate_method))
        return stats_cache[alpha]

    def try_candidate(alpha, excluded: tuple[str, ...]) -> bool:
        readers, stats = stats_for(alpha)
        path = work / f"qdq-candidate-{len(search.records)}.onnx"
        write_qdq(source_for(alpha), path, stats, per_channel=per_channel, exclude_nodes=excluded, sample=sample)
        return search.offer(alpha, excluded, path, score(path) if score else (float("nan"), float("nan")))

    try:
        for alpha in alphas:
            try_candidate(alpha, tuple(exclude_nodes))
        auto_excluded = []
        if score is not None and target_min_cosine is not None:
            readers, stats = stats_for(search.best[1])
            # Worst-resolved activations first: lowest SQNR at their int8 step.
            ranked = sorted(readers, key=lambda x: estimated_sqnr_db(stats[x]))
            tried = 0
            for x in ranked:
                if search.best[0][0] >= target_min_cosine or tried == max_auto_excluded:
                    break
                names = tuple(n for n in readers[x] if n not in search.best[2])
                if not names:
                    continue
                tried += 1
                if try_candidate(search.best[1], search.best[2] + names):
                    auto_excluded.append({"nodes": list(names), "activation": x,
                                          "estimated_sqnr_db": round(estimated_sqnr_db(stats[x]), 1),
                                          "calibration_min_cosine": search.best[0][0]})
        search.best[3].replace(out_path)
    finally:
        for path in work.glob("smoothed-*.onnx"):
            path.unlink()
    readers, stats = stats_for(search.best[1])
    return {
        "method": "static-qdq", "calibrate_method": calibrate_method, "per_channel": per_channel,
        "format": "QDQ, symmetric int8 activations (per tensor) and weights (per output channel)",
        "smoothquant_alpha": search.best[1],
        "excluded_nodes": list(search.best[2]),
        "auto_excluded": auto_excluded,
        "target_min_cosine": target_min_cosine,
        "calibration_min_cosine": search.best[0][0], "calibration_mean_cosine": search.best[0][1],
        "candidates": search.records,
        "lowest_sqnr_activations": [{"activation": x, "estimated_sqnr_db": round(estimated_sqnr_db(stats[x]), 1)}
                                    for x in sorted(stats, key=lambda x: estimated_sqnr_db(stats[x]))[:5]],
    }
