"""The artifact manifest: what an artifact came from, how it was made, what it measured, and its hashes.

An artifact is a directory of model files plus `manifest.json`. The manifest lists every other file
with its sha256 and size; `verify_artifact` refuses a directory where any listed file is missing or
changed, or where a file appears that the manifest does not list.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from inferforge.errors import ArtifactError, UserInputError
from inferforge.fileio import atomic_write_json, make_public_dir, replace_directory, sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT = "inferforge-artifact/1"


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - a missing or odd distribution just has no version
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


def tool_versions() -> dict:
    versions = {name: _version(name) for name in ("inferforge", "torch", "triton", "transformers", "optimum-onnx", "onnx")}
    versions["onnxruntime"] = _version("onnxruntime-gpu") or _version("onnxruntime")
    return versions


def git_revision() -> str | None:
    """The commit of the inferforge checkout this code runs from, with '-dirty' for local changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def environment() -> dict:
    return {
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_name(),
        **tool_versions(),
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def artifact_files(directory: str | Path) -> dict[str, Path]:
    """Every file under `directory` except the manifest, by relative POSIX path, sorted."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def file_hashes(directory: str | Path) -> dict[str, dict]:
    """sha256 and size of every file under `directory` except the manifest, by relative POSIX path."""
    return {rel: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for rel, p in artifact_files(directory).items()}


def content_version(files: dict[str, dict]) -> str:
    """A short identity of the artifact's content: the same files give the same version."""
    h = hashlib.sha256()
    for name, info in sorted(files.items()):
        h.update(f"{name}\0{info['sha256']}\n".encode())
    return h.hexdigest()[:12]


def write_manifest(directory: str | Path, manifest: dict) -> dict:
    """Hash the directory's files into `manifest` and write it atomically; returns the full manifest."""
    files = file_hashes(directory)
    full = {"format": FORMAT, **manifest, "version": content_version(files), "files": files}
    atomic_write_json(Path(directory) / MANIFEST_NAME, full)
    return full


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory; give the artifact directory a run wrote (it holds {MANIFEST_NAME})")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST_NAME}; this is not an inferforge artifact, or its run did not finish")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); the manifest is damaged, re-run the recipe") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: not an {FORMAT} manifest")
    return manifest


def verify_artifact(directory: str | Path) -> dict:
    """Check every file against the manifest; returns the manifest or raises ArtifactError naming the file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    listed = manifest["files"]
    for name, info in listed.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{directory}: incomplete artifact, '{name}' is missing; re-run the recipe or restore the file")
        if path.stat().st_size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
            raise ArtifactError(f"{directory}: '{name}' does not match its sha256 in {MANIFEST_NAME}; "
                                "the file was modified or damaged after the run, re-run the recipe")
    extra = sorted(set(artifact_files(directory)) - set(listed))
    if extra:
        raise ArtifactError(f"{directory}: files not in {MANIFEST_NAME}: {', '.join(extra)}; "
                            "remove them or re-run the recipe")
    return manifest


def check_output_dir(out: Path) -> None:
    """Refuse to replace a directory that holds something other than an earlier artifact."""
    if out.exists():
        if not out.is_dir():
            raise UserInputError(f"output {out} exists and is not a directory; choose another output")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise UserInputError(f"output {out} is a non-empty directory that is not an inferforge artifact; "
                                 "choose another output (recipe key 'output' or --output) or empty it")


@contextlib.contextmanager
def staged_artifact(out: str | Path):
    """Build an artifact in a hidden sibling directory and yield it. When the block finishes, it
    replaces `out` (nothing, or an earlier artifact) with one rename; after an error or an
    interrupt the staging directory is removed and `out` is untouched."""
    out = Path(out)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        make_public_dir(staging)
        yield staging
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)   # gone already after a successful replace
