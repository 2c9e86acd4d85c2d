"""Model references (`NAME`, `NAME@3`, `NAME@ALIAS`), alias names, times and the registry's location."""

from __future__ import annotations

import difflib
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from inferforge.errors import ArtifactError, UserInputError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
RESERVED_ALIASES = ("latest",)   # NAME@latest is the latest version, like a bare NAME


def default_root() -> Path:
    """`INFERFORGE_REGISTRY`, else `$XDG_DATA_HOME/inferforge/registry`, else `~/.local/share/inferforge/registry`."""
    if os.environ.get("INFERFORGE_REGISTRY"):
        return Path(os.environ["INFERFORGE_REGISTRY"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "inferforge" / "registry"


def parse_time(text: str) -> str:
    """An ISO 8601 time (`2026-11-24T12:00`, `2026-11-24`, `...+02:00`) as a UTC timestamp string;
    a time without an offset is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UserInputError(f"--at {text!r}: not an ISO 8601 time; write e.g. 2026-11-24T12:00 (UTC) or "
                             "2026-11-24T12:00+01:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def looks_like_ref(text: str) -> bool:
    """True for `NAME@REF` with a valid name: what `load` and `inspect` resolve through the registry."""
    name, sep, ref = str(text).partition("@")
    return bool(sep) and bool(_NAME.fullmatch(name)) and bool(ref) and "@" not in ref and "/" not in ref


def parse_ref(ref: str) -> tuple[str, int | str | None]:
    """`NAME` -> (NAME, None); `NAME@3` -> (NAME, 3); `NAME@ALIAS` -> (NAME, ALIAS)."""
    name, sep, tail = str(ref).partition("@")
    if not _NAME.fullmatch(name) or (sep and not tail) or "@" in tail:
        raise UserInputError(f"{ref!r}: not a model reference; write NAME, NAME@VERSION (e.g. minilm@3) or "
                             "NAME@ALIAS (e.g. minilm@prod); a name is letters, digits, '.', '_' and '-'")
    if not sep or tail in RESERVED_ALIASES:
        return name, None
    if tail.isdigit():
        return name, int(tail)
    check_alias(tail)
    return name, tail


def check_name(name: str) -> str:
    """A model name for `registry add --name` / `drift --recalibrate --name`: UserInputError when invalid."""
    if "@" in str(name):
        raise UserInputError(f"--name {name!r}: a name, without @; give the alias with --alias")
    if not _NAME.fullmatch(str(name)):
        raise UserInputError(f"--name {name!r}: not a model name; a name starts with a letter or digit and holds "
                             "letters, digits, '.', '_' and '-' (at most 128 characters)")
    return name


def check_alias(alias: str) -> str:
    if not _ALIAS.fullmatch(alias) or alias in RESERVED_ALIASES:
        raise UserInputError(f"alias {alias!r}: an alias starts with a letter and holds letters, digits, '.', '_' "
                             f"and '-' (not a number, and not {', '.join(RESERVED_ALIASES)})")
    return alias


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def resolve_artifact_arg(text: str | Path, registry=None) -> Path:
    """A command's artifact argument: an existing path as it is, `NAME@REF` as the registry's stored copy."""
    path = Path(text)
    if path.exists() or not looks_like_ref(str(text)):
        return path
    from inferforge.registry import Registry

    try:
        return (registry or Registry()).stored_copy(str(text))
    except ArtifactError:
        raise                   # the reference resolved; its stored copy is what is wrong (the message says so)
    except UserInputError as e:
        raise UserInputError(f"{text}: no such file or directory; as a registry reference: {e}") from None
