"""The pytest-benchmark microbenchmarks under bench/micro are collected by `pytest bench` and left out of a
plain `pytest` (testpaths is `tests`). Collection only: nothing is timed here."""

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import env_without_interpreter

REPO = Path(__file__).resolve().parents[1]


def test_default_run_leaves_the_microbenchmarks_out():
    (line,) = re.findall(r"^testpaths\s*=.*$", (REPO / "pyproject.toml").read_text(), flags=re.M)
    assert line.replace(" ", "") == 'testpaths=["tests"]', line
    assert not (REPO / "tests" / "micro").exists() and (REPO / "bench" / "micro" / "conftest.py").is_file()


def test_pytest_bench_collects_the_microbenchmarks():
    env = env_without_interpreter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = re.findall(r"^bench/micro/test_micro_\w+\.py::\S+$", proc.stdout, flags=re.M)
    assert len(ids) >= 4, proc.stdout
    for name in ("test_onnx_encoder_call[fp32]", "test_onnx_encoder_call[int8]", "test_quantize_rows_int8",
                 "test_engine_decode_step[1]", "test_engine_decode_step[8]", "test_cpu_dense_linear[mkl-8]",
                 "test_paged_decode_attention_cpu[batched]",
                 "test_paged_decode_attention_cpu[loop-reference]"):
        assert any(name in i for i in ids), name
