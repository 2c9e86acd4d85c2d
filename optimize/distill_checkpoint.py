"""Distillation checkpoints and the stop flag raised by SIGINT/SIGTERM.

A checkpoint is a directory `step-000040/` under the checkpoint directory:
    weights.safetensors   student (and projection) weights, `StudentWithHeads.state_dict()`
    training.pt           optimizer and scheduler state, every rank's RNG states (torch, CUDA,
                          numpy, python), tensors and plain lists only (read with weights_only=True)
    state.json            step, epoch, position in the epoch, samples seen, the run's fingerprint
                          and settings, training seconds so far, the metrics logged so far
It is built under a temporary name and renamed into place, then `latest.json` (written atomically)
points at it and older checkpoints are removed: a crash at any moment leaves the previous one whole.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch

from inferforge.errors import InferforgeError, UserInputError
from inferforge.fileio import atomic_write_json, make_public_dir, make_public_file

LATEST = "latest.json"


class DistillInterrupted(InferforgeError):
    """SIGINT or SIGTERM stopped training; a checkpoint was saved first (exit code 130)."""

    exit_code = 130


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under `directory`, or None."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise UserInputError(f"{pointer}: damaged; remove {directory} to start over") from None
    path = Path(directory) / name
    if not (path / "state.json").is_file():
        raise UserInputError(f"{pointer} names {name}, which is missing; remove {directory} to start over")
    return path


def save_checkpoint(directory: str | Path, *, step: int, module: torch.nn.Module, optimizer, scheduler,
                    rng_states: list[dict], state: dict) -> Path:
    """Write checkpoint `step` (see the module docstring) and return its directory. Rank 0 only."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=directory))
    try:
        make_public_dir(staging)
        save_model(module, str(staging / "weights.safetensors"))
        make_public_file(staging / "weights.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states},
                   staging / "training.pt")
        atomic_write_json(staging / "state.json", {**state, "step": step})
        final = directory / name
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(directory / LATEST, {"checkpoint": name, "step": step})
    for old in directory.glob("step-*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, *, module: torch.nn.Module, optimizer, scheduler) -> tuple[dict, list[dict]]:
    """Restore weights, optimizer and scheduler from checkpoint `path`; returns (state, rng_states)."""
    from safetensors.torch import load_model

    load_model(module, str(path / "weights.safetensors"))
    training = torch.load(path / "training.pt", map_location="cpu", weights_only=True)
    fused = optimizer.defaults.get("fused")
    optimizer.load_state_dict(training["optimizer"])
    if fused:   # a checkpoint of the per-parameter loop (before fused AdamW) would switch this run back to it
        for group in optimizer.param_groups:
            group["fused"] = fused
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
    scheduler.load_state_dict(training["scheduler"])
    return json.loads((path / "state.json").read_text(encoding="utf-8")), training["rng"]


_PARTS = {"config": "settings", "teacher": "teacher weights", "data": "data files", "student": "student",
          "world": "number of processes"}


def changes(state: dict, fingerprint: dict, settings: dict) -> str:
    """What differs between a checkpoint's run (its state.json) and this one, for the refusal to
    resume: 'changed: lr 0.0003 -> 0.001, data files'."""
    from inferforge.optimize.distill import LATER_DEFAULTS

    def setting(where: dict, k: str):   # a setting at its LATER_DEFAULTS value is not saved: name that value
        return where.get(k, LATER_DEFAULTS.get(k))

    old, found = state.get("fingerprint") or {}, []
    for key, value in fingerprint.items():
        if old.get(key) == value:
            continue
        earlier = state.get("settings")
        if key == "config" and isinstance(earlier, dict):
            found += [f"{k} {setting(earlier, k)} -> {setting(settings, k)}"
                      for k in sorted(set(earlier) | set(settings)) if setting(earlier, k) != setting(settings, k)
                      ] or ["settings"]
        elif key == "world":
            found.append(f"number of processes {old.get(key)} -> {value}")
        else:
            found.append(_PARTS.get(key, key))
    return "changed: " + ", ".join(found)


class StopFlag:
    """SIGINT and SIGTERM set `requested` (the training loop saves a checkpoint at the next step
    boundary and stops); a second SIGINT interrupts at once. Handlers are restored on exit. Outside
    the main thread signals cannot be caught, and the flag stays down."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name

    def __enter__(self):
        with contextlib.suppress(ValueError):   # not the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


@contextlib.contextmanager
def sigterm_raises(message: str):
    """Within the block SIGTERM raises `DistillInterrupted(message)` (SIGINT already raises
    KeyboardInterrupt), so the `finally` blocks of setup and writing run: no temporary directory is
    left behind. Training's `StopFlag` takes over the signal while it is active."""
    def handle(signum, frame):
        raise DistillInterrupted(message)

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:   # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
