import json
import os

import pytest

from inferforge.errors import ArtifactError
from inferforge.fileio import atomic_write_bytes, atomic_write_text, sha256_file
from inferforge.manifest import MANIFEST_NAME, read_manifest, verify_artifact, write_manifest


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
