"""Microbenchmarks for pytest-benchmark: `pytest bench --benchmark-only --benchmark-json out.json`.

Not part of the test suite: pyproject's `testpaths` is `tests`, so a plain `pytest` never collects
them. Unlike tests/conftest.py this does not set TRITON_INTERPRET: on a CPU the kernels run their
PyTorch references (what a CPU deployment runs), on a GPU the compiled Triton kernels; each benchmark
records which in `extra_info["path"]`. Fixtures build tiny seeded models in a temporary directory
(seconds); nothing is downloaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:   # `tests.factories` and `tests.factories_llama` build the tiny models
    sys.path.insert(0, str(REPO))
for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(name, value)


@pytest.fixture(scope="session")
def kernel_path():
    """`kernel_path(on_cuda)`: which implementation a kernel call takes here (the dispatch in kernels/*.py)."""
    def which(on_cuda: bool) -> str:
        if on_cuda:
            return "triton"
        return "triton-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "torch-reference"
    return which


@pytest.fixture(scope="session")
def tiny_encoder_onnx(tmp_path_factory):
    """(fp32 model.onnx, dynamic-int8 model.onnx, vocab size) of the 2-layer, 64-wide test BERT."""
    from inferforge.optimize.export import export_onnx
    from inferforge.optimize.onnx_quantize import quantize_dynamic_int8
    from tests.factories import tiny_bert

    model, tokenizer = tiny_bert()
    src = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    fp32 = export_onnx(src, tmp_path_factory.mktemp("tiny-bert-onnx"), opset=17)
    int8 = fp32.with_name("model_int8.onnx")
    quantize_dynamic_int8(fp32, int8)
    return {"fp32": fp32, "int8": int8, "vocab_size": tokenizer.vocab_size}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from tests.factories_llama import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
