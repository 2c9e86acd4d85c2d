"""`inferforge registry ...` through `inferforge.cli.main`: output, --json, exit codes and one-line errors."""

import importlib.util
import json

import pytest

from inferforge.cli import main
from inferforge.registry import Registry
from tests.registry_helpers import make_artifact, tamper


@pytest.fixture
def root(tmp_path, monkeypatch):
    root = tmp_path / "registry"
    monkeypatch.setenv("INFERFORGE_REGISTRY", str(root))
    return root


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv, code=2) -> str:
    got, _, err = run(capsys, *argv)
    assert got == code, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_add_alias_show_list_history(root, tmp_path, capsys):
    a, b = make_artifact(tmp_path / "a", "A", name="minilm"), make_artifact(tmp_path / "b", "B", name="minilm")
    code, out, _ = run(capsys, "registry", "add", a, "--name", "minilm", "--alias", "staging", "--owner", "alice")
    assert code == 0 and "registered as minilm@1" in out and "minilm@staging -> 1" in out
    code, out, _ = run(capsys, "registry", "add", a, "--name", "minilm")
    assert code == 0 and "already registered as minilm@1" in out
    code, out, _ = run(capsys, "registry", "add", b, "--name", "minilm", "--json")
    assert code == 0 and json.loads(out)["version"] == 2
    assert run(capsys, "registry", "alias", "minilm@2", "prod", "--owner", "bob")[0] == 0
    code, out, _ = run(capsys, "registry", "list", "--json")
    listed = json.loads(out)
    assert [(v["ref"], v["aliases"]) for v in listed] == [("minilm@1", ["staging"]), ("minilm@2", ["prod"])]
    code, out, _ = run(capsys, "registry", "show", "minilm@prod", "--json")
    shown = json.loads(out)
    assert shown["version"] == 2 and shown["manifest"]["name"] == "minilm" and shown["owner"] != ""
    code, out, _ = run(capsys, "registry", "show", "minilm@prod")
    assert code == 0 and out.startswith("minilm@2") and "gate min cosine: 0.995 >= 0.99 PASS" in out
    code, out, _ = run(capsys, "registry", "history", "minilm", "--json")
    assert [(e["alias"], e["to_version"], e["owner"]) for e in json.loads(out)] == [("staging", 1, "alice"),
                                                                                    ("prod", 2, "bob")]
    moved_at = json.loads(out)[1]["at"]
    assert run(capsys, "registry", "alias", "minilm@1", "prod")[0] == 0
    code, out, _ = run(capsys, "registry", "show", "minilm@prod", "--at", moved_at, "--json")
    assert json.loads(out)["version"] == 2          # what prod was when bob moved it
    code, out, _ = run(capsys, "registry", "show", "minilm@prod", "--json")
    assert json.loads(out)["version"] == 1


def test_remove_and_unalias(root, tmp_path, capsys):
    run(capsys, "registry", "add", make_artifact(tmp_path / "a", "A"), "--name", "enc", "--alias", "prod")
    err = one_line_error(capsys, "registry", "remove", "enc@1")
    assert "enc@1 is what enc@prod points at" in err and "unalias enc prod" in err
    assert run(capsys, "registry", "unalias", "enc", "prod")[0] == 0
    assert run(capsys, "registry", "remove", "enc@1")[0] == 0
    assert "no models registered" in run(capsys, "registry", "list")[1]


@pytest.mark.parametrize("argv, message", [
    (("registry", "show", "minilmm@prod"), "no model named 'minilmm'.*did you mean 'minilm'"),
    (("registry", "show", "minilm@prd"), "minilm has no alias 'prd'; did you mean 'prod'"),
    (("registry", "show", "minilm@9"), "minilm has no version 9; its versions are 1"),
    (("registry", "show", "minilm@a@b"), "not a model reference"),
    (("registry", "lineage", "@prod"), "not a model reference"),
    (("registry", "alias", "minilm@prod", "staging"), "give NAME@VERSION with a version number"),
    (("registry", "alias", "minilm@1", "3"), "alias '3'"),
    (("registry", "remove", "minilm"), "give NAME@VERSION"),
    (("registry", "add", "{tmp}", "--name", "x"), "no manifest.json; this is not an inferforge artifact"),
    (("registry", "add", "{tmp}/missing", "--name", "x"), "not a directory"),
    (("registry", "add", "{artifact}", "--name", "a@b"), "not a model reference|without @"),
    (("registry", "show", "minilm@prod", "--at", "Tuesday"), "ISO 8601"),
    (("registry", "show", "minilm@prod", "--at", "2000-01-01"), "pointed at no version"),
    (("registry",), "give a registry command"),
])
def test_bad_input_is_one_line_and_exit_2(root, tmp_path, capsys, argv, message):
    artifact = make_artifact(tmp_path / "art", "A", name="minilm")
    run(capsys, "registry", "add", artifact, "--name", "minilm", "--alias", "prod")
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path / "empty")).replace("{artifact}", str(artifact)) for a in argv]
    err = one_line_error(capsys, *argv)
    import re

    assert re.search(message, err), err


def test_tampered_artifact_is_refused_at_add(root, tmp_path, capsys):
    artifact = make_artifact(tmp_path / "a", "A")
    (artifact / "model.bin").write_text("B")
    err = one_line_error(capsys, "registry", "add", artifact, "--name", "enc")
    assert "'model.bin' does not match its sha256" in err
    assert not (root / "registry.db").exists() or Registry(root).list() == []


def test_unwritable_registry(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, "registry", "add", make_artifact(tmp_path / "a", "A"), "--name", "enc",
                         "--registry", tmp_path / "file" / "registry")
    assert "cannot write there" in err


def test_list_says_when_the_registry_does_not_exist_or_is_a_file(tmp_path, capsys):
    assert main(["registry", "list", "--registry", str(tmp_path / "typo")]) == 0
    assert "does not exist yet" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["registry", "list", "--registry", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_verify_exits_1_naming_the_damaged_copy(root, tmp_path, capsys):
    run(capsys, "registry", "add", make_artifact(tmp_path / "a", "A"), "--name", "enc", "--alias", "prod")
    run(capsys, "registry", "add", make_artifact(tmp_path / "b", "B"), "--name", "enc")
    code, out, _ = run(capsys, "registry", "verify")
    assert code == 0 and "2 stored version(s) checked, 0 with problems" in out
    tamper(Registry(root).resolve("enc@prod").path / "model.bin")
    code, out, err = run(capsys, "registry", "verify")
    assert code == 1 and err.startswith("CORRUPT enc@1 ") and "'model.bin' does not match" in err
    code, out, _ = run(capsys, "registry", "verify", "enc@2", "--json")
    assert code == 0 and json.loads(out) == {"checked": 1, "problems": []}
    err = one_line_error(capsys, "inspect", "enc@prod")        # never loaded silently
    assert "'model.bin' does not match its sha256" in err


def test_inspect_by_alias(root, tmp_path, capsys):
    run(capsys, "registry", "add", make_artifact(tmp_path / "a", "A", name="enc"), "--name", "enc", "--alias", "prod")
    code, out, _ = run(capsys, "inspect", "enc@prod", "--json")
    assert code == 0 and json.loads(out)["name"] == "enc"
    assert "no model named 'nope'" in one_line_error(capsys, "inspect", "nope@prod")


@pytest.mark.parametrize("argv", [("bench", "encc@prod"), ("generate", "encc@prod", "--prompt", "hi"),
                                  ("inspect", "encc@prod")])
def test_commands_resolve_name_at_alias(root, tmp_path, capsys, argv):
    run(capsys, "registry", "add", make_artifact(tmp_path / "a", "A", name="enc"), "--name", "enc", "--alias", "prod")
    assert "no model named 'encc' in the registry" in one_line_error(capsys, *argv)


def test_lineage_text_and_json(root, tmp_path, capsys):
    export = make_artifact(tmp_path / "export", "fp32", name="enc")
    quantized = make_artifact(tmp_path / "int8", "int8", name="enc-int8", parent=export,
                              extra={"quantization": {"calibration_sha256": "c1" * 32}})
    recal = make_artifact(tmp_path / "recal", "recal", name="enc-recal", parent=quantized, parent_key="provenance")
    for path, name in ((export, "enc"), (quantized, "enc-int8"), (recal, "enc-int8")):
        run(capsys, "registry", "add", path, "--name", name)
    run(capsys, "registry", "alias", "enc-int8@2", "prod")
    code, out, _ = run(capsys, "registry", "lineage", "enc-int8@prod")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("enc-recal") and "[enc-int8@2]" in lines[0]
    assert any(line.strip().startswith("└─ enc-int8 ") and "[enc-int8@1]" in line for line in lines)
    assert any("data quantization.calibration_sha256 c1c1" in line for line in lines)
    assert any("└─ enc " in line and "[enc@1]" in line for line in lines)
    assert "source checkpoint checkpoints/tiny-encoder" in lines[-1]
    code, out, _ = run(capsys, "registry", "lineage", "enc-int8@prod", "--json")
    tree = json.loads(out)
    assert tree["parent"]["parent"]["registered"] == ["enc@1"]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed")
def test_mlflow_uri_without_mlflow_is_one_line(root, tmp_path, capsys):
    err = one_line_error(capsys, "registry", "add", make_artifact(tmp_path / "a", "A"), "--name", "enc",
                         "--mlflow-uri", (tmp_path / "mlruns").as_uri())
    assert "needs the optional package mlflow" in err
    assert not (root / "registry.db").exists()      # nothing registered


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                    reason="mlflow is not installed (optional: pip install mlflow)")
def test_mlflow_mirror_with_a_local_file_store(root, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    code, out, err = run(capsys, "registry", "add", make_artifact(tmp_path / "a", "A"), "--name", "enc",
                         "--alias", "prod", "--mlflow-uri", uri, "--json")
    assert code == 0, err
    mirrored = json.loads(out)["mlflow"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("enc", "prod")
    assert version.version == mirrored["version"]
    assert version.tags["inferforge_version"] == "1"
    assert version.tags["inferforge_content"] == Registry(root).resolve("enc@prod").content
