"""Distillation across processes: SIGTERM then --resume gives the uninterrupted run's weights; torchrun
with 2 CPU processes (gloo) writes exactly one student; one DDP step over 2 ranks has the gradient of
one process on the whole batch."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.distill_helpers import DOCS, save_tiny_bert

# Enough steps that a SIGTERM sent once the first checkpoint exists lands mid-training.
RUN = ["--layers", "0", "--steps", "60", "--batch-size", "16", "--max-length", "48", "--eval-every", "20",
       "--save-every", "5", "--seed", "7", "-q"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("teacher") / "bert", layers=2)


def _weights(out):
    return load_file(out / "model.safetensors")


@pytest.mark.slow
def test_sigterm_then_resume_ends_with_the_uninterrupted_weights(teacher_dir, tmp_path):
    straight = tmp_path / "straight"
    proc = run_cli("distill", teacher_dir, "--data", DOCS, *RUN, "--output", straight)
    assert proc.returncode == 0, proc.stderr

    out = tmp_path / "interrupted"
    latest = tmp_path / "interrupted.checkpoints" / "latest.json"
    child = subprocess.Popen([sys.executable, "-m", "inferforge", "distill", str(teacher_dir), "--data", str(DOCS), *RUN,
                              "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not latest.is_file() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 130, err
    step = json.loads(latest.read_text())["step"]
    assert 5 <= step < 60 and f"interrupted (SIGTERM) at step {step} of 60" in err
    assert "--resume" in err and not out.exists()

    proc = run_cli("distill", teacher_dir, "--data", DOCS, *RUN, "--resume", "--output", out)
    assert proc.returncode == 0, proc.stderr
    want, got = _weights(straight), _weights(out)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == list(range(1, 61))


@pytest.mark.slow
def test_torchrun_two_cpu_processes_write_exactly_one_student(teacher_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "inferforge", "distill", str(teacher_dir), "--data", str(DOCS), "--layers", "1",
                           "--steps", "6", "--batch-size", "8", "--max-length", "24", "--eval-every", "3",
                           "--save-every", "3", "--json", "-q", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)   # one JSON document: rank 1 printed nothing
    assert manifest["kind"] == "distilled-encoder" and manifest["distill"]["step"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "ddp.checkpoints"]
    state = json.loads((tmp_path / "ddp.checkpoints" / "step-000006" / "state.json").read_text())
    assert state["fingerprint"]["world"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 for r in rows if "loss" in r)


@pytest.mark.slow
def test_one_ddp_step_over_two_ranks_has_the_single_process_gradient(teacher_dir, tmp_path):
    import torch.multiprocessing as mp

    from tests.distill_helpers import ddp_step_gradient_worker, step_gradient

    out = tmp_path / "ddp_grad.pt"
    mp.spawn(ddp_step_gradient_worker, args=(2, str(teacher_dir), str(tmp_path / "init"), str(out)), nprocs=2)
    ddp = torch.load(out, weights_only=True)
    single = step_gradient(teacher_dir)
    assert ddp.keys() == single.keys() and sum(float(g.abs().sum()) for g in single.values()) > 0
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-7, msg=name)
