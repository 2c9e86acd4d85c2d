"""The `slow` list in tests/conftest.py names tests that exist: a renamed test would silently join the
quick run."""

from pathlib import Path

import pytest

from tests.conftest import SLOW_TESTS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("node_id", sorted(SLOW_TESTS))
def test_slow_test_exists(node_id):
    path, name = node_id.split("::")
    assert f"def {name}(" in (REPO / path).read_text(), f"{node_id} is gone: update SLOW_TESTS in tests/conftest.py"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU the kernels run compiled whatever "
                                                                    "TRITON_INTERPRET says")
def test_kernel_tests_fail_when_the_triton_path_does_not_run():
    """Without the interpreter the CPU kernels fall back to their reference; tests/kernels/conftest.py
    must turn that into a failure instead of a reference-versus-reference pass."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/kernels/test_act_quant.py::test_int8_per_tensor_scale"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "instead of the Triton kernel" in proc.stdout
