"""The weight-only dispatcher on recorded timings: choice per M bucket, the bf16-is-faster flag, the
cache's round trip and corrupt-cache handling, measuring an unknown GPU (mocked), and both
candidates' numbers against the dequantized reference (interpreter on CPU)."""

import json
import logging

import pytest
import torch
from torch import nn

from inferforge.kernels import _checks
from inferforge.kernels import weight_only_dispatch as wod
from inferforge.optimize.quantize import Int4WeightOnly, Int8WeightOnly, quantize

H100 = "NVIDIA H100 80GB HBM3"
# Recorded on an H100 (bench/results/h100-2026-11-26-quant-matmul.json, 4096x4096 int4-g128), plus a
# dequantize+cuBLAS time invented for the test where the file has none.
RECORDED_W4 = {1: {"fused": 0.01482, "dequantize+cublas": 0.030, "bf16": 0.01641},
               16: {"fused": 0.02068, "dequantize+cublas": 0.031, "bf16": 0.01675},
               256: {"fused": 0.07532, "dequantize+cublas": 0.032, "bf16": 0.01906}}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(_checks, "POISON_OUTPUTS", True)


def _model(fmt, n=48, k=64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.Linear(n, k, bias=False))
    quantize(model, Int8WeightOnly() if fmt == "w8a16" else Int4WeightOnly(group_size=16))
    return model


def _recorded_cache(n=48, k=64, group=16, gpu=H100):
    cache = wod.TimingCache()
    for m, timings in RECORDED_W4.items():
        cache.put(wod.ShapeKey(gpu, "w4a16", n, k, group, m), timings)
    return cache


def test_choice_per_bucket_and_bf16_flag():
    cache = _recorded_cache()
    d = wod.Dispatcher(cache, measure=lambda runners: pytest.fail("nothing should be measured"))
    key = lambda m: wod.ShapeKey(H100, "w4a16", 48, 64, 16, wod.m_bucket(m))  # noqa: E731
    one, sixteen, big = d.choice(key(1)), d.choice(key(9)), d.choice(key(200))
    assert (one.candidate, one.bf16_faster) == ("fused", False)
    assert one.speedup == pytest.approx(0.01641 / 0.01482)
    assert (sixteen.candidate, sixteen.bf16_faster) == ("fused", True)   # 9 tokens -> the M=16 bucket
    assert (big.candidate, big.bf16_faster) == ("dequantize+cublas", True)
    assert d.choice(key(4096)) is None        # not cached, no runners: nothing measured, no choice


def test_a_tie_with_bf16_counts_as_bf16_faster():
    assert wod.choose({"fused": 1.0, "dequantize+cublas": 2.0, "bf16": 1.0}).bf16_faster
    assert not wod.choose({"fused": 1.0, "dequantize+cublas": 2.0, "bf16": 1.001}).bf16_faster
    assert not wod.choose({"fused": 1.0}).bf16_faster        # bf16 not timed: no claim either way


def test_report_names_layers_where_bf16_is_faster():
    model = _model("w4a16")
    rows = wod.dispatch_report(model, [1, 16, 256, 2048], gpu=H100, dispatcher=wod.Dispatcher(_recorded_cache()))
    first = [r for r in rows if r["layer"] == "0"]
    assert [(r["m"], r["candidate"], r["bf16_faster"]) for r in first] == [
        (1, "fused", False), (16, "fused", True), (256, "dequantize+cublas", True), (2048, None, False)]
    text = wod.render_dispatch_report(rows)
    assert "0 M=256: dequantize+cublas" in text and "(bf16 is faster)" in text
    assert "not measured on this GPU yet (5 layer/batch case(s), timed on first use): 0 M=2048, 2 M=1, 2 M=16" in text
    assert "bf16 is faster than every quantized candidate for 2 layer/batch case(s): 0 M=16, 0 M=256" in text


def test_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    cache = wod.TimingCache(path)
    key = wod.ShapeKey(H100, "w8a16", 4096, 4096, 4096, 64)
    cache.put(key, {"fused": 0.0178, "dequantize+cublas": 0.02, "bf16": 0.01465})
    again = wod.TimingCache(path)
    assert again.get(key) == {"fused": 0.0178, "dequantize+cublas": 0.02, "bf16": 0.01465}
    assert again.rebuilt_reason is None
    assert wod.choose(again.get(key)).bf16_faster
    assert wod.TimingCache(path).get(wod.ShapeKey("NVIDIA H200", "w8a16", 4096, 4096, 4096, 64)) is None


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": "other", "entries": {}}),
                                  json.dumps({"format": wod.CACHE_FORMAT, "entries": {"k": {"fused": "fast"}}})])
def test_corrupt_cache_is_logged_and_rebuilt(tmp_path, caplog, text):
    path = tmp_path / "cache.json"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger=wod.__name__):
        cache = wod.TimingCache(path)
    assert cache.entries == {} and "unreadable dispatch cache" in caplog.text and str(path) in caplog.text
    measured = []
    d = wod.Dispatcher(cache, measure=lambda runners: measured.append(1) or {"fused": 1.0, "bf16": 2.0})
    assert d.choice(wod.ShapeKey(H100, "w8a16", 8, 8, 8, 1), runners=lambda: {}).candidate == "fused"
    assert measured == [1]
    assert json.loads(path.read_text())["format"] == wod.CACHE_FORMAT     # rewritten whole


@pytest.mark.parametrize("fmt", ["w8a16", "w4a16"])
def test_unknown_gpu_is_measured_once_and_runs_the_choice(monkeypatch, tmp_path, fmt):
    """On a GPU the cache has not seen, the first forward times the candidates (mocked: each runner is
    called once and its output checked, then recorded timings are returned), stores them, and later
    forwards reuse them; the chosen candidate's output matches the dequantized reference."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(wod, "_DEVICE_NAMES", {})
    model = _model(fmt)
    layer = model[0]
    x = torch.randn(3, 5, 64)
    want = x @ layer.dequantized_weight().T + layer.bias
    calls = []

    def measure(runners):
        outs = {name: fn() for name, fn in runners.items()}
        assert set(outs) == {"fused", "dequantize+cublas", "bf16"}
        assert all(o.shape == (15, 48) for o in outs.values())
        calls.append(sorted(outs))
        return {"fused": 2.0, "dequantize+cublas": 1.0, "bf16": 1.5}

    d = wod.Dispatcher(wod.TimingCache(tmp_path / "c.json"), measure=measure)
    for _ in range(2):
        got = wod.dispatch_forward(layer, x, dispatcher=d)
        assert got.shape == (3, 5, 48)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len(calls) == 1
    key = wod.shape_key(layer, 15, torch.float32, "NVIDIA Future GPU")
    assert key.m == 16 and wod.TimingCache(tmp_path / "c.json").get(key)["dequantize+cublas"] == 1.0


def test_no_measuring_while_autotune_is_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(wod, "_DEVICE_NAMES", {})
    monkeypatch.setenv("INFERFORGE_AUTOTUNE", "0")
    layer = _model("w8a16")[0]
    d = wod.Dispatcher(wod.TimingCache(), measure=lambda runners: pytest.fail("measured with autotune off"))
    x = torch.randn(2, 64)
    torch.testing.assert_close(wod.dispatch_forward(layer, x, dispatcher=d),
                               x @ layer.dequantized_weight().T + layer.bias, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["w8a16", "w4a16"])
@pytest.mark.parametrize("candidate", wod.CANDIDATES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_candidates_match_reference(fmt, candidate, dtype):
    layer = _model(fmt, n=80, k=96)[0]
    x = torch.randn(17, 96).to(dtype)
    want = x.double() @ layer.dequantized_weight().double().T + layer.bias.double()
    got = wod.run_candidate(layer, x, candidate)
    assert got.shape == (17, 80) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got.double() - want).abs().max() <= tol * want.abs().max()


def test_m_bucket():
    assert [wod.m_bucket(m) for m in (1, 2, 3, 16, 17, 4096)] == [1, 2, 4, 16, 32, 4096]
