"""Small synthetic artifacts for the registry tests: a few bytes of files and a real manifest."""

from __future__ import annotations

from pathlib import Path

from inferforge.fileio import sha256_file
from inferforge.manifest import MANIFEST_NAME, write_manifest

SOURCE = {"model": "checkpoints/tiny-encoder", "path": "/nonexistent/tiny-encoder", "weights_sha256": "ab" * 32}


def gate_check(name: str = "min cosine", measured: float = 0.995, limit: float = 0.99) -> dict:
    return {"name": name, "kind": "gate", "measured": measured, "op": ">=", "limit": limit,
            "passed": measured >= limit}


def make_artifact(directory: Path, payload: str, *, name: str = "tiny", kind: str = "test-model",
                  parent: Path | None = None, parent_key: str = "parent", extra: dict | None = None,
                  accuracy_passed: bool = True) -> Path:
    """An artifact at `directory` whose one model file holds `payload` (so distinct payloads are distinct
    content). With `parent`, its manifest records that artifact as its parent, at the top level
    (`parent_key="parent"`, as `quantize --onnx` writes it) or under `provenance.parent`."""
    directory.mkdir(parents=True)
    (directory / "model.bin").write_text(payload)
    (directory / "config.json").write_text('{"hidden": 8}')
    manifest = {"name": name, "created": "2026-11-20T10:00:00+00:00", "kind": kind,
                "runtime": {"model": "model.bin"}, "source": SOURCE,
                "steps": [{"name": "test", "settings": {}, "duration_s": 0.0, "summary": "synthetic"}],
                "checks": [gate_check()], "passed": accuracy_passed, "accuracy_passed": accuracy_passed,
                "environment": {"python": "3"}, **(extra or {})}
    if parent is not None:
        from inferforge.manifest import read_manifest

        parent_manifest = read_manifest(parent)
        record = {"path": str(parent), "name": parent_manifest["name"], "version": parent_manifest["version"],
                  "manifest_sha256": sha256_file(parent / MANIFEST_NAME),
                  "model_sha256": parent_manifest["files"]["model.bin"]["sha256"]}
        if parent_key == "parent":
            manifest["parent"] = record
        else:
            manifest["provenance"] = {"parent": record, **manifest.get("provenance", {})}
    write_manifest(directory, manifest)
    return directory


def tamper(path: Path) -> None:
    """Change one byte of a (read-only) stored file, keeping its size."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
