"""scripts/bench_engine_cpu.py: the batch-1 weight-streaming floor it reports next to the engine."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_engine_cpu.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_engine_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_floor_reads_every_linear_weight_once_and_not_the_embedding():
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 12), torch.nn.Linear(12, 8),
                                torch.nn.Linear(8, 50, bias=False))
    seconds, weight_bytes = _script().streaming_floor_seconds(model, passes=3)
    assert weight_bytes == 4 * (8 * 12 + 12 * 8 + 8 * 50)
    assert seconds > 0


def test_reps_below_one_are_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        _script().main(["--reps", "0"])
    assert exit_info.value.code == 2
