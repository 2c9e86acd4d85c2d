"""The model registry's core (`inferforge.registry.Registry`): versions, aliases, history, lineage, verify."""

import multiprocessing
import sys
from pathlib import Path

import pytest

import inferforge
from inferforge.errors import ArtifactError, UserInputError
from inferforge.registry import Registry
from inferforge.registry_refs import default_root, parse_ref, parse_time
from tests.registry_helpers import SOURCE, make_artifact, tamper


@pytest.fixture
def registry(tmp_path, monkeypatch):
    root = tmp_path / "registry"
    monkeypatch.setenv("INFERFORGE_REGISTRY", str(root))
    return Registry(root)


def test_versions_count_per_name_and_same_content_registers_once(registry, tmp_path):
    a = make_artifact(tmp_path / "a", "weights A")
    b = make_artifact(tmp_path / "b", "weights B")
    first = registry.add(a, "enc", owner="alice")
    assert (first.version, first.existing, first.owner) == (1, False, "alice")
    again = registry.add(a, "enc")
    assert (again.version, again.existing, again.content) == (1, True, first.content)
    assert registry.add(b, "enc").version == 2
    assert registry.add(a, "other").version == 1            # the same files under another name share the copy
    renamed = make_artifact(tmp_path / "a-renamed", "weights A", name="renamed")   # same files, other manifest
    assert registry.add(renamed, "third").content == first.content
    assert registry.resolve("third").artifact_name == "tiny"   # the copy stored first is kept...
    assert registry.verify() == []                             # ...and is what every version records
    assert [v.ref for v in registry.list()] == ["enc@1", "enc@2", "other@1", "third@1"]
    assert sorted(p.name for p in registry.objects.iterdir() if not p.name.startswith(".")) == sorted(
        {first.content, registry.resolve("enc@2").content})
    stored = registry.resolve("enc@1").path
    assert stored == registry.objects / first.content and (stored / "model.bin").read_text() == "weights A"
    assert not (stored / "model.bin").stat().st_mode & 0o222    # read-only
    assert registry.resolve("enc").version == 2 == registry.resolve("enc@latest").version


def test_tampered_or_non_artifact_is_refused_at_add(registry, tmp_path):
    a = make_artifact(tmp_path / "a", "weights")
    (a / "model.bin").write_text("weights, edited")
    with pytest.raises(ArtifactError, match="'model.bin' does not match its sha256"):
        registry.add(a, "enc")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        registry.add(tmp_path / "plain", "enc")
    assert registry.list() == []


def test_alias_moves_are_recorded_and_answer_as_of(registry, tmp_path):
    v1 = registry.add(make_artifact(tmp_path / "a", "A"), "enc", alias="prod", owner="alice")
    v2 = registry.add(make_artifact(tmp_path / "b", "B"), "enc")
    registry.alias("enc", v2.version, "prod", owner="bob")
    registry.alias("enc", v2.version, "prod", owner="bob")      # no move, no event
    registry.alias("enc", v1.version, "staging", owner="carol")
    registry.remove_alias("enc", "staging", owner="carol")
    history = registry.alias_history("enc", "prod")
    assert [(e["from_version"], e["to_version"], e["owner"]) for e in history] == [(None, 1, "alice"), (1, 2, "bob")]
    assert [e["alias"] for e in registry.alias_history("enc")] == ["prod", "prod", "staging", "staging"]
    assert registry.alias_history("enc", "staging")[-1]["to_version"] is None
    assert registry.resolve("enc@prod").version == 2
    assert registry.resolve("enc@prod", at=history[0]["at"]).version == 1     # what prod was then
    assert registry.resolve("enc@prod", at=history[1]["at"]).version == 2
    with pytest.raises(UserInputError, match="pointed at no version"):
        registry.resolve("enc@prod", at="2000-01-01T00:00")
    with pytest.raises(UserInputError, match="pointed at no version"):   # deleted by then
        registry.resolve("enc@staging", at=registry.alias_history("enc", "staging")[-1]["at"])
    assert registry.resolve("enc@1", at="2000-01-01").version == 1   # --at only moves aliases


def test_parse_time_and_refs():
    assert parse_time("2026-11-24T12:00") == "2026-11-24T12:00:00.000000+00:00"
    assert parse_time("2026-11-24T13:00+01:00") == "2026-11-24T12:00:00.000000+00:00"
    assert parse_time("2026-11-24T12:00Z") == "2026-11-24T12:00:00.000000+00:00"
    with pytest.raises(UserInputError, match="ISO 8601"):
        parse_time("Tuesday")
    assert parse_ref("enc") == ("enc", None) and parse_ref("enc@3") == ("enc", 3)
    assert parse_ref("enc@prod") == ("enc", "prod")
    for bad in ("", "@prod", "enc@", "enc@a@b", "en c", "enc@pr od", "runs/enc"):
        with pytest.raises(UserInputError, match="not a model reference|alias"):
            parse_ref(bad)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv("INFERFORGE_REGISTRY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "inferforge" / "registry"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_root() == Path.home() / ".local" / "share" / "inferforge" / "registry"
    monkeypatch.setenv("INFERFORGE_REGISTRY", str(tmp_path / "r"))
    assert default_root() == tmp_path / "r" and Registry().root == tmp_path / "r"


def test_remove_is_refused_while_aliased_and_numbers_are_not_reused(registry, tmp_path):
    a = registry.add(make_artifact(tmp_path / "a", "A"), "enc", alias="prod")
    registry.add(make_artifact(tmp_path / "a2", "A"), "shared")   # same files, another name
    with pytest.raises(UserInputError, match="enc@1 is what enc@prod points at; move the alias first"):
        registry.remove("enc", 1)
    registry.remove_alias("enc", "prod")
    registry.remove("enc", 1)
    assert a.path.is_dir()                                        # still used by shared@1
    with pytest.raises(UserInputError, match="no model named 'enc'"):
        registry.resolve("enc")
    assert registry.add(make_artifact(tmp_path / "b", "B"), "enc").version == 2   # 1 is never given out again
    registry.remove("shared", 1)
    assert not a.path.exists()                                    # no version uses the copy any more
    with pytest.raises(UserInputError, match="enc has no version 7; its versions are 2"):
        registry.remove("enc", 7)


def test_unknown_refs_say_what_exists(registry, tmp_path):
    registry.add(make_artifact(tmp_path / "a", "A"), "minilm", alias="prod")
    with pytest.raises(UserInputError, match="no model named 'minilmm'.*did you mean 'minilm'"):
        registry.resolve("minilmm@prod")
    with pytest.raises(UserInputError, match="minilm has no alias 'prd'; did you mean 'prod'"):
        registry.resolve("minilm@prd")
    with pytest.raises(UserInputError, match="minilm has no version 4; its versions are 1"):
        registry.resolve("minilm@4")
    with pytest.raises(UserInputError, match="alias '7x'"):
        registry.alias("minilm", 1, "7x")


def test_empty_or_unwritable_registry(tmp_path):
    with pytest.raises(UserInputError, match="is empty"):
        Registry(tmp_path / "nothing").resolve("enc@prod")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="cannot write there.*INFERFORGE_REGISTRY"):
        Registry(tmp_path / "file" / "registry").add(make_artifact(tmp_path / "a", "A"), "enc")


def test_load_by_alias_verifies_the_stored_copy(registry, tmp_path):
    version = registry.add(make_artifact(tmp_path / "a", "A", kind="test-model"), "enc", alias="prod")
    # The stored copy resolves and verifies; this kind has no loader, which is the next check after the hashes.
    with pytest.raises(ArtifactError, match=rf"{version.path}: artifact kind 'test-model' is not supported"):
        inferforge.load("enc@prod")
    with pytest.raises(UserInputError, match="has no alias 'staging'"):
        inferforge.load("enc@staging")
    assert registry.verify() == []
    tamper(version.path / "model.bin")
    with pytest.raises(ArtifactError, match="'model.bin' does not match its sha256"):
        inferforge.load("enc@prod")
    problems = registry.verify()
    assert len(problems) == 1 and problems[0].startswith(f"enc@1 (content {version.content}):")


def test_verify_names_missing_and_replaced_copies(registry, tmp_path):
    a = registry.add(make_artifact(tmp_path / "a", "A"), "enc")
    b = registry.add(make_artifact(tmp_path / "b", "B"), "enc")
    import shutil

    shutil.rmtree(a.path)
    assert [p.split(" ")[0] for p in registry.verify()] == ["enc@1"]
    assert registry.verify("enc@2") == []
    make_artifact(tmp_path / "c", "C")
    shutil.rmtree(b.path)
    shutil.copytree(tmp_path / "c", b.path)    # a valid artifact, but not the one registered
    assert any("enc@2" in p and "another artifact" in p for p in registry.verify())
    # Loading by reference refuses both, naming the version and the way to check it, not "re-run the recipe".
    with pytest.raises(ArtifactError, match=r"copy of enc@2 \(for enc@2\) .* holds another artifact \(content "
                                            r".*registry verify enc@2"):
        inferforge.load("enc@2")
    with pytest.raises(ArtifactError, match=r"copy of enc@1 \(for enc@1\) .* is missing; run `inferforge registry "
                                            r"verify enc@1`"):
        inferforge.load("enc@1")


def test_lineage_walks_three_generations(registry, tmp_path):
    export = make_artifact(tmp_path / "export", "fp32", name="enc", kind="sentence-encoder")
    quantized = make_artifact(tmp_path / "int8", "int8", name="enc-int8", parent=export,
                              extra={"quantization": {"calibration_sha256": "c1" * 32, "held_out_sha256": "h1" * 32}})
    recalibrated = make_artifact(tmp_path / "recal", "int8 recal", name="enc-int8-recal", parent=quantized,
                                 parent_key="provenance",
                                 extra={"provenance": {"recalibration": {"window_sha256": "w2" * 32}}})
    registry.add(export, "enc")
    registry.add(quantized, "enc-int8")
    registry.add(recalibrated, "enc-int8", alias="prod")
    tree = registry.lineage("enc-int8@prod")
    chain = []
    node = tree
    while node:
        chain.append(node)
        node = node["parent"]
    assert [n["name"] for n in chain] == ["enc-int8-recal", "enc-int8", "enc"]
    assert [n["registered"] for n in chain] == [["enc-int8@2"], ["enc-int8@1"], ["enc@1"]]
    assert chain[0]["data"] == {"provenance.recalibration.window_sha256": "w2" * 32}
    assert chain[1]["data"] == {"quantization.calibration_sha256": "c1" * 32, "quantization.held_out_sha256": "h1" * 32}
    assert all(n["gates"]["checks"][0]["passed"] for n in chain)
    assert chain[2]["source"] == SOURCE and chain[0]["source"] is None


def test_lineage_shows_unregistered_and_vanished_parents(registry, tmp_path):
    export = make_artifact(tmp_path / "export", "fp32", name="enc")
    quantized = make_artifact(tmp_path / "int8", "int8", name="enc-int8", parent=export)
    recalibrated = make_artifact(tmp_path / "recal", "recal", name="enc-recal", parent=quantized,
                                 parent_key="provenance")
    registry.add(recalibrated, "enc-recal")
    tree = registry.lineage("enc-recal")   # neither parent registered: read from their recorded paths
    assert tree["parent"]["name"] == "enc-int8" and "recorded path" in tree["parent"]["note"]
    assert tree["parent"]["parent"]["source"] == SOURCE
    import shutil

    shutil.rmtree(quantized)
    tree = registry.lineage("enc-recal")   # the parent is gone: what the child recorded, and the walk stops
    assert tree["parent"]["content"] == tree["parent_record"]["version"]
    assert "holds no artifact" in tree["parent"]["note"] and tree["parent"]["parent"] is None


# -- several processes at once ----------------------------------------------------------------------

def _worker(job):
    """Add five distinct artifacts and move both aliases to each; plus one artifact every worker adds."""
    root, worker, dirs, shared = job
    registry = Registry(root)
    mine = []
    for d in dirs:
        version = registry.add(d, "model", alias="staging", owner=f"w{worker}")
        registry.alias("model", version.version, "prod", owner=f"w{worker}")
        mine.append((version.content, version.version))
    same = registry.add(shared, "shared", owner=f"w{worker}")
    return mine, same.version


def test_concurrent_adds_and_alias_moves_lose_nothing(tmp_path):
    root = tmp_path / "registry"
    workers, per_worker = 4, 5
    jobs = []
    for w in range(workers):
        dirs = [make_artifact(tmp_path / f"w{w}-{i}", f"weights {w} {i}") for i in range(per_worker)]
        jobs.append((root, w, dirs, make_artifact(tmp_path / f"same-{w}", "the same weights")))
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        results = pool.map(_worker, jobs)
    registry = Registry(root)
    added = [pair for mine, _ in results for pair in mine]
    assert sorted(v for _, v in added) == list(range(1, workers * per_worker + 1))   # no gap, no duplicate
    assert len({c for c, _ in added}) == workers * per_worker
    assert {v.content: v.version for v in registry.list("model")} == dict(added)
    assert {same for _, same in results} == {1} and len(registry.list("shared")) == 1
    for alias in ("staging", "prod"):
        history = registry.alias_history("model", alias)
        assert len(history) == workers * per_worker                      # every move is recorded...
        assert sorted(e["to_version"] for e in history) == list(range(1, workers * per_worker + 1))
        for before, after in zip(history, history[1:]):                  # ...and none was lost in a race
            assert after["from_version"] == before["to_version"]
        assert registry.resolve(f"model@{alias}").version == history[-1]["to_version"]
    assert registry.verify() == []
