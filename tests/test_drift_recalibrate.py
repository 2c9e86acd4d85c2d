"""`inferforge drift --recalibrate`: the child artifact of a drifted demo model (gated on the old and the
new distribution, registered, promoted, lineage), a planted failing gate that keeps the alias, no
drift, bad inputs, the recipe's extra data, and the example CI workflow.

The demo-based tests share the session's demo job and run two recalibrations in all (~2 min each
on 2 cores): one that passes, one with an impossible gate."""

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from inferforge.data import read_sentences
from inferforge.errors import UserInputError
from inferforge.recipe import DataConfig
from tests.registry_helpers import make_artifact

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
RESULTS = {}   # measured numbers, printed at the end of the success test (README)


def run_cli_env(env: dict, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "inferforge", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def _registry_with_demo(root: Path, demo: Path):
    from inferforge.registry import Registry

    registry = Registry(root)
    registry.add(demo, "demo", alias="prod")
    return registry


# ----------------------------------------------------------------------------------------------
# Cheap: bad input, the data config, the workflow


def _exit_2(proc, words):
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_promote_needs_a_registry_reference_or_name(tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(f"query {i}" for i in range(40)))
    art = make_artifact(tmp_path / "art", "x", kind="sentence-encoder")
    proc = run_cli_env({}, "drift", art, "--data", texts, "--recalibrate", "--promote", "prod")
    _exit_2(proc, "give the artifact as NAME@ALIAS or add --name NAME")
    _exit_2(run_cli_env({}, "drift", art, "--data", texts, "--promote", "prod"), "add --recalibrate")


def test_an_artifact_without_a_recipe_cannot_be_recalibrated(tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(f"query {i}" for i in range(40)))
    parent = make_artifact(tmp_path / "export", "fp32", kind="sentence-encoder")
    child = make_artifact(tmp_path / "int8", "int8", kind="sentence-encoder", parent=parent)   # as quantize --onnx
    for art, how in ((parent, "a command without a recipe"), (child, "quantize --onnx")):
        proc = run_cli_env({}, "drift", art, "--data", texts, "--recalibrate", "--name", "enc")
        _exit_2(proc, "needs an artifact of a recipe run")
        assert how in proc.stderr
    _exit_2(run_cli_env({}, "drift", parent, "--data", tmp_path / "t.jsonl", "--recalibrate"), "reads .txt files")


def test_extra_data_in_the_recipe_is_validated(tmp_path):
    with pytest.raises(ValueError, match="need extra_sentences"):
        DataConfig(extra_calibration_size=10)
    with pytest.raises(ValueError, match="extra_held_out_size must be >= 1"):
        DataConfig(extra_sentences="new.txt", extra_calibration_size=10)
    from inferforge.recipe import builtin_recipe_path, load_recipe

    recipe = load_recipe(builtin_recipe_path("demo"))
    assert "extra_sentences" not in recipe.to_dict()["data"]   # ordinary manifests keep their shape


def test_extra_split_is_disjoint_and_held_out_as_its_own_bucket():
    from inferforge.data import SentenceSplit, split_extra, with_extra_held_out

    old = SentenceSplit(("a b", "c d"), ("e f",), ("ordinary",))
    cal, held = split_extra(str(DATA / "support_queries.txt"), 5, 4, exclude=old.calibration + old.held_out)
    assert len(cal) == 5 and len(held) == 4 and not set(cal) & set(held)
    mixed = with_extra_held_out(SentenceSplit(old.calibration + cal, old.held_out, old.held_out_buckets), held)
    assert mixed.buckets() == {"ordinary": [0], "extra": [1, 2, 3, 4]}
    with pytest.raises(UserInputError, match="distinct new texts"):
        split_extra(str(DATA / "support_queries.txt"), 200, 100)


def test_example_workflow_runs_a_command_the_cli_accepts():
    from inferforge.cli import build_parser

    workflow = yaml.safe_load((ROOT / "examples" / "drift-ci.yml").read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]   # YAML 1.1 reads `on` as true
    assert "schedule" in triggers and "workflow_dispatch" in triggers
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    runs = [s["run"] for s in steps if "inferforge drift" in s.get("run", "")]
    assert len(runs) == 1
    argv = shlex.split(runs[0])
    assert argv[0] == "inferforge"
    args = build_parser().parse_args(argv[1:])
    assert args.recalibrate and args.promote == "prod" and args.artifact.endswith("@prod")
    assert args.data == "traffic.txt" and args.output
    uploads = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["if"] == "always()" and args.output in uploads[0]["with"]["path"]
    assert not any(s.get("continue-on-error") for s in steps)   # exit 1 and 2 fail the job
    # A self-hosted runner with a persistent registry (a hosted one has none, and noisy latency), and the
    # traffic sample fetched before the drift step.
    job = workflow["jobs"]["drift"]
    assert "self-hosted" in job["runs-on"] and "ubuntu-latest" not in job["runs-on"]
    assert job["env"]["INFERFORGE_REGISTRY"].startswith("/") and "tmp" not in job["env"]["INFERFORGE_REGISTRY"]
    names = [s.get("name", "") for s in steps]
    fetch = names.index("Fetch the traffic sample")
    assert "traffic.txt" in steps[fetch]["run"] and fetch < names.index("Drift check and recalibration")


# ----------------------------------------------------------------------------------------------
# The demo artifact (slow: the shared demo job, plus one recalibration per test)


def test_no_drift_changes_nothing(demo_run, tmp_path):
    out, _, _ = demo_run
    registry = _registry_with_demo(tmp_path / "registry", out)
    fortunes = tmp_path / "fortunes.txt"
    fortunes.write_text("\n".join(read_sentences("demo")[160:360]) + "\n")
    proc = run_cli_env({"INFERFORGE_REGISTRY": str(tmp_path / "registry")}, "drift", "demo@prod", "--data", fortunes,
                       "--recalibrate", "--promote", "prod", "--artifact-output", tmp_path / "child", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["drift"] and report["recalibration"]["ran"] is False
    assert not (tmp_path / "child").exists() and not (tmp_path / "child.failed").exists()
    assert [v.version for v in registry.list("demo")] == [1] and registry.resolve("demo@prod").version == 1


def test_recalibration_passes_on_both_distributions_registers_and_promotes(demo_run, tmp_path):
    out, _, _ = demo_run
    parent = json.loads((out / "manifest.json").read_text())
    registry = _registry_with_demo(tmp_path / "registry", out)
    child = tmp_path / "child"
    started = time.perf_counter()
    proc = run_cli_env({"INFERFORGE_REGISTRY": str(tmp_path / "registry")}, "drift", "demo@prod", "--data",
                       DATA / "support_queries.txt", "--recalibrate", "--promote", "prod", "--artifact-output", child,
                       "--output", tmp_path / "report", "--json")
    wall = time.perf_counter() - started
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "recalibrating (drift)" in proc.stderr   # progress on stderr
    summary = json.loads(proc.stdout)
    assert summary["drift"] and summary["recalibration"]["passed"] and summary["recalibration"]["promoted"] == "prod"
    assert (tmp_path / "report" / "drift_report.json").is_file()

    manifest = json.loads((child / "manifest.json").read_text())
    # The gate holds on each held-out bucket: the old distribution (exactly the parent's held-out set) and the new.
    gates = {c["bucket"]: c for c in manifest["checks"] if c["name"].startswith("min cosine")}
    assert set(gates) == {"short", "ordinary", "long", "extra"} and all(c["passed"] for c in manifest["checks"])
    assert any(c["kind"] == "target" for c in manifest["checks"]) and manifest["benchmark"]
    assert manifest["data"]["held_out_sha256"] != parent["data"]["held_out_sha256"]
    assert manifest["data"]["extra_held_out_sentences"] >= 90 and manifest["data"]["extra_calibration_sentences"] >= 90
    # Provenance: the parent (lineage walks it), the mix, both data hashes, the drift report in the artifact.
    prov = manifest["provenance"]
    assert prov["parent"]["version"] == parent["version"] and prov["parent"]["name"] == parent["name"]
    assert prov["parent"]["manifest_sha256"] and prov["parent"]["path"]
    recal = prov["recalibration"]
    assert recal["trigger"] == "drift" and recal["drifted"] and "half" in recal["mix"]
    assert recal["parent_data"] == parent["data"] and len(recal["new_data"]["file_sha256"]) == 64
    assert "drift_report.json" in manifest["files"]
    assert json.loads((child / "drift_report.json").read_text())["drift"]
    assert manifest["recipe"]["data"]["extra_sentences"].endswith("support_queries.txt")

    from inferforge.registry import Registry

    registry = Registry(tmp_path / "registry")
    promoted = registry.resolve("demo@prod")
    assert promoted.version == 2 and promoted.content == manifest["version"]
    tree = registry.lineage("demo@prod")
    assert tree["content"] == manifest["version"] and tree["parent"]["content"] == parent["version"]
    assert tree["parent"]["registered"] == ["demo@1"] and tree["parent"]["parent"] is None
    assert any(k.endswith("new_data.texts_sha256") for k in tree["data"])

    # The new traffic no longer drifts as much against the child's snapshot (its calibration holds it).
    RESULTS.update(wall_s=round(wall, 1), run_s=round(summary["recalibration"]["duration_s"], 1),
                   gates={b: round(c["measured"], 4) for b, c in gates.items()},
                   parent_gates={c["bucket"]: round(c["measured"], 4) for c in parent["checks"]
                                 if c["name"].startswith("min cosine")})
    print("recalibration measured:", json.dumps(RESULTS))


def test_a_missed_gate_keeps_the_alias_and_registers_nothing(demo_run, tmp_path):
    out, _, _ = demo_run
    registry = _registry_with_demo(tmp_path / "registry", out)
    child = tmp_path / "child"
    proc = run_cli_env({"INFERFORGE_REGISTRY": str(tmp_path / "registry")}, "drift", "demo@prod", "--data",
                       DATA / "support_queries.txt", "--recalibrate", "--promote", "prod", "--artifact-output", child,
                       "--min-cosine", "1.0")
    assert proc.returncode == 1, proc.stderr
    assert "FAILED" in proc.stderr and "demo@prod is unchanged" in proc.stderr
    assert not child.exists()
    failed = child.parent / "child.failed"
    report = json.loads((failed / "report.json").read_text())
    assert not report["passed"] and (failed / "drift_report.json").is_file()
    assert any(c["bucket"] == "extra" and not c["passed"] for c in report["checks"])
    assert report["skipped_steps"] == ["bench"]
    assert [v.version for v in registry.list("demo")] == [1] and registry.resolve("demo@prod").version == 1


def test_the_mix_takes_half_of_the_new_texts_and_needs_enough_of_them():
    from inferforge.drift_recalibrate import mix_sizes
    from inferforge.recipe import builtin_recipe_path, load_recipe

    recipe = load_recipe(builtin_recipe_path("demo"))
    queries = (DATA / "support_queries.txt").read_text().splitlines()
    assert mix_sizes(recipe, queries) == (102, 101)
    with pytest.raises(UserInputError, match="at least 20 distinct new texts"):
        mix_sizes(recipe, read_sentences("demo")[160:480])   # the recipe's own held-out set is not new


# ----------------------------------------------------------------------------------------------
# Fast: recalibrate with the drift check and the recipe run faked (no model is run)


class _FakeReport:
    def __init__(self, drift=True):
        self.drift = drift

    def to_dict(self):
        drifted = [{"what": "length_tokens", "reason": "PSI 0.500 >= 0.2"}] if self.drift else []
        return {"drift": self.drift, "drifted": drifted}


def _recipe_artifact(tmp_path: Path) -> Path:
    from inferforge.recipe import builtin_recipe_path, load_recipe

    recipe = load_recipe(builtin_recipe_path("demo"))
    return make_artifact(tmp_path / "parent", "parent", name="demo", kind="sentence-encoder",
                         extra={"recipe": recipe.to_dict()})


def _no_work(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("recalibrate did work before validating its input")

    monkeypatch.setattr("inferforge.pipeline.run_recipe", fail)
    monkeypatch.setattr("inferforge.optimize.drift.check_drift", fail)


def test_a_bad_name_or_an_unwritable_registry_is_refused_before_any_work(tmp_path, monkeypatch):
    from inferforge.drift_recalibrate import recalibrate

    _no_work(monkeypatch)
    art = _recipe_artifact(tmp_path)
    texts = DATA / "support_queries.txt"
    monkeypatch.setenv("INFERFORGE_REGISTRY", str(tmp_path / "registry"))
    for bad in ("bad name", "a@b", "-x", "runs/enc"):
        with pytest.raises(UserInputError, match="--name"):
            recalibrate(str(art), texts, name=bad, force=True)
    with pytest.raises(UserInputError, match="alias"):
        recalibrate(str(art), texts, name="enc", promote="1bad", force=True)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("INFERFORGE_REGISTRY", str(blocker / "registry"))
    with pytest.raises(UserInputError, match="cannot write there"):
        recalibrate(str(art), texts, name="enc", promote="prod", force=True)
    assert not (blocker.parent / "registry").exists()
    # The command: exit 2 with the reason, in well under the minutes a recipe run takes.
    started = time.perf_counter()
    proc = run_cli_env({"INFERFORGE_REGISTRY": str(blocker / "registry")}, "drift", art, "--data", texts,
                       "--recalibrate", "--name", "enc", "--force")
    _exit_2(proc, "cannot write there")
    _exit_2(run_cli_env({"INFERFORGE_REGISTRY": str(tmp_path / "ok")}, "drift", art, "--data", texts,
                        "--recalibrate", "--name", "bad name", "--force"), "not a model name")
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "ok").exists()


def _fake_run(calls: list, passed: bool):
    from inferforge.pipeline import RunResult
    from tests.registry_helpers import gate_check

    def run_recipe(recipe, progress=None, provenance=None, files=None):
        calls.append((recipe, provenance, files))
        out = Path(recipe.output)
        if passed:
            make_artifact(out, "child", name="demo", kind="sentence-encoder", extra={"provenance": provenance, "recipe": recipe.to_dict()})
            return RunResult(output=out, report={"checks": [gate_check()]}, passed=True)
        failed = out.parent / (out.name + ".failed")
        failed.mkdir()
        return RunResult(output=out, report={"checks": [gate_check(measured=0.5)]}, passed=False,
                         failure_report=failed)

    return run_recipe


@pytest.mark.parametrize("how", ["failed result", "GateFailed"])
def test_a_failed_run_registers_nothing_and_keeps_the_alias(tmp_path, monkeypatch, how):
    from inferforge.drift_recalibrate import recalibrate
    from inferforge.errors import GateFailed
    from inferforge.registry import Registry

    monkeypatch.setenv("INFERFORGE_REGISTRY", str(tmp_path / "registry"))
    registry = Registry(tmp_path / "registry")
    registry.add(_recipe_artifact(tmp_path), "demo", alias="prod")
    calls = []
    monkeypatch.setattr("inferforge.optimize.drift.check_drift", lambda *a, **k: _FakeReport())
    if how == "GateFailed":
        def run_recipe(recipe, **kwargs):
            calls.append(recipe)
            raise GateFailed("min cosine missed", report_dir=str(tmp_path / "child.failed"))
        monkeypatch.setattr("inferforge.pipeline.run_recipe", run_recipe)
    else:
        monkeypatch.setattr("inferforge.pipeline.run_recipe", _fake_run(calls, passed=False))
    with pytest.raises(GateFailed) as err:
        recalibrate("demo@prod", DATA / "support_queries.txt", promote="prod", output=tmp_path / "child")
    assert len(calls) == 1
    if how == "failed result":
        assert "nothing registered" in str(err.value) and "demo@prod is unchanged" in str(err.value)
    assert [v.version for v in registry.list("demo")] == [1] and registry.resolve("demo@prod").version == 1


def test_a_passing_run_is_registered_and_promoted(tmp_path, monkeypatch):
    from inferforge.drift_recalibrate import recalibrate
    from inferforge.registry import Registry

    monkeypatch.setenv("INFERFORGE_REGISTRY", str(tmp_path / "registry"))
    registry = Registry(tmp_path / "registry")
    parent = registry.add(_recipe_artifact(tmp_path), "demo", alias="prod")
    calls = []
    monkeypatch.setattr("inferforge.optimize.drift.check_drift", lambda *a, **k: _FakeReport())
    monkeypatch.setattr("inferforge.pipeline.run_recipe", _fake_run(calls, passed=True))
    outcome = recalibrate("demo@prod", DATA / "support_queries.txt", promote="prod", output=tmp_path / "child")
    assert outcome.ran and outcome.trigger == "drift" and outcome.promoted == "prod"
    recipe, provenance, files = calls[0]
    assert recipe.data.extra_sentences.endswith("support_queries.txt") and recipe.data.extra_held_out_size > 0
    assert provenance["parent"]["version"] == parent.content and "drift_report.json" in files
    assert [v.version for v in registry.list("demo")] == [1, 2] and registry.resolve("demo@prod").version == 2
    # No drift and no --force: nothing runs, nothing changes.
    monkeypatch.setattr("inferforge.optimize.drift.check_drift", lambda *a, **k: _FakeReport(drift=False))
    assert not recalibrate("demo@prod", DATA / "support_queries.txt", promote="prod").ran
    assert len(calls) == 1 and registry.resolve("demo@prod").version == 2


def test_the_rebuilt_recipe_holds_out_new_texts_it_never_calibrates_on(tmp_path):
    from inferforge.drift_recalibrate import mix_sizes, recalibration_recipe
    from inferforge.pipeline import recipe_sentences
    from inferforge.recipe import builtin_recipe_path, load_recipe

    recipe = load_recipe(builtin_recipe_path("demo"))
    data = DATA / "support_queries.txt"
    new_calibration, new_held_out = mix_sizes(recipe, data.read_text().splitlines())
    rebuilt = recalibration_recipe(recipe, data, new_calibration, new_held_out, tmp_path / "child")
    old, _, _ = recipe_sentences(recipe.data)
    split, extra_calibration, extra_held_out = recipe_sentences(rebuilt.data)
    assert len(extra_held_out) == new_held_out > 0 and len(extra_calibration) == new_calibration > 0
    assert not set(extra_held_out) & set(split.calibration)          # never calibrated on
    assert not set(extra_held_out) & set(old.held_out)                # new, not the old held-out set
    assert set(extra_held_out) <= set(read_sentences(str(data)))
    assert split.held_out == old.held_out                            # the old distribution's gate set is kept
    assert split.calibration[:len(old.calibration)] == old.calibration
