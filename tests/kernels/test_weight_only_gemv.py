"""The M = 1 GEMV, split-K at M = 2-16 and the int4 layouts (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch

from inferforge.errors import UserInputError
from inferforge.kernels import int4_layout, w4a16_matmul, w8a16_matmul
from inferforge.kernels.reference import dequantize_weight_only_reference, weight_only_matmul_reference
from inferforge.kernels.weight_only_gemv import GemvConfig, _workspace, gemv
from inferforge.kernels.weight_only_matmul import TileConfig, _run, dequantize
from tests.kernels.test_weight_only_matmul import DEVICE, DTYPES, close, poisoned_outputs  # noqa: F401 (autouse)

LAYOUTS = [int4_layout.KPAIRS, int4_layout.INTERLEAVED]


def int4_case(n, k, group, m, dtype, layout, bias=True):
    q = torch.randint(0, 16, (n, k), device=DEVICE)
    scales = torch.rand(n, k // group, device=DEVICE) * 0.1
    zeros = torch.rand(n, k // group, device=DEVICE) * 15
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    # The reference reads the codes in the old layout: both layouts must compute the same function.
    want = weight_only_matmul_reference(x.double(), int4_layout.pack(q), scales.double(), zeros.double(),
                                        None if b is None else b.double(), bits=4, group_size=group)
    return x, int4_layout.pack(q, layout), scales, zeros, b, want


# --- layouts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_pack_unpack_round_trip(layout):
    q = torch.randint(0, 16, (7, 96), dtype=torch.uint8)
    packed = int4_layout.pack(q, layout)
    assert packed.shape == (7, 48) and packed.dtype == torch.uint8
    assert torch.equal(int4_layout.unpack(packed, layout), q)


def test_interleaved_byte_holds_k_and_k_plus_16():
    q = torch.zeros(1, 64, dtype=torch.uint8)
    q[0, 0], q[0, 16], q[0, 33], q[0, 49] = 1, 2, 3, 4
    packed = int4_layout.pack(q, int4_layout.INTERLEAVED)
    assert packed[0, 0].item() == 0x21 and packed[0, 17].item() == 0x43
    assert int(packed.count_nonzero()) == 2


def test_to_layout_converts_both_ways_exactly():
    n, k, group = 9, 128, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    old = int4_layout.pack(q)
    new = int4_layout.to_layout(old, int4_layout.KPAIRS, int4_layout.INTERLEAVED, n, k, group)
    assert torch.equal(new, int4_layout.pack(q, int4_layout.INTERLEAVED)) and not torch.equal(new, old)
    assert torch.equal(int4_layout.to_layout(new, int4_layout.INTERLEAVED, int4_layout.KPAIRS, n, k, group), old)
    assert int4_layout.to_layout(old, int4_layout.KPAIRS, int4_layout.KPAIRS, n, k, group) is old


def test_layout_errors_name_the_problem():
    packed = torch.zeros(4, 32, dtype=torch.uint8)
    with pytest.raises(UserInputError, match="int4-zigzag-v9.*not known"):
        int4_layout.to_layout(packed, "int4-zigzag-v9", int4_layout.KPAIRS, 4, 64, 32)
    with pytest.raises(UserInputError, match="multiple of 32, got 16"):
        int4_layout.to_layout(packed, int4_layout.KPAIRS, int4_layout.INTERLEAVED, 4, 64, 16)
    with pytest.raises(UserInputError, match=r"uint8 \[4, 48\]"):
        int4_layout.to_layout(packed, int4_layout.KPAIRS, int4_layout.INTERLEAVED, 4, 96, 32)
    assert int4_layout.kernel_layout("cpu", 128, 4096) == int4_layout.KPAIRS
    assert int4_layout.kernel_layout("cuda", 128, 4096) == int4_layout.INTERLEAVED
    assert int4_layout.kernel_layout("cuda", 16, 4096) == int4_layout.KPAIRS


# --- GEMV (M = 1) --------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_w4a16_gemv(layout, group, dtype):
    x, packed, scales, zeros, bias, want = int4_case(37, 2 * group + (128 if group < 128 else 0), group, 1, dtype,
                                                     layout)
    for splits in (1, 3, None):
        got = w4a16_matmul(x, packed, scales, zeros, bias, group_size=group, split_k=splits, layout=layout)
        assert got.shape == (1, 37) and got.dtype == dtype
        close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [200, 96])          # 200: not a multiple of the interpreter's BLOCK_K (32)
def test_w8a16_gemv(dtype, k):
    n = 45
    x = torch.randn(1, k, dtype=dtype, device=DEVICE)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    scale = torch.rand(n, device=DEVICE) * 0.02
    bias = torch.randn(n, dtype=dtype, device=DEVICE)
    want = weight_only_matmul_reference(x.double(), w, scale.double(), None, bias.double(), bits=8, group_size=k)
    for splits in (1, 4, None):
        close(w8a16_matmul(x, w, scale, bias, split_k=splits), want, dtype)
    close(w8a16_matmul(x, w, scale, split_k=4), want - bias.double(), dtype)


def test_gemv_split_workspace_is_left_zero_and_reusable():
    x, packed, scales, zeros, bias, want = int4_case(50, 256, 64, 1, torch.float32, int4_layout.INTERLEAVED)
    cfg = GemvConfig(16, 32)
    first = gemv(x, packed, scales, zeros, bias, n=50, k=256, bits=4, group=64, interleaved=True, cfg=cfg, splits=4)
    partial, counters = _workspace(x.device, 50, 4)
    assert not partial.any() and not counters.any()
    second = gemv(x, packed, scales, zeros, bias, n=50, k=256, bits=4, group=64, interleaved=True, cfg=cfg, splits=4)
    assert torch.equal(first, second)
    close(first, want, torch.float32)


# --- M = 2-16 (split-K tiles) and the other paths with the interleaved layout --------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m", [2, 3, 7, 16])
def test_w4a16_small_m_split_k(layout, m):
    x, packed, scales, zeros, bias, want = int4_case(41, 192, 64, m, torch.float16, layout)
    for split_k in (1, 2, None):
        close(w4a16_matmul(x, packed, scales, zeros, bias, group_size=64, split_k=split_k, layout=layout), want,
              torch.float16)


@pytest.mark.parametrize("cfg", [TileConfig(1, 32, 32), TileConfig(16, 32, 64), TileConfig(32, 64, 32),
                                 TileConfig(0, 32, 32, dequantize_first=True), GemvConfig(16, 64)], ids=str)
def test_interleaved_on_every_path(cfg):
    m = 1 if isinstance(cfg, GemvConfig) else 5
    x, packed, scales, zeros, bias, want = int4_case(40, 256, 64, m, torch.float32, int4_layout.INTERLEAVED)
    for split_k in (1, 3):
        got = _run(x, packed, scales, zeros, bias, n=40, k=256, bits=4, group=64, cfg=cfg, split_k=split_k,
                   layout=int4_layout.INTERLEAVED)
        close(got, want, torch.float32)


@pytest.mark.parametrize("group", [32, 128])
def test_dequantize_interleaved_matches_the_reference(group):
    n, k = 33, 256
    q = torch.randint(0, 16, (n, k), device=DEVICE)
    scales, zeros = torch.rand(n, k // group, device=DEVICE), torch.rand(n, k // group, device=DEVICE) * 15
    packed = int4_layout.pack(q, int4_layout.INTERLEAVED)
    got = dequantize(packed, scales, zeros, bits=4, group=group, dtype=torch.float32, k=k,
                     layout=int4_layout.INTERLEAVED)
    assert torch.equal(got, dequantize_weight_only_reference(int4_layout.pack(q), scales, zeros, bits=4,
                                                             group_size=group))


def test_unknown_layout_is_refused():
    x = torch.randn(1, 64, device=DEVICE)
    packed = torch.zeros(4, 32, dtype=torch.uint8, device=DEVICE)
    ones = torch.ones(4, 2, device=DEVICE)
    with pytest.raises(UserInputError, match="not known"):
        w4a16_matmul(x, packed, ones, ones, group_size=32, layout="int4-kpairs-v7")
