"""`inferforge.load`: import an optimized artifact as a runnable model, after checking its hashes."""

from __future__ import annotations

from pathlib import Path

from inferforge.errors import ArtifactError
from inferforge.manifest import verify_artifact


def load(path: str | Path, *, threads: int | None = None, allow_failed: bool = False):
    """Load the artifact directory `path` written by a run.

    Verifies every file against the manifest first (a tampered or incomplete artifact raises
    `ArtifactError`) and refuses an artifact whose accuracy gate failed unless `allow_failed=True`.
    For a sentence encoder it returns a callable with the source model's signature:
    `model(sentences: list[str]) -> np.ndarray [n, hidden] float32` (L2-normalized, mean-pooled).
    The manifest is available as `model.manifest`.
    """
    path = Path(path)
    manifest = verify_artifact(path)
    if not manifest.get("accuracy_passed", False) and not allow_failed:
        failed = [c["name"] for c in manifest.get("checks", []) if c.get("kind") == "gate" and not c.get("passed")]
        raise ArtifactError(f"{path}: this artifact failed its accuracy gate ({', '.join(failed) or 'unknown'}); "
                            "pass allow_failed=True to load it anyway")
    kind = manifest.get("kind")
    if kind != "sentence-encoder":
        raise ArtifactError(f"{path}: artifact kind {kind!r} is not supported by this version of inferforge")
    from transformers import AutoTokenizer

    from inferforge.encoder import OnnxEncoder

    runtime = manifest["runtime"]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = OnnxEncoder(path / runtime["model"], tokenizer, max_length=runtime["max_length"], threads=threads)
    model.manifest = manifest
    return model
