"""The measured dispatcher: table lookup (GPU name, versions, shape bucket), what may go to SDPA, that the
SDPA call computes flash_attention's semantics, and that it logs once per shape. CPU only: the table is
recorded here, and the SDPA call runs on CPU tensors (math backend)."""

import json
import logging

import pytest
import torch

from inferforge.kernels import attention_dispatch as dispatch
from inferforge.kernels.reference import attention_reference

KEY = dispatch.ShapeKey("bfloat16", 128, True, 32, 8, 4096)


def recorded_table(tmp_path, rows, name="table.json"):
    path = tmp_path / name           # a table is read once per process: a new file per content
    path.write_text(json.dumps(dispatch.table_document(rows, "recorded for tests")))
    return str(path)


def row(key=KEY, kernel_ms=2.0, sdpa_ms=None, gpu="NVIDIA H200", torch_version="2.11.0+cu128", triton="3.6.0"):
    return dispatch.table_row(gpu=gpu, torch_version=torch_version, triton_version=triton, key=key,
                              kernel_ms=kernel_ms, sdpa_ms=sdpa_ms if sdpa_ms is not None else {"cudnn": 1.5})


def lookup(path, key=KEY, gpu="NVIDIA H200", torch_version="2.11.1", triton="3.6.0"):
    return dispatch.faster_sdpa_backend(gpu, key, torch_version=torch_version, triton_version=triton, path=path)


def test_lookup_matches_gpu_versions_and_bucket(tmp_path):
    slower = dispatch.ShapeKey("bfloat16", 128, True, 32, 8, 8192)
    path = recorded_table(tmp_path, [row(sdpa_ms={"cudnn": 1.5, "flash": 1.8, "efficient": 3.0}),
                                     row(key=slower, kernel_ms=4.0, sdpa_ms={"cudnn": 4.4})])
    backend, found = lookup(path)
    assert backend == "cudnn" and found["best_sdpa_ms"] == 1.5
    assert lookup(path, gpu="  nvidia h200 ")[0] == "cudnn"            # name compared case- and space-blind
    assert lookup(path, gpu="NVIDIA H100 80GB HBM3") is None            # another GPU: no data, the kernel
    assert lookup(path, torch_version="2.12.0") is None                 # another torch minor: no data
    assert lookup(path, triton="3.5.1") is None
    assert lookup(path, key=slower) is None                             # the kernel won this shape
    assert lookup(path, key=dispatch.ShapeKey("bfloat16", 128, True, 32, 8, 2048)) is None   # unmeasured
    assert lookup(recorded_table(tmp_path, [], "empty.json")) is None


def test_sequence_lengths_fall_in_power_of_two_buckets():
    assert [dispatch.seqlen_bucket(s) for s in (1, 2, 1000, 1024, 1025, 3000, 16384)] == \
        [1, 2, 1024, 1024, 2048, 4096, 16384]
    q, k = torch.empty(2, 3000, 32, 128, dtype=torch.bfloat16), torch.empty(2, 3000, 8, 128, dtype=torch.bfloat16)
    assert dispatch.dispatchable_key(q, k, causal=True, window=(-1, -1), varlen=False, return_lse=False) == KEY


def test_only_what_sdpa_computes_identically_is_dispatchable():
    q, k = torch.empty(1, 64, 4, 64, dtype=torch.float16), torch.empty(1, 64, 2, 64, dtype=torch.float16)
    ok = dict(causal=True, window=(-1, -1), varlen=False, return_lse=False)
    assert dispatch.dispatchable_key(q, k, **ok) is not None
    assert dispatch.dispatchable_key(q, k, **{**ok, "window": (16, 0)}) is None
    assert dispatch.dispatchable_key(q, k, **{**ok, "varlen": True}) is None
    assert dispatch.dispatchable_key(q, k, **{**ok, "return_lse": True}) is None
    assert dispatch.dispatchable_key(q.float(), k.float(), **ok) is None
    chunk = torch.empty(1, 16, 4, 64, dtype=torch.float16)     # seq_q != seq_k: SDPA's causal is top-left
    assert dispatch.dispatchable_key(chunk, k, **ok) is None
    assert dispatch.dispatchable_key(chunk, k, **{**ok, "causal": False}) is None   # rows are self-attention
    assert dispatch.dispatchable_key(q, k, **{**ok, "causal": False}) is not None


def test_a_tie_runs_the_kernel(tmp_path):
    assert lookup(recorded_table(tmp_path, [row(kernel_ms=1.5, sdpa_ms={"cudnn": 1.5})])) is None
    assert lookup(recorded_table(tmp_path, [row(kernel_ms=1.5, sdpa_ms={"cudnn": 1.499})], "b.json"))[0] == "cudnn"


@pytest.mark.parametrize("content", ["{not json", '{"format": 1}', '[1, 2]', '{"format": 7, "rows": []}',
                                     '{"format": 1, "rows": [{"gpu": "x"}]}', None])
def test_an_unreadable_table_warns_once_and_runs_the_kernel(tmp_path, caplog, content):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="inferforge.kernels.attention"):
        assert lookup(str(path)) is None and lookup(str(path)) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "Triton kernel" in warnings[0]


@pytest.mark.parametrize("shape", [(2, 37, 8, 2, 64), (1, 64, 4, 4, 80), (3, 5, 6, 1, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_call_has_flash_attention_semantics(shape, causal):
    b, s, h, hk, d = shape
    q, k, v = (torch.randn(b, s, n, d, dtype=torch.float64) for n in (h, hk, hk))
    out = dispatch.sdpa_attention(q, k, v, causal=causal, sm_scale=0.3, backend="math")
    assert out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=causal, sm_scale=0.3,
                                                        compute_dtype=torch.float64))
    torch.testing.assert_close(dispatch.sdpa_attention(q, k, v, causal=causal, sm_scale=0.3, backend=None), out)


def test_sdpa_call_refuses_a_causal_chunk():
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 9, 2, 16)
    with pytest.raises(ValueError, match="top-left"):
        dispatch.sdpa_attention(q, k, k, causal=True, sm_scale=0.25, backend="math")


def test_dispatch_logs_once_per_shape_and_can_be_forced_off(tmp_path, monkeypatch, caplog):
    """maybe_sdpa with the CUDA checks stubbed: the table's choice runs, one log line per shape key."""
    monkeypatch.setenv(dispatch.TABLE_ENV, recorded_table(tmp_path, [row(
        key=dispatch.ShapeKey("float16", 64, True, 4, 2, 64), gpu="Fake GPU",
        torch_version=torch.__version__, triton=__import__("triton").__version__, sdpa_ms={"math": 0.5})]))
    monkeypatch.setattr(dispatch.torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(dispatch, "_LOGGED", set())

    class CudaLike(torch.Tensor):     # a CPU tensor that says it is on CUDA, so the CPU run takes the GPU branch
        @property
        def is_cuda(self):
            return True

    q = torch.randn(1, 50, 4, 64, dtype=torch.float16).as_subclass(CudaLike)
    k, v = (torch.randn(1, 50, 2, 64, dtype=torch.float16) for _ in range(2))
    call = dict(causal=True, sm_scale=0.125, window=(-1, -1), varlen=False, return_lse=False)
    with caplog.at_level(logging.INFO, logger="inferforge.kernels.attention"):
        outs = [dispatch.maybe_sdpa(q, k, v, **call) for _ in range(3)]
    assert all(o is not None for o in outs)
    torch.testing.assert_close(torch.Tensor(outs[0]).float(), attention_reference(
        torch.Tensor(q).float(), k.float(), v.float(), causal=True, sm_scale=0.125), atol=2e-3, rtol=2e-3)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "SDPA backend 'math'" in messages[0] and "Fake GPU" in messages[0]
    monkeypatch.setenv(dispatch.MODE_ENV, "kernel")
    assert dispatch.maybe_sdpa(q, k, v, **call) is None
    monkeypatch.setenv(dispatch.MODE_ENV, "off")
    with pytest.raises(dispatch.UserInputError, match="'auto'.*'kernel'"):
        dispatch.maybe_sdpa(q, k, v, **call)
    monkeypatch.delenv(dispatch.MODE_ENV)
    assert dispatch.maybe_sdpa(q, k, v, **{**call, "causal": False}) is None      # no row: the kernel


def test_shipped_table_loads_and_says_it_is_unmeasured():
    document = json.loads(dispatch.SHIPPED_TABLE.read_text())
    assert document["format"] == dispatch.FORMAT_VERSION and "No GPU has measured" in document["note"]
    assert dispatch.load_table(str(dispatch.SHIPPED_TABLE)) == {}
