"""Resuming and extending a distillation run, what a run leaves on disk, and its clean-up."""

import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file

from inferforge.cli import main
from inferforge.errors import UserInputError
from inferforge.optimize import distill_checkpoint as ckpt
from inferforge.optimize.distill import DistillConfig, distill
from inferforge.optimize.distill_train import lr_factor
from tests.distill_helpers import DOCS, save_tiny_bert

CONFIG = DistillConfig(layers=(0,), steps=6, batch_size=8, max_length=24, eval_every=0, save_every=2, seed=3)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("teacher") / "bert", layers=2)


def _state(student) -> dict:
    return {k: v.clone() for k, v in student.state_dict().items()}


class _SigtermAfterCheckpoint:
    """A quiet progress sink that sends this process SIGTERM once checkpoint `step` is saved."""

    quiet, console = True, None

    def __init__(self, step: int):
        self.step = step

    def print(self, text, **_):
        if text.startswith(f"checkpoint: step {self.step} saved"):
            os.kill(os.getpid(), signal.SIGTERM)


def test_resume_after_an_interrupt_reproduces_the_uninterrupted_run(teacher_dir, tmp_path):
    straight = distill(str(teacher_dir), None, [DOCS], CONFIG)
    with pytest.raises(ckpt.DistillInterrupted, match="at step 3 of 6"):
        distill(str(teacher_dir), None, [DOCS], CONFIG, checkpoint_dir=tmp_path / "ck",
                progress=_SigtermAfterCheckpoint(2))
    # Training time accumulates over the segments: the checkpoint keeps it (here made large to tell).
    state_path = tmp_path / "ck" / "step-000003" / "state.json"
    state = json.loads(state_path.read_text())
    assert 0 < state["train_seconds"] < 1000
    state_path.write_text(json.dumps({**state, "train_seconds": 1000.0}))
    resumed = distill(str(teacher_dir), None, [DOCS], CONFIG, checkpoint_dir=tmp_path / "ck", resume=True)
    want, got = straight.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["lr"] for r in resumed.history if "lr" in r] == [r["lr"] for r in straight.history if "lr" in r]
    assert 1000 < resumed.train_seconds < 1000 + 600


def test_a_longer_resumed_run_trains_from_its_first_new_step(teacher_dir, tmp_path):
    done = distill(str(teacher_dir), None, [DOCS], CONFIG, checkpoint_dir=tmp_path / "ck")
    assert done.step == 6 and done.history[5]["lr"] == 0.0   # the cosine schedule ends at 0
    before = load_file(tmp_path / "ck" / "step-000006" / "weights.safetensors")
    # Step 7 of 7 runs at the new schedule's lr (not the old schedule's final 0), so the weights move.
    assert lr_factor(6, 7, CONFIG.warmup_share) > 0.01
    longer = distill(str(teacher_dir), None, [DOCS], dataclasses.replace(CONFIG, steps=7),
                     checkpoint_dir=tmp_path / "ck", resume=True)
    assert longer.step == 7
    after = longer.student.state_dict()
    changed = [k for k, v in before.items() if k.startswith("student.") and not torch.equal(v, after[k[8:]])]
    assert len(changed) > 10


def test_resume_names_the_setting_that_changed_and_ignores_the_other_familys(teacher_dir, tmp_path, capsys):
    base = ["distill", str(teacher_dir), "--layers", "0", "--data", str(DOCS), "--steps", "2", "--batch-size", "8",
            "--max-length", "24", "--eval-every", "0", "-q", "--output", str(tmp_path / "out")]
    assert main(base) == 0
    assert main([*base, "--resume", "--steps", "3", "--lr", "0.001"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the checkpoint in") and "\n" not in err
    assert "changed: lr 0.0003 -> 0.001" in err and "--resume:" not in err
    # The KL temperature and weights are a decoder's: an encoder run continues with them changed.
    assert main([*base, "--resume", "--steps", "3", "--temperature", "4", "--kl-weight", "0.5"]) == 0
    capsys.readouterr()
    assert main([*base, "--resume", "--steps", "4", "--embedding-loss", "mse"]) == 2
    assert "changed: embedding_loss cosine -> mse" in capsys.readouterr().err


def test_changes_lists_each_changed_part():
    state = {"fingerprint": {"config": "a", "teacher": "t", "data": ["d"], "world": 1},
             "settings": {"lr": 0.0003, "seed": 0}}
    now = {"config": "b", "teacher": "t", "data": ["e"], "world": 2}
    assert ckpt.changes(state, now, {"lr": 0.001, "seed": 0}) == ("changed: lr 0.0003 -> 0.001, data files, "
                                                                  "number of processes 1 -> 2")
    # A later setting at its default is not saved: the message names the default, not "None".
    state = {"fingerprint": {"config": "a"}, "settings": {"lr": 0.0003}}
    assert ckpt.changes(state, {"config": "b"}, {"lr": 0.0003, "hidden_loss": "cosine"}) == (
        "changed: hidden_loss mse -> cosine")
    state["settings"]["hidden_layers"] = "last"
    assert ckpt.changes(state, {"config": "b"}, {"lr": 0.0003}) == "changed: hidden_layers last -> all"


def test_hidden_loss_settings_without_a_hidden_weight_are_refused(teacher_dir, tmp_path, capsys):
    """An encoder's hidden-state loss is off by default: shaping it without turning it on is a mistake."""
    args = ["distill", str(teacher_dir), "--layers", "0", "--data", str(DOCS), "--steps", "1", "--batch-size", "8",
            "--max-length", "24", "-q", "--output", str(tmp_path / "out")]
    assert main([*args, "--hidden-layers", "last"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "add --hidden-weight" in err and not (tmp_path / "out").exists()


def test_artifact_weights_are_readable_like_its_other_files_and_data_paths_absolute(teacher_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.chdir(DOCS.parent)
    out = tmp_path / "out"
    assert main(["distill", str(teacher_dir), "--layers", "0", "--data", DOCS.name, "--steps", "2", "--batch-size",
                 "8", "--max-length", "24", "--eval-every", "0", "-q", "--json", "--output", str(out)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["data"]["files"][0]["path"] == str(DOCS.resolve())
    mode = (out / "config.json").stat().st_mode
    assert (out / "model.safetensors").stat().st_mode == mode
    checkpoint = tmp_path / "out.checkpoints" / "step-000002"
    assert (checkpoint / "weights.safetensors").stat().st_mode == (checkpoint / "state.json").stat().st_mode


FACTORY = """
import time
from pathlib import Path

from transformers import AutoModel, AutoTokenizer

TEACHER = {teacher!r}


def teacher():
    return AutoModel.from_pretrained(TEACHER), AutoTokenizer.from_pretrained(TEACHER)


def slow_teacher():
    Path("loading").write_text("")
    time.sleep(120)
"""


def test_the_python_api_leaves_no_scratch_directory(teacher_dir, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    (tmp_path / "factories.py").write_text(FACTORY.format(teacher=str(teacher_dir)))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = DistillConfig(layers=(0,), steps=1, batch_size=8, max_length=16, eval_every=0)
    distill(str(teacher_dir), None, [DOCS], config)
    assert list(scratch.iterdir()) == []
    # A factory's teacher is saved there; the result names it, so it stays until the result goes.
    result = distill("factories:teacher", None, [DOCS], config)
    assert (result.teacher.path / "config.json").is_file() and len(list(scratch.iterdir())) == 1
    del result
    gc.collect()
    assert list(scratch.iterdir()) == []
    with pytest.raises(UserInputError):
        distill("factories:teacher", None, [DOCS], DistillConfig(layers=(5,)))
    assert list(scratch.iterdir()) == []


def test_sigterm_while_the_teacher_loads_leaves_no_temporary_directory(teacher_dir, tmp_path):
    (tmp_path / "factories.py").write_text(FACTORY.format(teacher=str(teacher_dir)))
    (tmp_path / "runs").mkdir()
    child = subprocess.Popen([sys.executable, "-m", "inferforge", "distill", "factories:slow_teacher", "--layers", "0",
                              "--data", str(DOCS), "-q", "--output", str(tmp_path / "runs" / "student")],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "loading").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(p.name.startswith(".distill-teacher-") for p in (tmp_path / "runs").iterdir())
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert err.strip().startswith("error: interrupted (SIGTERM) outside training") and "\n" not in err.strip()
    assert list((tmp_path / "runs").iterdir()) == []
