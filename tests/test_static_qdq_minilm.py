"""Static QDQ on the real all-MiniLM-L6-v2 reaches the same gate as the dynamic path, in every length bucket."""

import json

import onnx
import pytest

from tests.conftest import run_cli


@pytest.mark.slow   # 2.5-5 minutes on 2 CPU cores: each candidate is scored on 220 calibration texts
def test_static_qdq_passes_the_gate_on_minilm(tmp_path):
    out = tmp_path / "minilm-qdq"
    proc = run_cli("quantize", "all-MiniLM-L6-v2", "--method", "static-qdq", "--output", out, "--json", "-q",
                   timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    buckets = report["validation"]["buckets"]
    assert set(buckets) == {"short", "ordinary", "long"}
    assert all(b["min_cosine"] >= 0.99 for b in buckets.values()), buckets
    gates = [c for c in report["checks"] if c["kind"] == "gate"]
    assert [c["bucket"] for c in gates] == ["short", "ordinary", "long"] and all(c["passed"] for c in gates)

    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["steps"][1]["result"]
    assert record["method"] == "static-qdq" and record["calibration_min_cosine"] >= 0.99
    # What was kept in float, and why, is recorded; most MatMuls stay quantized.
    excluded = record["excluded_nodes"]
    assert excluded == [n for e in record["auto_excluded"] for n in e["nodes"]]
    assert all("estimated_sqnr_db" in e and "activation" in e for e in record["auto_excluded"])
    model = onnx.load(str(out / "model.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    quantized = [n for n in matmuls if all(producers[i].op_type == "DequantizeLinear" for i in n.input if i in producers)
                 and n.name not in excluded]
    assert len(matmuls) == 48 and len(excluded) <= 16 and len(quantized) >= 32
    assert manifest["runtime"]["max_length"] == 256
