"""`inferforge distill`: more bad inputs, each refused in one line before training."""

import json

import pytest

from inferforge.cli import main
from inferforge.optimize.distill_data import resolve_max_length
from inferforge.optimize.distill_student import load_teacher
from tests.distill_helpers import DOCS, save_tiny_bert

FAST = ["--steps", "2", "--batch-size", "8", "--max-length", "24", "-q"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("teacher") / "bert", layers=2)   # 64 positions


def _one_line_error(capsys, teacher_dir, tmp_path, *extra) -> str:
    argv = ["distill", str(teacher_dir), *FAST, *extra, "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err and "usage:" not in captured.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()
    return err


def test_max_length_beyond_the_teachers_positions_is_refused(teacher_dir, tmp_path, capsys):
    err = _one_line_error(capsys, teacher_dir, tmp_path, "--layers", "0", "--data", str(DOCS), "--max-length", "65")
    assert "--max-length 65: the teacher takes at most 64 tokens (max_position_embeddings)" in err
    # Without --max-length: the tokenizer allows 512, the position embeddings 64.
    teacher = load_teacher(teacher_dir)
    assert teacher.tokenizer.model_max_length >= 512
    assert resolve_max_length(None, teacher_dir, teacher.config) == 64
    assert resolve_max_length(64, teacher_dir, teacher.config) == 64


def test_student_weights_that_do_not_match_its_config_are_named(teacher_dir, tmp_path, capsys):
    student = save_tiny_bert(tmp_path / "student", layers=1)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    err = _one_line_error(capsys, teacher_dir, tmp_path, "--student-config", str(student), "--data", str(DOCS))
    assert "model.safetensors does not match its config.json" in err
    assert "encoder.layer.0.intermediate.dense.bias has shape [64], the config gives [48]" in err


def test_a_student_config_deeper_than_the_teacher_names_the_flag_given(teacher_dir, tmp_path, capsys):
    student = tmp_path / "deep"
    student.mkdir()
    config = json.loads((teacher_dir / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    err = _one_line_error(capsys, teacher_dir, tmp_path, "--student-config", str(student), "--data", str(DOCS))
    assert f"--student-config {student}: num_hidden_layers 6, but the teacher has 2 layers" in err
    assert "--num-layers" not in err


@pytest.mark.parametrize("layers", ["-1,1", "-1", "0,-1"])
def test_negative_layers_are_out_of_range_not_an_unknown_option(teacher_dir, tmp_path, capsys, layers):
    err = _one_line_error(capsys, teacher_dir, tmp_path, "--layers", layers, "--data", str(DOCS))
    assert f"--layers {layers}: layer -1 is out of range: teacher layers are counted from 0" in err


def test_data_must_be_a_txt_or_jsonl_file(teacher_dir, tmp_path, capsys):
    yaml = tmp_path / "texts.yaml"
    yaml.write_text("- a text\n- another text\n")
    err = _one_line_error(capsys, teacher_dir, tmp_path, "--layers", "0", "--data", str(yaml))
    assert f"--data {yaml}: a file '.yaml' is not read; give a .txt file" in err and ".jsonl" in err
    err = _one_line_error(capsys, teacher_dir, tmp_path, "--layers", "0", "--data", str(tmp_path))
    assert f"--data {tmp_path}: is a directory" in err


def test_recipe_distill_data_must_be_txt_or_jsonl(tmp_path):
    from inferforge.errors import RecipeError
    from inferforge.recipe import parse_recipe

    (tmp_path / "d.csv").write_text("a text\n")
    with pytest.raises(RecipeError, match=r"steps\[0\]\.distill\.data\[0\]: .*d\.csv: not a \.txt or \.jsonl file"):
        parse_recipe("model: all-MiniLM-L6-v2\nsteps:\n  - distill: {data: [d.csv], layers: [0]}\n  - export\n",
                     base_dir=tmp_path)
