import json
import os
import subprocess
import sys

import pytest

from inferforge.errors import ArtifactError, UserInputError
from inferforge.fileio import atomic_write_bytes, atomic_write_text, sha256_file
from inferforge.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    manifest_digest,
    read_manifest,
    staged_artifact,
    verify_artifact,
    write_failed_report,
    write_manifest,
)


@pytest.fixture
def artifact(tmp_path):
    d = tmp_path / "artifact"
    d.mkdir()
    (d / "model.onnx").write_bytes(os.urandom(4096))
    (d / "sub").mkdir()
    (d / "sub" / "vocab.txt").write_text("a\nb\n")
    manifest = write_manifest(d, {"name": "t", "kind": "sentence-encoder"})
    return d, manifest


def test_round_trip(artifact):
    d, written = artifact
    assert verify_artifact(d) == written == read_manifest(d)
    assert set(written["files"]) == {"model.onnx", "sub/vocab.txt"}
    assert written["files"]["model.onnx"]["sha256"] == sha256_file(d / "model.onnx")
    assert written["format"] == "inferforge-artifact/1"


def test_version_is_content_derived(artifact, tmp_path):
    d, written = artifact
    again = write_manifest(d, {"name": "t", "kind": "sentence-encoder"})
    assert again["version"] == written["version"]
    (d / "sub" / "vocab.txt").write_text("a\nc\n")
    assert write_manifest(d, {"name": "t"})["version"] != written["version"]


def test_tampered_file_is_refused(artifact):
    d, _ = artifact
    data = bytearray((d / "model.onnx").read_bytes())
    data[100] ^= 0xFF                      # same size, one byte changed
    (d / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="'model.onnx' does not match its sha256"):
        verify_artifact(d)


def test_missing_file_is_refused(artifact):
    d, _ = artifact
    (d / "sub" / "vocab.txt").unlink()
    with pytest.raises(ArtifactError, match="incomplete artifact, 'sub/vocab.txt' is missing"):
        verify_artifact(d)


def test_unlisted_file_is_refused(artifact):
    d, _ = artifact
    (d / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="files not in manifest.json: extra.bin"):
        verify_artifact(d)


def test_no_manifest_means_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        verify_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="not a directory"):
        verify_artifact(tmp_path / "nope")


def test_damaged_manifest(artifact):
    d, _ = artifact
    (d / MANIFEST_NAME).write_text('{"format": "inferforge-artifact/1", "files": ')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        verify_artifact(d)
    (d / MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not an inferforge-artifact/1 manifest"):
        verify_artifact(d)


def test_atomic_write_keeps_old_content_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new content")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]   # no temp file left behind


def test_atomic_write_creates_parents_and_normal_permissions(tmp_path):
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "hi")
    assert target.read_text() == "hi"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's private 0600


@pytest.mark.parametrize("edit", [
    lambda m: m.update(accuracy_passed=True),
    lambda m: m.update(passed=True),
    lambda m: m["validation"].update(min_cosine=0.999),
    lambda m: m["files"]["model.onnx"].update(bytes=1),
    lambda m: m.pop("validation"),
])
def test_edited_manifest_is_refused(tmp_path, edit):
    d = tmp_path / "artifact"
    d.mkdir()
    (d / "model.onnx").write_bytes(os.urandom(256))
    written = write_manifest(d, {"name": "t", "kind": "sentence-encoder", "passed": False, "accuracy_passed": False,
                                 "validation": {"min_cosine": 0.97}})
    assert written["manifest_sha256"] == manifest_digest(written)
    edit(written)
    (d / MANIFEST_NAME).write_text(json.dumps(written, indent=2))
    with pytest.raises(ArtifactError, match="manifest.json was edited after the run .*restore the original manifest"):
        verify_artifact(d)


def test_manifest_without_its_digest_is_refused(artifact):
    d, written = artifact
    del written["manifest_sha256"]
    (d / MANIFEST_NAME).write_text(json.dumps(written))
    with pytest.raises(ArtifactError, match="has no manifest_sha256.*re-run the command or recipe that wrote it"):
        verify_artifact(d)


def test_reformatted_manifest_still_verifies(artifact):
    d, written = artifact
    (d / MANIFEST_NAME).write_text(json.dumps(dict(reversed(list(written.items()))), indent=4))   # same content
    assert verify_artifact(d) == written


def test_edited_manifest_is_refused_by_load_and_inspect(tmp_path):
    import inferforge
    from inferforge.cli import main

    d = tmp_path / "artifact"
    d.mkdir()
    (d / "model.onnx").write_bytes(os.urandom(256))
    manifest = write_manifest(d, {"name": "t", "kind": "sentence-encoder", "passed": False, "accuracy_passed": False,
                                  "checks": [{"name": "min cosine (held-out)", "kind": "gate", "passed": False}]})
    manifest.update(passed=True, accuracy_passed=True)   # make a failed artifact look like a passing one
    manifest["checks"][0]["passed"] = True
    (d / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ArtifactError, match="was edited after the run"):
        inferforge.load(d)
    proc = subprocess.run([sys.executable, "-m", "inferforge", "inspect", str(d)], capture_output=True, text=True)
    assert proc.returncode == 2 and "was edited after the run" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert main(["bench", str(d), "--batch-sizes", "1"]) == 2


def test_signature_file_is_not_part_of_the_manifest(artifact):
    d, written = artifact
    (d / SIGNATURE_NAME).write_text("{}")
    assert verify_artifact(d) == written                          # not a "file not in manifest"
    assert SIGNATURE_NAME not in write_manifest(d, {"name": "t"})["files"]
    (d / "sub" / SIGNATURE_NAME).write_text("{}")                 # only the top-level one is the signature
    with pytest.raises(ArtifactError, match="files not in manifest.json: sub/model.sig"):
        verify_artifact(d)


def test_failed_report_replaces_an_older_one_and_a_published_artifact_removes_it(tmp_path):
    out = tmp_path / "art"
    failed = write_failed_report(out, {"report.md": "first", "report.json": "{}"})
    assert failed == tmp_path / "art.failed" and not out.exists()
    write_failed_report(out, {"report.md": "second"})
    assert sorted(p.name for p in failed.iterdir()) == ["report.md"] and (failed / "report.md").read_text() == "second"
    with staged_artifact(out) as staging:                         # a block that writes no manifest publishes nothing
        (staging / "model.onnx").write_bytes(b"x")
    assert not out.exists() and failed.is_dir()
    with staged_artifact(out) as staging:
        (staging / "model.onnx").write_bytes(b"x")
        write_manifest(staging, {"name": "t"})
    verify_artifact(out)
    assert not failed.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_a_foreign_dot_failed_directory_is_not_replaced(tmp_path):
    (tmp_path / "art.failed").mkdir()
    (tmp_path / "art.failed" / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="holds something other than a failed run's reports"):
        with staged_artifact(tmp_path / "art"):
            pass
    assert (tmp_path / "art.failed" / "notes.txt").read_text() == "mine"


def test_an_output_that_cannot_be_written_names_the_output_given(tmp_path, monkeypatch, capsys):
    """A directory that takes no new entries (here mkdtemp refused): exit 3, the message names the
    directory the output goes in, never the hidden staging directory made there, with the errno's fix."""
    import errno
    import tempfile

    from inferforge.cli import main

    def refuse(*args, dir=None, prefix="", **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}abc")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    out = tmp_path / "x"
    with pytest.raises(OSError, match="Permission denied") as caught:
        with staged_artifact(out):
            pass
    assert caught.value.filename == str(tmp_path)
    assert main(["export", "tests.factories:tiny_bert", "--output", str(out), "-q"]) == 3
    err = capsys.readouterr().err
    assert f"{tmp_path}: Permission denied" in err and "permissions" in err and ".partial-" not in err
    assert len(err.strip().splitlines()) == 1
