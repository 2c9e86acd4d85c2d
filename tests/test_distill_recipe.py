"""The `distill` recipe step: validation of the recipe, and a run whose later steps work on the student
and are gated against the teacher."""

import json
from pathlib import Path

import pytest

from inferforge.errors import RecipeError, UserInputError
from inferforge.recipe import DistillStepConfig, ExportConfig, parse_recipe
from tests.distill_helpers import DOCS, save_tiny_bert

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "distill-minilm.yaml"


def _recipe(tmp_path, steps: str, **kw):
    return parse_recipe(f"model: all-MiniLM-L6-v2\nsteps:\n{steps}", base_dir=tmp_path, **kw)


def test_the_example_recipe_validates_and_resolves_its_data_files():
    from inferforge.recipe import load_recipe

    recipe = load_recipe(EXAMPLE)
    distill = recipe.steps[0]
    assert isinstance(distill, DistillStepConfig) and isinstance(recipe.steps[1], ExportConfig)
    assert distill.layers == (0, 4, 5) and all(Path(p).is_file() for p in distill.data)
    config = distill.distill_config()
    assert config.layers == (0, 4, 5) and (config.hidden_loss, config.hidden_layers) == ("cosine", "last")
    assert recipe.to_dict()["steps"][0]["distill"]["layers"] == [0, 4, 5]


@pytest.mark.parametrize("steps, message", [
    ("  - distill: {data: [d.txt], layers: [0]}\n  - validate\n", "'distill' followed by 'export'"),
    ("  - export\n  - distill: {data: [d.txt], layers: [0]}\n", "distill must be the first step"),
    ("  - distill: {data: [d.txt]}\n  - export\n", "layers (a list or 'every-other'), num_layers or student"),
    ("  - distill: {data: [d.txt], layers: [2, 1]}\n  - export\n", "steps[0].distill.layers: layers must be in "
                                                                   "increasing order"),
    ("  - distill: {data: [d.txt], layers: [0], stepz: 3}\n  - export\n", "did you mean 'steps'"),
    ("  - distill: {data: [missing.txt], layers: [0]}\n  - export\n", "steps[0].distill.data[0]: file not found"),
    ("  - export\n  - bench: {compare_teacher: true}\n", "compare_teacher needs a distill step"),
])
def test_bad_distill_steps_are_refused_before_any_work(tmp_path, steps, message):
    (tmp_path / "d.txt").write_text("a text\n")
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        _recipe(tmp_path, steps)


@pytest.mark.slow
def test_recipe_distils_then_exports_and_validates_the_student_against_the_teacher(tmp_path):
    from inferforge.pipeline import run_recipe

    teacher = save_tiny_bert(tmp_path / "teacher", layers=2)
    recipe_text = f"""
model: {teacher}
data: {{sentences: {DOCS}, calibration_size: 40, held_out_size: 60}}
steps:
  - distill: {{data: [{DOCS}], layers: [1], steps: 4, batch_size: 8, max_length: 32, min_mean_cosine: 0.5}}
  - export
  - validate
  - bench: {{batch_sizes: [2], seq_len: 16, warmup: 1, iterations: 3, providers: [onnx-fp32]}}
gates: {{min_cosine: 0.5}}
output: {tmp_path / "out"}
"""
    result = run_recipe(parse_recipe(recipe_text))
    assert result.passed, result.report["checks"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["distill", "export", "validate", "bench"]
    distill = manifest["steps"][0]["result"]
    # The recipe's held-out sentences were removed from the training text, so validation is on unseen text.
    assert distill["data"]["excluded_texts"] == 60 and distill["student"]["layer_map"] == [1]
    assert manifest["source"]["model"] == str(teacher)   # the teacher stays the source the student is gated against
    assert manifest["validation"]["sentences"] > 0
    # The export was checked against the student (a 1-layer model), the validation against the teacher.
    assert manifest["steps"][1]["result"]["max_abs_diff"] < 1e-3
    assert manifest["validation"]["mean_cosine"] < 0.99999
    # validate also compares the exported student with the teacher on the distill step's own held-out split,
    # under the distill step's gate: the same texts and numbers as the distill step's evaluation.
    distilled = manifest["validation"]["distillation_held_out"]
    assert distilled["sentences"] == distill["data"]["held_out_texts"]
    assert distilled["sha256"] == distill["data"]["held_out_sha256"]
    assert distilled["mean_cosine"] == pytest.approx(distill["metrics"]["mean_cosine"], abs=1e-4)
    assert distilled["gate"] == {"min_mean_cosine": 0.5, "min_cosine": None}
    check = next(c for c in manifest["checks"] if c["name"] == "mean cosine (the distillation's held-out split)")
    assert check["passed"] and check["limit"] == 0.5 and check["measured"] == distilled["mean_cosine"]
    assert "the distillation's own held-out split" in (report_md := (tmp_path / "out" / "report.md").read_text())
    assert "the distill step's gate applies to it" in report_md
    assert (tmp_path / "out.checkpoints" / "latest.json").is_file()
    # After a distill step the bench times the teacher's fp32 ONNX too, and every row's speed-up over it.
    rows = {r["provider"]: r for r in manifest["benchmark"]["results"]}
    assert sorted(rows) == ["onnx-fp32", "teacher-onnx-fp32"]
    assert rows["teacher-onnx-fp32"]["speedup_vs_teacher_onnx_fp32"] == pytest.approx(1.0)
    student = rows["onnx-fp32"]
    assert student["speedup_vs_teacher_onnx_fp32"] == pytest.approx(rows["teacher-onnx-fp32"]["p50_ms"]
                                                                    / student["p50_ms"])
    assert "vs the teacher's onnx-fp32" in (tmp_path / "out" / "report.md").read_text()
    # The training curve and the teacher as the student's parent travel with the artifact.
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4] and rows[-1]["final"]
    assert (tmp_path / "out" / "loss_curve.svg").read_text().startswith("<svg")
    assert {"metrics.jsonl", "loss_curve.svg"} <= set(manifest["files"])
    parent = manifest["lineage"]["parent"]
    assert parent["role"] == "teacher" and parent["weights_sha256"] == manifest["source"]["weights_sha256"]
    # A re-run continues the checkpoints; with a changed setting it is refused naming it (no --resume flag in
    # a recipe, so the message does not name one).
    changed = parse_recipe(recipe_text.replace("steps: 4,", "steps: 5, lr: 0.001,"))
    with pytest.raises(UserInputError, match=r"^the checkpoint in .* \(changed: lr 0.0003 -> 0.001\)"):
        run_recipe(changed)


def test_a_student_that_misses_the_distill_gate_leaves_its_training_log_in_the_failed_report(tmp_path):
    """The distill step's own gate missed: no artifact, the later steps skipped, and OUT.failed/ holds the
    report with the student's metrics log and loss curve (not a crash on the extra files)."""
    result = _tiny_distill_run(tmp_path, min_mean_cosine=0.9999999, later_steps="  - export\n  - validate",
                               min_cosine=0.5)
    assert not result.passed and not (tmp_path / "out").exists()
    failed = tmp_path / "out.failed"
    assert sorted(p.name for p in failed.iterdir()) == ["loss_curve.svg", "metrics.jsonl", "report.json", "report.md"]
    assert "mean cosine to the teacher" in (failed / "report.md").read_text()
    rows = [json.loads(line) for line in (failed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def test_the_distill_gate_also_gates_the_final_model_on_the_distillation_held_out_split():
    """check_results: a validation that carries the distill step's held-out split gets that step's limits as
    gates, passed or missed on the final model's numbers, next to the per-bucket gates."""
    from inferforge.pipeline import check_results
    from inferforge.recipe import Gates, Targets

    bucket = {"min_cosine": 0.8, "mean_cosine": 0.95}
    validation = {"buckets": {"ordinary": bucket}, "distillation_held_out": {
        "sentences": 10, "min_cosine": 0.62, "mean_cosine": 0.929, "gate": {"min_mean_cosine": 0.93, "min_cosine": 0.6}}}
    checks = {c["name"]: c for c in check_results(Gates(min_cosine=0.5), Targets(), {"validation": validation},
                                                  "onnx-int8")}
    mean = checks["mean cosine (the distillation's held-out split)"]
    assert (mean["measured"], mean["limit"], mean["passed"]) == (0.929, 0.93, False)
    assert checks["min cosine (the distillation's held-out split)"]["passed"]
    assert checks["min cosine (held-out), ordinary"]["passed"]
    validation["distillation_held_out"]["gate"] = {"min_mean_cosine": None, "min_cosine": None}
    names = [c["name"] for c in check_results(Gates(min_cosine=0.5), Targets(), {"validation": validation}, "x")]
    assert names == ["min cosine (held-out), ordinary"]   # a distill step without a gate adds none


@pytest.mark.slow
def test_after_a_distill_step_quantize_scores_against_the_student_and_validate_gates_the_int8_model(tmp_path):
    """quantize chooses its settings by the int8 model's distance from the float32 student it quantizes
    (not from the teacher, which the student's own error dominates); validate then holds the int8 model
    to the distill gate on the distill step's held-out split."""
    result = _tiny_distill_run(tmp_path, min_mean_cosine=0.2, min_cosine=-1, later_steps=(
        "  - export\n  - quantize: {smoothquant_alpha: 0.5, smoothquant_scope: all}\n  - validate"))
    assert result.passed, result.report["checks"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    steps = {s["name"]: s["result"] for s in manifest["steps"]}
    quantize, distill = steps["quantize"], steps["distill"]
    assert quantize["scored_against"] == "the float32 student" and quantize["smoothquant_scope"] == "all"
    # int8 against its own float32 student is far closer than the student is to its teacher
    # int8 against its own float32 student is far closer than the student is to its teacher (scored against
    # the teacher, the candidates' scores would sit near the student's distance from it)
    assert 1 - quantize["calibration_mean_cosine"] < (1 - distill["metrics"]["mean_cosine"]) / 100
    distilled = manifest["validation"]["distillation_held_out"]
    assert distilled["gate"]["min_mean_cosine"] == 0.2
    assert abs(distilled["mean_cosine"] - distill["metrics"]["mean_cosine"]) < 0.05   # int8: close, not equal
    assert any(c["name"] == "mean cosine (the distillation's held-out split)" and c["passed"]
               for c in manifest["checks"])


def _tiny_distill_run(tmp_path, *, min_mean_cosine: float, later_steps: str, min_cosine: float):
    """run_recipe on a 2-layer tiny BERT teacher: a 2-step distill step (student: teacher layer 1) with
    the given gate, then `later_steps` (YAML list items, one per line)."""
    from inferforge.pipeline import run_recipe

    teacher = save_tiny_bert(tmp_path / "teacher", layers=2)
    return run_recipe(parse_recipe(f"""
model: {teacher}
data: {{sentences: {DOCS}, calibration_size: 40, held_out_size: 60}}
steps:
  - distill: {{data: [{DOCS}], layers: [1], steps: 2, batch_size: 8, max_length: 32, min_mean_cosine: {min_mean_cosine}}}
{later_steps}
gates: {{min_cosine: {min_cosine}}}
output: {tmp_path / "out"}
"""))
@pytest.mark.parametrize("after_distill", [True, False])
def test_quantize_scores_candidates_against_the_float32_student_after_a_distill_step(tmp_path, monkeypatch,
                                                                                      after_distill):
    """_quantize's score(): against ctx.model_reference (the student) when a distill step set it, else
    against ctx.reference. The teacher and the student embed orthogonally here, the int8 model as the student."""
    from types import SimpleNamespace

    import numpy as np

    from inferforge import pipeline
    from inferforge.optimize import onnx_quantize
    from inferforge.recipe import Gates, QuantizeConfig

    texts = ["a", "bb", "ccc"]
    teacher_vecs, student_vecs = np.tile([1.0, 0.0], (3, 1)), np.tile([0.0, 1.0], (3, 1))
    seen = {}

    def fake_quantize(fp32, out, *, score, smoothquant_scope, **kw):
        seen["score"], seen["scope"] = score(out), smoothquant_scope
        out.write_bytes(b"int8")
        return {"calibration_min_cosine": seen["score"][0], "calibration_mean_cosine": seen["score"][1],
                "smoothquant_alpha": 0.5, "excluded_nodes": []}

    monkeypatch.setattr(onnx_quantize, "quantize_onnx_int8", fake_quantize)
    monkeypatch.setattr(pipeline, "_block_slow_fusions", lambda ctx, path: None)
    class Teacher:
        def __call__(self, t, **kw):
            return teacher_vecs

        def tokenize(self, batch):
            return batch

    reference = Teacher()
    task = SimpleNamespace(advance=lambda: None, close=lambda: None)
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_bytes(b"fp32")
    ctx = SimpleNamespace(sentences=SimpleNamespace(calibration=texts), reference=reference,
                          model_reference=(lambda t, **kw: student_vecs) if after_distill else None,
                          encoder=lambda path: (lambda t, **kw: student_vecs), work=tmp_path, gates=Gates(),
                          progress=SimpleNamespace(task=lambda *a, **kw: task), fp32_onnx=fp32, graph_rewrites={})
    result = pipeline._quantize(ctx, QuantizeConfig(smoothquant_scope="all"))["result"]
    assert seen["scope"] == "all"
    assert seen["score"] == pytest.approx((1.0, 1.0) if after_distill else (0.0, 0.0))
    assert result["scored_against"] == ("the float32 student" if after_distill else "the source model")
