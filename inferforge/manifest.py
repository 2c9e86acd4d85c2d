"""The artifact manifest: what an artifact came from, how it was made, what it measured, and its hashes.

An artifact is a directory of model files plus `manifest.json`. The manifest lists every other file
with its sha256 and size, and carries `manifest_sha256`, the sha256 of its own canonical JSON without
that field; `verify_artifact` refuses a directory where the manifest was edited, where any listed file
is missing or changed, or where a file appears that the manifest does not list. The digest catches
edits and damage; against someone who recomputes it, sign the artifact (`inferforge.signing`): the
signature file `model.sig` covers every file, the manifest included.

A run whose gates or targets fail publishes no artifact: `write_failed_report` puts its reports in
the sibling directory `OUT.failed/`, and the next run that publishes an artifact at `OUT` removes it.
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
from inferforge.fileio import (
    atomic_write_json,
    atomic_write_text,
    make_public_dir,
    replace_directory,
    sha256_file,
)

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "model.sig"          # written by `inferforge sign`; not listed in the manifest
DIGEST_KEY = "manifest_sha256"
FORMAT = "inferforge-artifact/1"
FAILED_SUFFIX = ".failed"
# What `OUT.failed/` may hold: the reports, a recalibration's drift report, and a distillation's
# training log and loss curve (a student that missed its gate is worth looking at).
REPORT_FILES = ("report.md", "report.json", "drift_report.json", "metrics.jsonl", "loss_curve.svg")


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
    """Every file under `directory` except the manifest and the signature, by relative POSIX path, sorted."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}
    return {rel: p for rel, p in files.items() if rel not in (MANIFEST_NAME, SIGNATURE_NAME)}


def file_hashes(directory: str | Path) -> dict[str, dict]:
    """sha256 and size of every file under `directory` except the manifest, by relative POSIX path."""
    return {rel: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for rel, p in artifact_files(directory).items()}


def content_version(files: dict[str, dict]) -> str:
    """A short identity of the artifact's content: the same files give the same version."""
    h = hashlib.sha256()
    for name, info in sorted(files.items()):
        h.update(f"{name}\0{info['sha256']}\n".encode())
    return h.hexdigest()[:12]


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces, UTF-8), without `manifest_sha256`."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_manifest(directory: str | Path, manifest: dict) -> dict:
    """Hash the directory's files into `manifest`, add the manifest's own digest and write it atomically;
    returns the full manifest (as it reads back from the file)."""
    files = file_hashes(directory)
    full = {"format": FORMAT, **manifest, "version": content_version(files), "files": files}
    full = json.loads(json.dumps(full, default=str))   # the digest covers exactly what a reader gets back
    full[DIGEST_KEY] = manifest_digest(full)
    atomic_write_json(Path(directory) / MANIFEST_NAME, full)
    return full


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory; give the artifact directory a run wrote (it holds {MANIFEST_NAME})")
    path = directory / MANIFEST_NAME
    if not path.is_file() and directory.name.endswith(FAILED_SUFFIX) and (directory / "report.md").is_file():
        raise ArtifactError(f"{directory}: the reports of a run that missed a gate or target, not an artifact (none "
                            f"was written); read {directory / 'report.md'}, then fix the run and re-run it")
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST_NAME}; this is not an inferforge artifact, or its run did not finish")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); the manifest is damaged, re-run the command or recipe that wrote it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: not an {FORMAT} manifest")
    return manifest


def verify_artifact(directory: str | Path) -> dict:
    """Check every file against the manifest; returns the manifest or raises ArtifactError naming the file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if DIGEST_KEY not in manifest:
        raise ArtifactError(f"{directory}: {MANIFEST_NAME} has no {DIGEST_KEY}, so its content cannot be checked (it "
                            "was edited, or written by an older inferforge); re-run the command or recipe that wrote it to rebuild the artifact")
    if manifest_digest(manifest) != manifest[DIGEST_KEY]:
        raise ArtifactError(f"{directory}: {MANIFEST_NAME} was edited after the run (its content does not match its "
                            f"{DIGEST_KEY}); restore the original manifest or re-run the command or recipe that wrote it")
    listed = manifest["files"]
    for name, info in listed.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{directory}: incomplete artifact, '{name}' is missing; re-run the command or recipe that wrote it, or restore the file")
        if path.stat().st_size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
            raise ArtifactError(f"{directory}: '{name}' does not match its sha256 in {MANIFEST_NAME}; "
                                "the file was modified or damaged after the run, re-run the command or recipe that wrote it")
    extra = sorted(set(artifact_files(directory)) - set(listed))
    if extra:
        raise ArtifactError(f"{directory}: files not in {MANIFEST_NAME}: {', '.join(extra)}; "
                            "remove them or re-run the command or recipe that wrote it")
    return manifest


def check_output_dir(out: Path) -> None:
    """Refuse to replace a directory that holds something other than an earlier artifact, or whose
    `OUT.failed` sibling holds something other than a failed run's reports."""
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserInputError(f"output {out}: {blocking} is a file, not a directory; choose another output")
    if out.exists():
        if not out.is_dir():
            raise UserInputError(f"output {out} exists and is not a directory; choose another output")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise UserInputError(f"output {out} is a non-empty directory that is not an inferforge artifact; "
                                 "choose another output (recipe key 'output' or --output) or empty it")
    failed = failed_report_dir(out)
    if failed.exists() and (not failed.is_dir() or any(p.name not in REPORT_FILES for p in failed.iterdir())):
        raise UserInputError(f"{failed} holds something other than a failed run's reports, and a failed run at {out} "
                             "would replace it; move it away or choose another output")


def failed_report_dir(out: str | Path) -> Path:
    """`OUT.failed`: where a run that missed a gate or target leaves its reports instead of an artifact."""
    out = Path(out)
    return out.with_name(out.name + FAILED_SUFFIX)


def write_failed_report(out: str | Path, files: dict[str, str]) -> Path:
    """Write a failed run's reports (`{"report.md": text, "report.json": text}`) to `OUT.failed/` and
    return that directory. `out` itself is not touched. The directory is built beside it and moved into
    place with one rename, replacing the report of an earlier failed run. Every path that refuses to
    publish an artifact because a check failed calls this before raising or returning the failure."""
    out = Path(out)
    unknown = set(files) - set(REPORT_FILES)
    if unknown:
        raise ValueError(f"a failed run's report holds only {', '.join(REPORT_FILES)}, not {', '.join(sorted(unknown))}")
    target = failed_report_dir(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        make_public_dir(staging)
        for name, text in files.items():
            atomic_write_text(staging / name, text)
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def remove_failed_report(out: str | Path) -> None:
    """Remove a stale `OUT.failed/` once a run has published an artifact at `out`."""
    failed = failed_report_dir(out)
    if failed.is_dir() and all(p.name in REPORT_FILES for p in failed.iterdir()):
        shutil.rmtree(failed, ignore_errors=True)


@contextlib.contextmanager
def staged_artifact(out: str | Path):
    """Build an artifact in a hidden sibling directory and yield it. When the block finishes with a
    manifest written, it replaces `out` (nothing, or an earlier artifact) with one rename and removes
    a stale `OUT.failed/`. A block that writes no manifest (a run that failed its checks), an error or
    an interrupt publishes nothing: the staging directory is removed and `out` is untouched."""
    out = Path(out)
    check_output_dir(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        # Name the directory the output goes in, not the hidden staging directory made there; the CLI
        # turns the error into one line with the fix for its errno.
        raise OSError(e.errno, e.strerror, str(out.parent)) from None
    try:
        make_public_dir(staging)
        yield staging
        if (staging / MANIFEST_NAME).is_file():
            replace_directory(staging, out)
            remove_failed_report(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)   # gone already after a successful replace
