"""The weight-only kernels compile for sm_90 (H100/H200) without a GPU: no register spills, shared
memory within the limit, wgmma where the tiles use tensor cores (compile_report.py, ptxas -v)."""

from inferforge.kernels.compile_report import SM90_SHARED_LIMIT, run_report

# Existing int8 tensor-core tiles (tuner candidates from before the GEMV) that spill on sm_90; reported,
# not yet fixed. Everything else must compile clean.
KNOWN_SPILLS = {"tile w8 int8 16x64x256 split", "tile w8 int8 64x64x128", "tile w8 int8 128x128x128"}


def test_weight_only_configs_compile_for_sm90_without_spills():
    rows = run_report(["weight_only"])
    labels = {r["label"] for r in rows}
    assert any(label.startswith("gemv w4 interleaved") for label in labels)
    assert any(label.startswith("tile w4 interleaved 16x") for label in labels)
    for r in rows:
        assert r["shared_bytes"] <= SM90_SHARED_LIMIT, r
        if r["expect_wgmma"]:
            assert r["wgmma"], r
        if r["label"] not in KNOWN_SPILLS:
            assert r["spill_bytes"] == 0 and r["ok"], r
    assert not any(r["wgmma"] for r in rows if r["label"].startswith("gemv"))   # CUDA cores by design
