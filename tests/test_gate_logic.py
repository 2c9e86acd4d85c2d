"""The arithmetic every gate and target rests on, checked on fixed numbers (no model, no timing).

Each test here was written against a hand-made mutation that the rest of the suite let through:
an int8 scale over half the range (`/ 63.5` for `/ 127`), the perplexity gate compared with 100x its
limit, the held-out gate reading the mean cosine instead of the minimum, latency targets and the
speed-up check read the wrong way round.
"""

import pytest
import torch
from torch import nn

from inferforge.kernels.reference import quantize_rows_reference
from inferforge.optimize.lm_eval import LMGate
from inferforge.optimize.quantize import W8A8, Int8WeightOnly, Int8WeightOnlyLinear, W8A8Linear, quantize
from inferforge.pipeline import check_results
from inferforge.recipe import Gates, LatencyTarget, Targets


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (reference - approx).double().pow(2).sum()
    return float(10 * torch.log10(reference.double().pow(2).sum() / noise))


def _linear(out_features=48, in_features=64, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features).eval()


# ---------------------------------------------------------------------------- int8 scales


def test_int8_weight_only_uses_the_full_int8_range():
    linear = _linear()
    w = linear.weight.detach().clone()
    model = nn.Sequential(linear)
    quantize(model, Int8WeightOnly())
    q = model[0]
    assert isinstance(q, Int8WeightOnlyLinear)
    # scale = max|w| / 127 per output channel: each row's largest weight maps to exactly +-127 ...
    assert torch.equal(q.weight_int8.abs().amax(dim=1).int(), torch.full((w.shape[0],), 127, dtype=torch.int32))
    torch.testing.assert_close(q.scale, w.abs().amax(dim=1) / 127)
    # ... and rounding is the only error: at most half a step, about 45 dB on Gaussian-like weights.
    deq = q.dequantized_weight()
    assert ((deq - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    assert sqnr_db(w, deq) > 38


def test_w8a8_weights_use_the_full_int8_range():
    linear = _linear()
    w = linear.weight.detach().clone()
    model = nn.Sequential(linear)
    calibration = [torch.randn(4, 64) * torch.linspace(0.5, 4, 64)]
    quantize(model, W8A8(smoothquant_alpha=0.5), calibration=calibration)
    q = model[0]
    assert isinstance(q, W8A8Linear)
    assert torch.equal(q.weight_int8.abs().amax(dim=1).int(), torch.full((w.shape[0],), 127, dtype=torch.int32))
    # The smoothed weights w * smooth are what is quantized: their step is w_scale, the error half of it.
    smoothed = w * q.smooth[None, :]
    torch.testing.assert_close(q.w_scale, smoothed.abs().amax(dim=1) / 127)
    assert ((q.weight_int8.float() * q.w_scale[:, None] - smoothed).abs() <= q.w_scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype, qmax", [(torch.int8, 127.0), (torch.float8_e4m3fn, 448.0)])
def test_row_quantization_reference_uses_the_full_range(dtype, qmax):
    torch.manual_seed(0)
    x = torch.randn(6, 40) * torch.arange(1, 7)[:, None]
    q, scale = quantize_rows_reference(x, dtype)
    torch.testing.assert_close(scale, x.abs().amax(dim=1) / qmax)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((6,), qmax))
    if dtype == torch.int8:
        assert ((q.float() * scale[:, None] - x).abs() <= scale[:, None] / 2 + 1e-6).all()


# ---------------------------------------------------------------------------- language-model gate

METRICS_OK = {"ppl_increase": 0.01, "top1_agreement": 0.97, "kl": 0.01}


@pytest.mark.parametrize("increase, fails", [(0.01, False), (0.0199, False), (0.021, True), (0.05, True), (1.5, True)])
def test_perplexity_gate_compares_with_its_limit(increase, fails):
    gate = LMGate(max_ppl_increase=0.02)
    failures = gate.failures({**METRICS_OK, "ppl_increase": increase})
    assert bool(failures) is fails
    if fails:
        assert "perplexity" in failures[0]


@pytest.mark.parametrize("agreement, fails", [(0.97, False), (0.95, False), (0.949, True), (0.5, True)])
def test_top1_gate_compares_with_its_limit(agreement, fails):
    assert bool(LMGate(min_top1_agreement=0.95).failures({**METRICS_OK, "top1_agreement": agreement})) is fails


@pytest.mark.parametrize("kl, fails", [(0.01, False), (0.05, False), (0.051, True)])
def test_kl_gate_compares_with_its_limit(kl, fails):
    assert bool(LMGate(max_kl=0.05).failures({**METRICS_OK, "kl": kl})) is fails


# ---------------------------------------------------------------------------- encoder gate and targets


def _results(min_cosine, mean_cosine, *, p95_int8=40.0, speedup=1.9):
    """Recorded numbers in the shape the pipeline's validate and bench steps write them."""
    rows = [
        {"provider": "onnx-fp32", "batch_size": 8, "p50_ms": 76.0, "p95_ms": 80.0, "p99_ms": 90.0,
         "speedup_vs_onnx_fp32": 1.0},
        {"provider": "onnx-int8", "batch_size": 8, "p50_ms": 76.0 / speedup, "p95_ms": p95_int8, "p99_ms": 60.0,
         "speedup_vs_onnx_fp32": speedup},
        {"provider": "onnx-int8", "batch_size": 1, "p50_ms": 6.0, "p95_ms": 7.0, "p99_ms": 8.0,
         "speedup_vs_onnx_fp32": 1.5},
    ]
    return {"validation": {"min_cosine": min_cosine, "mean_cosine": mean_cosine},
            "benchmark": {"results": rows}}


def _by_name(checks):
    return {c["name"]: c for c in checks}


def test_held_out_gate_reads_the_minimum_cosine():
    # The mean clears the gate, one sentence does not: the run must fail.
    checks = check_results(Gates(min_cosine=0.99), Targets(), _results(0.983, 0.997), "onnx-int8")
    (gate,) = [c for c in checks if c["kind"] == "gate"]
    assert gate["measured"] == 0.983 and gate["limit"] == 0.99 and not gate["passed"]
    checks = check_results(Gates(min_cosine=0.99), Targets(), _results(0.991, 0.997), "onnx-int8")
    assert all(c["passed"] for c in checks)


def test_mean_cosine_gate_when_set():
    checks = check_results(Gates(min_cosine=0.9, mean_cosine=0.995), Targets(), _results(0.95, 0.993), "onnx-int8")
    by_kind = {c["name"].split(" ")[0]: c for c in checks}
    assert by_kind["min"]["passed"] and not by_kind["mean"]["passed"]
    assert by_kind["mean"]["measured"] == 0.993


@pytest.mark.parametrize("p95, passed", [(40.0, True), (150.0, True), (150.1, False), (208.0, False)])
def test_latency_target_on_recorded_timings(p95, passed):
    targets = Targets(latency=(LatencyTarget(batch_size=8, max_ms=150, percentile="p95"),))
    (check,) = check_results(Gates(), targets, {"benchmark": _results(0.99, 0.99, p95_int8=p95)["benchmark"]},
                             "onnx-int8")
    assert check["kind"] == "target" and check["measured"] == p95 and check["passed"] is passed


def test_latency_target_reads_its_percentile_and_batch():
    targets = Targets(latency=(LatencyTarget(batch_size=1, max_ms=7.5, percentile="p99"),))
    (check,) = [c for c in check_results(Gates(), targets, _results(0.995, 0.998), "onnx-int8") if c["kind"] == "target"]
    assert check["measured"] == 8.0 and not check["passed"]   # p99 at batch 1, not p95 (7.0) or batch 8


@pytest.mark.parametrize("speedup, passed", [(1.9, True), (1.5, True), (1.49, False), (0.8, False)])
def test_speedup_target_on_recorded_timings(speedup, passed):
    targets = Targets(min_speedup=1.5, speedup_batch_size=8)
    checks = _by_name(check_results(Gates(), targets, _results(0.995, 0.998, speedup=speedup), "onnx-int8"))
    (check,) = [c for name, c in checks.items() if "speedup" in name]
    assert check["measured"] == speedup and check["passed"] is passed


def test_validation_reports_the_worst_sentence_as_min_cosine():
    import numpy as np

    from inferforge.optimize.validate import compare_embeddings

    reference = np.eye(4, 8, dtype=np.float32)
    candidate = reference.copy()
    candidate[2, 3] = 0.5          # one sentence off: cosine 1 / sqrt(1.25) = 0.894
    report = compare_embeddings(reference, candidate, ["a", "b", "c", "d"])
    assert report.min_cosine == pytest.approx(1 / np.sqrt(1.25))
    assert report.mean_cosine == pytest.approx((3 + 1 / np.sqrt(1.25)) / 4)
    assert report.worst[0][1] == "c"
