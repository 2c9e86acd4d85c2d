import os

import torch

# Before triton is imported anywhere: without a GPU, run Triton kernels in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never download anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


def run_cli(*args, cwd=None, timeout=600):
    """Run the real command line in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", "inferforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The default job, `inferforge optimize`, run once on the real model for the whole session."""
    out = tmp_path_factory.mktemp("demo") / "minilm-int8"
    proc = run_cli("optimize", "--output", out, "--json")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return out, json.loads(proc.stdout), proc
