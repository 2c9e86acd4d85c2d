"""`inferforge distill`: the artifact, the gate, resuming, and one-line errors for bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

import inferforge
from inferforge.cli import main
from inferforge.fileio import sha256_file
from inferforge.models import weights_sha256
from tests.distill_helpers import DOCS, save_tiny_bert

FAST = ["--steps", "6", "--batch-size", "8", "--max-length", "24", "--eval-every", "3", "--save-every", "2", "-q"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("teacher") / "bert", layers=2)


def _distill(teacher_dir, out, *extra):
    return main(["distill", str(teacher_dir), "--data", str(DOCS), *FAST, "--output", str(out), *extra])


def test_distill_writes_a_student_artifact_that_loads_and_resumes_further(teacher_dir, tmp_path, capsys):
    out = tmp_path / "student"
    assert _distill(teacher_dir, out, "--layers", "1", "--min-mean-cosine", "0.5", "--json") == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["kind"] == "distilled-encoder" and manifest["passed"]
    assert manifest["source"]["weights_sha256"] == weights_sha256(teacher_dir)
    assert manifest["lineage"]["parent"]["role"] == "teacher"
    assert manifest["data"]["files"][0]["sha256"] == sha256_file(DOCS)
    assert manifest["data"]["held_out_texts"] == 30 and manifest["data"]["train_texts"] == 270
    assert manifest["distill"]["student"]["layer_map"] == [1] and manifest["distill"]["config"]["steps"] == 6
    assert manifest["checks"][0]["name"].startswith("mean cosine") and manifest["checks"][0]["passed"]
    metrics = manifest["metrics"]
    assert 0.5 <= metrics["min_cosine"] <= metrics["mean_cosine"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["final"] and rows[-1]["eval"] == metrics and rows[2]["eval"]["mean_cosine"] > 0
    assert (out / "loss_curve.svg").read_text().startswith("<svg")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1

    model = inferforge.load(out)   # a PyTorch sentence encoder over the student
    embedding = model(["a sentence about Python"])
    assert embedding.shape == (1, 32) and abs(float((embedding ** 2).sum()) - 1) < 1e-5
    assert model.manifest["runtime"]["provider"] == "pytorch-fp32"

    checkpoints = tmp_path / "student.checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 6
    # The same command with more steps and --resume extends the run.
    assert _distill(teacher_dir, out, "--layers", "1", "--steps", "8", "--resume") == 0
    assert inferforge.load(out).manifest["distill"]["step"] == 8


def test_a_missed_gate_writes_no_artifact_and_keeps_the_checkpoints(teacher_dir, tmp_path, capsys):
    out = tmp_path / "student"
    assert _distill(teacher_dir, out, "--layers", "0", "--min-cosine", "1.0") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("FAILED: missed: min cosine to the teacher (held-out): measured") and "\n" not in err
    assert "--resume" in err
    assert not out.exists() and (tmp_path / "student.failed" / "report.md").is_file()
    assert (tmp_path / "student.checkpoints" / "latest.json").is_file()
    # Starting over on top of those checkpoints without --resume is refused.
    assert _distill(teacher_dir, out, "--layers", "0") == 2
    assert "add --resume to continue it" in capsys.readouterr().err


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_give_one_line_errors(teacher_dir, tmp_path, capsys):
    base = ["distill", str(teacher_dir), *FAST]
    other_vocab = save_tiny_bert(tmp_path / "other", layers=1, vocab_size=1000)
    err = _one_line_error(capsys, [*base, "--student-config", str(other_vocab), "--data", str(DOCS), "-o",
                                   str(tmp_path / "a")])
    assert "vocab_size 1000 differs from the teacher's 30522" in err
    (tmp_path / "empty.txt").write_text("\n")
    err = _one_line_error(capsys, [*base, "--layers", "0", "--data", str(tmp_path / "empty.txt"), "-o",
                                   str(tmp_path / "b")])
    assert "empty.txt: no text (empty file)" in err
    err = _one_line_error(capsys, [*base, "--layers", "0,2", "--data", str(DOCS), "-o", str(tmp_path / "c")])
    assert "layer 2 is out of range: the teacher has 2 layers (0-1)" in err
    err = _one_line_error(capsys, [*base, "--layers", "0", "--resume", "--data", str(DOCS), "-o", str(tmp_path / "d")])
    assert "--resume: no checkpoint in" in err
    err = _one_line_error(capsys, [*base, "--layers", "0", "--min-top1-agreement", "0.9", "--data", str(DOCS), "-o",
                                   str(tmp_path / "e")])
    assert "--min-top1-agreement does not apply: this teacher is an encoder" in err
    err = _one_line_error(capsys, [*base, "--layers", "x", "--data", str(DOCS), "-o", str(tmp_path / "f")])
    assert "comma-separated teacher layer indices" in err
    err = _one_line_error(capsys, [*base, "--layers", "0", "--batch-size", "999", "--data", str(DOCS), "-o",
                                   str(tmp_path / "g")])
    assert "--batch-size 999 is larger than the 270 training texts" in err
    err = _one_line_error(capsys, [*base, "--layers", "0,1", "--freeze-layers", "x", "--data", str(DOCS), "-o",
                                   str(tmp_path / "h")])
    assert err.startswith("error: --freeze-layers 'x': give comma-separated layer indices") and "----" not in err
    err = _one_line_error(capsys, [*base, "--layers", "0,1", "--freeze-layers", "2", "--data", str(DOCS), "-o",
                                   str(tmp_path / "i")])
    assert "--freeze-layers: freeze_layers lists layer 2, out of range: the student has 2 layers (0-1)" in err
    err = _one_line_error(capsys, [*base, "--layers", "0,1", "--dropout", "1.5", "--data", str(DOCS), "-o",
                                   str(tmp_path / "j")])
    assert "--dropout: dropout must be in [0, 1)" in err
    assert not any(p.name.startswith(tuple("abcdefghij")) for p in tmp_path.iterdir() if p.name != "empty.txt")


def test_the_training_flags_reach_the_config():
    from inferforge.cli import build_parser
    from inferforge.distill_cli import config_from_args

    args = build_parser().parse_args(["distill", "t", "--layers", "0,3,5", "--data", "x.txt", "-o", "o",
                                      "--freeze-layers", "1,0", "--dropout", "0", "--length-mix", "--freeze-embeddings"])
    config = config_from_args(args)
    assert config.freeze_layers == (0, 1) and config.dropout == 0.0 and config.length_mix and config.freeze_embeddings
    plain = config_from_args(build_parser().parse_args(["distill", "t", "--layers", "0", "--data", "x.txt", "-o", "o"]))
    assert plain.freeze_layers == () and plain.dropout is None and not plain.length_mix


def test_narrower_student_trains_through_a_projection(teacher_dir, tmp_path, capsys):
    out = tmp_path / "narrow"
    assert _distill(teacher_dir, out, "--num-layers", "1", "--hidden-size", "16", "--json") == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["distill"]["student"]["hidden_size"] == 16
    weights = load_file(out / "model.safetensors")
    assert weights["embeddings.word_embeddings.weight"].shape == (30522, 16)
    assert not any("projection" in k for k in weights)   # the projection is a training aid, not the student
    assert torch.isfinite(torch.tensor(manifest["metrics"]["mean_cosine"]))


def test_early_stop_at_the_target_and_at_the_time_budget(teacher_dir, tmp_path, capsys):
    assert _distill(teacher_dir, tmp_path / "target", "--layers", "1", "--target-mean-cosine", "-1", "--json") == 0
    distill = json.loads(capsys.readouterr().out)["distill"]
    assert (distill["stopped"], distill["step"]) == ("target", 3)   # the first evaluation, at --eval-every 3
    assert _distill(teacher_dir, tmp_path / "time", "--layers", "1", "--max-minutes", "1e-6", "--json") == 0
    distill = json.loads(capsys.readouterr().out)["distill"]
    assert (distill["stopped"], distill["step"]) == ("time", 1)
    assert json.loads((tmp_path / "time.checkpoints" / "latest.json").read_text())["step"] == 1
    # A time-driven schedule: the budget is spent after step 1, so that step already ran at the decayed rate,
    # where the step-driven schedule is still warming up; the teacher's outputs came from the cache.
    assert _distill(teacher_dir, tmp_path / "timed", "--layers", "1", "--max-minutes", "1e-6", "--lr-schedule", "time",
                    "--steps", "100", "--cache-teacher", "--json") == 0
    timed = json.loads(capsys.readouterr().out)["distill"]
    assert (timed["stopped"], timed["step"]) == ("time", 1)
    rates = [json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["lr"] for name in ("time", "timed")]
    assert rates[1] < 0.01 * rates[0]
