"""The model registry: named, numbered versions of artifacts, aliases that move, and who moved them.

A registry is a directory (`INFERFORGE_REGISTRY`, default `$XDG_DATA_HOME/inferforge/registry` or
`~/.local/share/inferforge/registry`) with two things in it:

    objects/<content version>/   an immutable, read-only copy of an artifact, named by its manifest's
                                 `version` (the hash of its files); written beside, then renamed in
    registry.db                  SQLite (WAL): names, versions, aliases, owners, timestamps and
                                 every alias move

Every write is one short `BEGIN IMMEDIATE` transaction, so processes that add and promote at the same
time are serialized by SQLite and none loses an update: version numbers per name are 1, 2, 3... in
the order the adds committed (a removed version's number is never given out again), and each alias
move is a row (who, when, from which version to which). The slow part of an add, copying and
hashing the files, happens before the transaction in a staging directory; the rename into
`objects/` happens inside it, so a reader never sees a half-written version.

References: `NAME` (the latest version), `NAME@3` (version 3), `NAME@ALIAS`.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from inferforge.errors import ArtifactError, UserInputError
from inferforge.manifest import MANIFEST_NAME, SIGNATURE_NAME, manifest_digest, read_manifest, verify_artifact
from inferforge.registry_refs import (
    check_alias,
    check_name,
    default_root,
    did_you_mean,
    parse_ref,
    parse_time,
)

SCHEMA_VERSION = 1
DB_NAME = "registry.db"
OBJECTS = "objects"

_SCHEMA = """
CREATE TABLE models (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL, created TEXT NOT NULL);
CREATE TABLE versions (
    name TEXT NOT NULL REFERENCES models(name), version INTEGER NOT NULL, content TEXT NOT NULL,
    kind TEXT, artifact_name TEXT, manifest_sha256 TEXT NOT NULL, owner TEXT NOT NULL, created TEXT NOT NULL,
    added_from TEXT, PRIMARY KEY (name, version), UNIQUE (name, content));
CREATE INDEX versions_content ON versions(content);
CREATE TABLE aliases (name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (name, alias));
CREATE TABLE alias_events (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, alias TEXT NOT NULL,
    from_version INTEGER, to_version INTEGER, owner TEXT NOT NULL, at TEXT NOT NULL);
CREATE INDEX alias_events_name ON alias_events(name, alias, id);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class Version:
    """One registered version: `path` is the stored, read-only copy (`objects/<content>`)."""

    name: str
    version: int
    content: str            # the manifest's `version`: the hash of the artifact's files
    path: Path
    kind: str | None
    artifact_name: str | None
    manifest_sha256: str
    owner: str
    created: str
    added_from: str | None
    aliases: list[str] = field(default_factory=list)
    existing: bool = False  # add() found this content already registered under the name

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path), "ref": self.ref}


class Registry:
    """The registry at `root` (see the module docstring). Safe to use from several processes at once."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.objects = self.root / OBJECTS
        self.db_path = self.root / DB_NAME

    # -- storage ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self, *, write: bool):
        """A connection in autocommit mode; `write` creates the registry when it does not exist yet."""
        if write:
            try:
                self.objects.mkdir(parents=True, exist_ok=True)
                probe = tempfile.NamedTemporaryFile(dir=self.objects, prefix=".probe-")
                probe.close()
            except OSError as e:
                raise UserInputError(f"registry {self.root}: cannot write there ({e.strerror or e}); set "
                                     "INFERFORGE_REGISTRY to a writable directory") from None
        elif not self.db_path.is_file():
            raise self._empty()
        conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA foreign_keys = ON")
            if write:
                self._migrate(conn)
            elif conn.execute("PRAGMA user_version").fetchone()[0] == 0:   # being created right now
                raise self._empty()
            yield conn
        except sqlite3.OperationalError as e:
            raise UserInputError(f"registry {self.db_path}: {e}; check that the directory is writable and on a "
                                 "local disk") from None
        finally:
            conn.close()

    def _empty(self) -> UserInputError:
        return UserInputError(f"registry {self.root} is empty; register an artifact with `inferforge registry add "
                              "ARTIFACT --name NAME`, or set INFERFORGE_REGISTRY to the registry you mean")

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        _enable_wal(conn)
        with _transaction(conn):
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current == 0:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif current != SCHEMA_VERSION:
                raise UserInputError(f"registry database: schema version {current}, this inferforge reads "
                                     f"{SCHEMA_VERSION}; upgrade inferforge")

    def object_path(self, content: str) -> Path:
        return self.objects / content

    def _stage_copy(self, artifact: Path, manifest: dict) -> Path:
        """Copy the artifact's files into a staging directory under objects/, verify the copy, make it read-only."""
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{manifest['version']}-", dir=self.objects))
        try:
            for rel in [*manifest["files"], MANIFEST_NAME, SIGNATURE_NAME]:
                src = artifact / rel
                if src.is_file():
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, staging / rel)
            copied = verify_artifact(staging)   # what is stored is what was verified
            if copied.get("manifest_sha256") != manifest.get("manifest_sha256"):
                raise ArtifactError(f"{artifact}: the artifact changed while it was copied; make sure nothing "
                                    "writes to it and add it again")
            for path in staging.rglob("*"):
                if path.is_file():
                    path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            staging.chmod(0o755)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    # -- writes ----------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """UserInputError unless `add` could write here: the registry exists and is writable, or the nearest
        existing directory above it is (so it can be created). Creates nothing but a probe file it removes."""
        path = self.root
        while not path.exists() and path != path.parent:
            path = path.parent
        target = self.objects if self.objects.is_dir() else path
        try:
            if not target.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{target} is not a directory")
            tempfile.NamedTemporaryFile(dir=target, prefix=".probe-").close()
            if self.db_path.exists() and not os.access(self.db_path, os.W_OK):
                raise PermissionError(errno.EACCES, f"{self.db_path} is read-only")
        except OSError as e:
            raise UserInputError(f"registry {self.root}: cannot write there ({e.strerror or e}); set "
                                 "INFERFORGE_REGISTRY to a writable directory") from None

    def add(self, artifact_dir: str | Path, name: str, alias: str | None = None, owner: str | None = None) -> Version:
        """Register the artifact directory under `name`; returns the new version (numbered 1, 2, ... per
        name), or the existing one (`existing=True`) when the same content is already registered under
        `name`. The artifact is verified first (a tampered one raises ArtifactError) and copied into
        `objects/`. With `alias`, the alias then points at the returned version."""
        check_name(name)
        if alias is not None:
            check_alias(alias)
        owner = owner or _os_user()
        artifact = Path(artifact_dir).resolve()
        manifest = verify_artifact(artifact)
        content = manifest["version"]
        with self._connect(write=True) as conn:
            row = conn.execute("SELECT version FROM versions WHERE name = ? AND content = ?", (name, content)).fetchone()
            staging = None if row else self._stage_copy(artifact, manifest)
            try:
                with _transaction(conn):
                    row = conn.execute("SELECT version FROM versions WHERE name = ? AND content = ?",
                                       (name, content)).fetchone()
                    existing = row is not None
                    if existing:
                        number = row["version"]
                    else:
                        stored = self._place_object(conn, content, staging or self._stage_copy(artifact, manifest))
                        number = self._next_version(conn, name)
                        conn.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                     (name, number, content, stored.get("kind"), stored.get("name"),
                                      stored["manifest_sha256"], owner, _now(), str(artifact)))
                    if alias is not None:
                        self._move_alias(conn, name, alias, number, owner)
            finally:
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)   # gone already when it was renamed into place
            version = self._get(conn, name, number)
        version.existing = existing
        return version

    def _place_object(self, conn, content: str, staging: Path) -> dict:
        """Inside the write transaction: rename the staged copy to objects/<content>, unless a copy that a
        version refers to is there already (the same files; its manifest is kept, `verify` checks it).
        Returns the kind, name and manifest_sha256 of the manifest that is stored."""
        target = self.object_path(content)
        if target.exists():
            row = conn.execute("SELECT kind, artifact_name AS name, manifest_sha256 FROM versions WHERE content = ? "
                               "LIMIT 1", (content,)).fetchone()
            if row is not None:
                return dict(row)
            _remove_tree(target)   # left by an add that died before it committed
        staging.rename(target)
        manifest = read_manifest(target)
        return {"kind": manifest.get("kind"), "name": manifest.get("name"), "manifest_sha256": manifest["manifest_sha256"]}

    @staticmethod
    def _next_version(conn, name: str) -> int:
        row = conn.execute("SELECT last_version FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO models VALUES (?, 1, ?)", (name, _now()))
            return 1
        conn.execute("UPDATE models SET last_version = ? WHERE name = ?", (row[0] + 1, name))
        return row[0] + 1

    def _move_alias(self, conn, name: str, alias: str, version: int | None, owner: str) -> None:
        row = conn.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
        previous = row["version"] if row else None
        if previous == version:
            return
        if version is None:
            conn.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
        else:
            conn.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (name, alias, version))
        conn.execute("INSERT INTO alias_events (name, alias, from_version, to_version, owner, at) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (name, alias, previous, version, owner, _now()))

    def alias(self, name: str, version: int, alias: str, owner: str | None = None) -> Version:
        """Point `NAME@ALIAS` at version `version` (recorded with its owner and time); returns that version."""
        check_alias(alias)
        with self._connect(write=True) as conn, _transaction(conn):
            self._lookup(conn, name, int(version))
            self._move_alias(conn, name, alias, int(version), owner or _os_user())
            return self._get(conn, name, int(version))

    def remove_alias(self, name: str, alias: str, owner: str | None = None) -> None:
        """Delete `NAME@ALIAS` (recorded like a move, to no version)."""
        with self._connect(write=True) as conn, _transaction(conn):
            self._lookup(conn, name, alias)
            self._move_alias(conn, name, alias, None, owner or _os_user())

    def remove(self, name: str, version: int) -> None:
        """Delete version `version` of `name`; refused while an alias points at it. Its stored copy is
        deleted when no other version (of any name) uses the same content. The number is not reused."""
        with self._connect(write=True) as conn:
            with _transaction(conn):
                found = self._lookup(conn, name, int(version))
                if found.aliases:
                    raise UserInputError(
                        f"{found.ref} is what {', '.join(f'{name}@{a}' for a in found.aliases)} points at; move the "
                        f"alias first (`inferforge registry alias {name}@OTHER_VERSION {found.aliases[0]}`) or "
                        f"delete it (`inferforge registry unalias {name} {found.aliases[0]}`)")
                conn.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, found.version))
                garbage = None
                if not conn.execute("SELECT 1 FROM versions WHERE content = ?", (found.content,)).fetchone():
                    target = self.object_path(found.content)
                    if target.exists():
                        garbage = self.objects / f".removed-{found.content}-{os.getpid()}"
                        target.rename(garbage)
            if garbage is not None:
                _remove_tree(garbage)

    # -- reads -----------------------------------------------------------------------------------

    def resolve(self, ref: str, *, at: str | None = None) -> Version:
        """The version `ref` names (`NAME`, `NAME@3`, `NAME@ALIAS`). With `at` (ISO time), an alias is
        resolved as it pointed then (`alias_history`)."""
        name, which = parse_ref(ref)
        with self._connect(write=False) as conn:
            if at is not None and isinstance(which, str):
                when = parse_time(at)
                row = conn.execute("SELECT to_version FROM alias_events WHERE name = ? AND alias = ? AND at <= ? "
                                   "ORDER BY id DESC LIMIT 1", (name, which, when)).fetchone()
                if row is None or row["to_version"] is None:
                    self._lookup_name(conn, name)
                    raise UserInputError(f"{name}@{which} pointed at no version at {when}")
                which = row["to_version"]
            return self._lookup(conn, name, which)

    def stored_copy(self, ref: str) -> Path:
        """The stored copy of `ref`, after checking that it holds the artifact that was registered: its manifest
        must be intact (digest) and carry the registered content version and manifest hash. Its files are then
        checked against that manifest by whoever loads it (`inferforge.load`, `verify_artifact`)."""
        version = self.resolve(ref)
        damaged = (f"the registry's copy of {version.ref} (for {ref}) at {version.path}")
        fix = (f"run `inferforge registry verify {version.ref}`, then re-add the artifact under a new version or "
               "restore the registry directory from a backup")
        try:
            manifest = read_manifest(version.path)
            recorded = manifest.get("manifest_sha256")
            if recorded is None or recorded != manifest_digest(manifest):
                raise ArtifactError("its manifest was edited")
        except ArtifactError as e:
            reason = "is missing" if not version.path.exists() else f"is damaged ({str(e).split(': ', 1)[-1]})"
            raise ArtifactError(f"{damaged} {reason}; {fix}") from None
        if manifest.get("version") != version.content or manifest.get("manifest_sha256") != version.manifest_sha256:
            raise ArtifactError(f"{damaged} holds another artifact (content {manifest.get('version')}) than the one "
                                f"registered (content {version.content}); {fix}")
        return version.path

    def list(self, name: str | None = None) -> list[Version]:
        """Every version (of `name`), by name and number."""
        if not self.db_path.is_file():
            return []
        with self._connect(write=False) as conn:
            if name is not None:
                self._lookup_name(conn, name)
            rows = conn.execute("SELECT name, version FROM versions WHERE ? IS NULL OR name = ? ORDER BY name, version",
                                (name, name)).fetchall()
            return [self._get(conn, r["name"], r["version"]) for r in rows]

    def show(self, ref: str, *, at: str | None = None) -> dict:
        """The version `ref` names, with its manifest (read from the stored copy, not verified; see `verify`)."""
        version = self.resolve(ref, at=at)
        try:
            manifest = read_manifest(version.path)
        except ArtifactError as e:
            manifest = {"error": str(e)}
        return {**version.to_dict(), "manifest": manifest}

    def alias_history(self, name: str, alias: str | None = None) -> list[dict]:
        """Every move of the aliases of `name` (or of one alias), oldest first: alias, from_version,
        to_version (None when deleted), owner, at (UTC)."""
        with self._connect(write=False) as conn:
            self._lookup_name(conn, name)
            rows = conn.execute("SELECT alias, from_version, to_version, owner, at FROM alias_events WHERE name = ? "
                                "AND (? IS NULL OR alias = ?) ORDER BY id", (name, alias, alias)).fetchall()
            return [dict(r) for r in rows]

    def find_content(self, content: str) -> list[Version]:
        """Registered versions (of any name) whose files have the manifest version `content`."""
        if not self.db_path.is_file():
            return []
        with self._connect(write=False) as conn:
            rows = conn.execute("SELECT name, version FROM versions WHERE content = ? ORDER BY name, version",
                                (content,)).fetchall()
            return [self._get(conn, r["name"], r["version"]) for r in rows]

    def lineage(self, ref: str) -> dict:
        """The tree of parents of `ref` back to the source checkpoint; see `inferforge.registry_lineage`."""
        from inferforge.registry_lineage import lineage

        return lineage(self, self.resolve(ref))

    def verify(self, ref: str | None = None) -> list[str]:
        """Check the stored copy of `ref` (or of every version) against its manifest; returns one line per
        problem (a missing or changed copy, or a manifest that is not the one registered), empty when all is well."""
        versions = [self.resolve(ref)] if ref is not None else self.list()
        problems = []
        for v in versions:
            try:
                manifest = verify_artifact(v.path)
                if manifest["version"] != v.content or manifest.get("manifest_sha256") != v.manifest_sha256:
                    raise ArtifactError(f"{v.path}: holds another artifact than the one registered")
            except ArtifactError as e:
                problems.append(f"{v.ref} (content {v.content}): {e}")
        return problems

    def _lookup_name(self, conn, name: str) -> None:
        if conn.execute("SELECT 1 FROM versions WHERE name = ? LIMIT 1", (name,)).fetchone() is None:
            names = [r[0] for r in conn.execute("SELECT DISTINCT name FROM versions")]
            raise UserInputError(f"no model named {name!r} in the registry {self.root}{did_you_mean(name, names)}"
                                 + ("" if names else " (it is empty)"))

    def _lookup(self, conn, name: str, which: int | str | None) -> Version:
        self._lookup_name(conn, name)
        if which is None:
            number = conn.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()[0]
        elif isinstance(which, int):
            number = which
            if conn.execute("SELECT 1 FROM versions WHERE name = ? AND version = ?", (name, number)).fetchone() is None:
                numbers = [str(r[0]) for r in conn.execute("SELECT version FROM versions WHERE name = ?", (name,))]
                raise UserInputError(f"{name} has no version {number}; its versions are {', '.join(numbers)}")
        else:
            row = conn.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, which)).fetchone()
            if row is None:
                aliases = [r[0] for r in conn.execute("SELECT alias FROM aliases WHERE name = ?", (name,))]
                known = f" (its aliases: {', '.join(aliases)})" if aliases else " (it has no aliases)"
                raise UserInputError(f"{name} has no alias {which!r}{did_you_mean(which, aliases)}{known}")
            number = row["version"]
        return self._get(conn, name, number)

    def _get(self, conn, name: str, number: int) -> Version:
        row = conn.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, number)).fetchone()
        aliases = [r[0] for r in conn.execute("SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias",
                                              (name, number))]
        return Version(name=row["name"], version=row["version"], content=row["content"],
                       path=self.object_path(row["content"]), kind=row["kind"], artifact_name=row["artifact_name"],
                       manifest_sha256=row["manifest_sha256"], owner=row["owner"], created=row["created"],
                       added_from=row["added_from"], aliases=aliases)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection):
    """`BEGIN IMMEDIATE` (take the write lock now, waiting up to busy_timeout) ... COMMIT, or ROLLBACK."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _enable_wal(conn: sqlite3.Connection, wait_s: float = 60.0) -> None:
    """Switch the database to WAL (persistent; readers then run beside a writer). SQLite answers "locked"
    at once, without its busy handler, while another process switches it, so wait here instead."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _remove_tree(path: Path) -> None:
    """Remove a stored copy; its files are read-only, its directories are not."""
    shutil.rmtree(path, ignore_errors=True)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):   # no name for the uid (a container)
        return str(os.getuid())
