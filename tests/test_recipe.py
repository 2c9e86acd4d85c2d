import dataclasses
import textwrap
from pathlib import Path

import pytest

from inferforge.cli import main
from inferforge.errors import RecipeError
from inferforge.recipe import (
    BenchConfig,
    ExportConfig,
    QuantizeConfig,
    builtin_recipe_path,
    load_recipe,
    parse_recipe,
    recipe_from_dict,
)

GOOD = textwrap.dedent("""\
    name: test
    model: all-MiniLM-L6-v2
    steps:
      - export: {opset: 17}
      - quantize: {per_channel: true}
      - validate
      - bench: {batch_sizes: [1, 8]}
    gates: {min_cosine: 0.99}
    targets:
      latency: [{batch_size: 8, max_ms: 100}]
""")


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path, text) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    return str(info.value)


def test_good_recipe_fills_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert [type(s) for s in recipe.steps] == [ExportConfig, QuantizeConfig, type(recipe.steps[2]), BenchConfig]
    assert recipe.step(QuantizeConfig).smoothquant_alpha == "auto"
    assert recipe.targets.latency[0].percentile == "p95"
    assert str(recipe.output_dir) == "runs/test"


def test_normalized_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    again = recipe_from_dict(recipe.to_dict())
    assert again == dataclasses.replace(recipe, output=str(recipe.output_dir))


def test_builtin_demo_recipe_validates():
    recipe = load_recipe(builtin_recipe_path("demo"))
    assert recipe.model == "all-MiniLM-L6-v2" and recipe.gates.min_cosine == 0.965 and recipe.gates.mean_cosine == 0.98


def test_unknown_top_level_key_suggests_and_gives_line(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("gates:", "gatse:"))
    assert "line 8" in msg and "unknown key 'gatse'" in msg and "did you mean 'gates'" in msg


def test_unknown_step_setting_suggests(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("per_channel", "per_chanel"))
    assert "line 5" in msg and "steps[1].quantize.per_chanel" in msg and "did you mean 'per_channel'" in msg


def test_unknown_step_name_suggests(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("- quantize:", "- quantise:"))
    assert "unknown key 'quantise'" in msg and "did you mean 'quantize'" in msg


def test_wrong_type_names_key_and_line(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("opset: 17", "opset: seventeen"))
    assert "line 4" in msg and "steps[0].export.opset" in msg and "expected integer" in msg


def test_bool_is_not_a_number(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("min_cosine: 0.99", "min_cosine: true"))
    assert "gates.min_cosine" in msg and "expected number" in msg


def test_bad_value_explains_range(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("min_cosine: 0.99", "min_cosine: 2"))
    assert "gates.min_cosine" in msg and "between -1 and 1" in msg


def test_missing_required_key(tmp_path):
    msg = error_of(tmp_path, "name: x\nmodel: all-MiniLM-L6-v2\n")
    assert "missing required key 'steps'" in msg


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    msg = error_of(tmp_path, "name: x\nsteps: [export\nmodel: y\n")
    assert "YAML syntax error" in msg and "line 3" in msg and "column" in msg


def test_missing_model_directory(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("model: all-MiniLM-L6-v2", "model: ./no-such-model"))
    assert "model" in msg and "is not a directory" in msg and "line 2" in msg


def test_model_directory_without_config(tmp_path):
    (tmp_path / "empty-model").mkdir()
    msg = error_of(tmp_path, GOOD.replace("model: all-MiniLM-L6-v2", "model: empty-model"))
    assert "has no config.json" in msg


def test_factory_that_does_not_exist(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("model: all-MiniLM-L6-v2", "model: no_such_module_xyz:make"))
    assert "cannot import module 'no_such_module_xyz'" in msg


def test_missing_sentence_file(tmp_path):
    msg = error_of(tmp_path, GOOD + "data: {sentences: missing.txt}\n")
    assert "data.sentences" in msg and "file not found" in msg


def test_relative_paths_resolve_against_the_recipe_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "text.txt").write_text("one\ntwo\n")
    recipe = load_recipe(write(tmp_path / "sub", GOOD + "data: {sentences: text.txt}\n"))
    assert recipe.data.sentences == str(tmp_path / "sub" / "text.txt")


def test_target_batch_size_must_be_benchmarked(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("batch_size: 8, max_ms", "batch_size: 4, max_ms"))
    assert "batch_size 4" in msg and "does not measure" in msg


def test_first_step_must_be_export(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("  - export: {opset: 17}\n", ""))
    assert "first step must be 'export'" in msg


def test_step_may_not_repeat(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("  - validate\n", "  - validate\n  - validate\n"))
    assert "each step may appear once" in msg


def test_bad_alpha(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("per_channel: true", "smoothquant_alpha: high"))
    assert "smoothquant_alpha" in msg and "'auto' or 'off'" in msg


def test_not_a_mapping():
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        parse_recipe("- just\n- a list\n")


@pytest.mark.parametrize("text, fragment", [
    ("name: x\nmodle: y\nsteps: [export]\n", "did you mean 'model'"),
    ("name: x\nsteps: [export\n", "YAML syntax error"),
])
def test_cli_bad_recipe_exits_2_without_traceback(tmp_path, capsys, text, fragment):
    code = main(["optimize", str(write(tmp_path, text))])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err and "Traceback" not in err


def test_cli_missing_recipe_file(tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_relative_output_is_relative_to_the_recipe_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    recipe = load_recipe(write(tmp_path / "recipes", GOOD + "output: ../runs/x\n"))
    assert recipe.output_dir == tmp_path / "runs" / "x" and recipe.name == "test"
    assert load_recipe(write(tmp_path, GOOD + "output: /abs/out\n")).output_dir == Path("/abs/out")
    assert load_recipe(write(tmp_path / "recipes", GOOD)).output_dir == Path("runs/test")   # no output: runs/NAME here
    # The built-in demo writes runs/minilm-int8 in the working directory, not inside the package.
    demo = load_recipe(builtin_recipe_path("demo"), output_relative_to_recipe=False)
    assert demo.output_dir == Path("runs/minilm-int8")


def test_recipe_keeps_the_model_as_written(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    recipe = load_recipe(write(tmp_path, GOOD.replace("all-MiniLM-L6-v2", "./m")), check_paths=False)
    assert recipe.model == str(tmp_path / "m") and recipe.model_as_written == "./m"
    assert "model_as_written" not in recipe.to_dict()
    msg = error_of(tmp_path, GOOD + "model_as_written: x\n")       # not a recipe key
    assert "unknown key 'model_as_written'" in msg


def test_optimize_without_a_recipe_writes_the_demo_in_the_working_directory(tmp_path, monkeypatch):
    from inferforge import pipeline

    seen = []

    def capture(recipe, progress=None):
        seen.append(recipe)
        raise KeyboardInterrupt   # stop before any work

    monkeypatch.setattr(pipeline, "run_recipe", capture)
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", "-q"]) == 130
    assert seen[0].output_dir == Path("runs/minilm-int8")                  # not inside the installed package
    (tmp_path / "sub").mkdir()
    recipe = write(tmp_path / "sub", GOOD + "output: out\n")
    assert main(["optimize", str(recipe), "-q"]) == 130
    assert seen[1].output_dir == tmp_path / "sub" / "out"
