"""The weight-only kernels compile for sm_90 (H100/H200) without a GPU: no register spills, shared
memory within the limit, wgmma where the tiles use tensor cores (compile_report.py, ptxas -v)."""

from inferforge.kernels.compile_report import SM90_SHARED_LIMIT, run_report


def test_weight_only_configs_compile_for_sm90_without_spills():
    rows = run_report(["weight_only"])
    labels = {r["label"] for r in rows}
    assert any(label.startswith("gemv w4 interleaved") for label in labels)
    assert any(label.startswith("tile w4 interleaved 16x") for label in labels)
    for r in rows:
        assert r["shared_bytes"] <= SM90_SHARED_LIMIT, r
        if r["expect_wgmma"]:
            assert r["wgmma"], r
        assert r["spill_bytes"] == 0 and r["ok"], r
    assert not any(r["wgmma"] for r in rows if r["label"].startswith("gemv"))   # CUDA cores by design


def test_every_int8_tile_the_tuner_times_is_in_the_compile_report():
    from inferforge.kernels.weight_only_matmul import (
        INT8_TILES_LARGE_M,
        INT8_TILES_SMALL_M,
        TileConfig,
        _candidates,
        tile_warps,
    )

    checked = set(INT8_TILES_SMALL_M) | set(INT8_TILES_LARGE_M)
    for m in (2, 16, 17, 64, 65, 4096):
        tiles = [c for c in _candidates(m, 8, 4096) if isinstance(c, TileConfig) and not c.dequantize_first]
        assert tiles
        for c in tiles:
            assert (c.block_m, c.block_n, c.block_k) in checked, c
            assert c.num_warps == tile_warps(c.block_m, c.block_n, c.block_k), c

