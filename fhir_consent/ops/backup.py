"""Backup and restore of a whole installation: database, document blobs and keys
(``fhir-consent backup create|restore|verify``, docs/operations.md "Backup and restore").

A backup is a directory (created 0700)::

    manifest.json        format, time, source backend, schema revision, rows per table, and
                         the size and SHA-256 of every other file
    database.sqlite3     every table, as one SQLite database at the source's schema revision
    blobs/ab/<id>.blob   encrypted document content of the 'dir' backend (ciphertext, as stored)
    keys/smart/…         SMART signing keys, keys/ledger/… the ledger key ring,
    keys/documents/…     the document master key ring (unless --no-keys; see below)

**Database.** A SQLite source is copied with SQLite's online backup API (a consistent
snapshot while the server runs). A PostgreSQL source is exported through SQLAlchemy inside one
``REPEATABLE READ, READ ONLY`` transaction (a consistent snapshot, no lock on writers) into a
SQLite file migrated to the same revision. One format for both means a backup restores into
either backend (a SQLite installation can move to PostgreSQL this way), needs no client tools
matching the server's version, and can be inspected with ``sqlite3``. Rows are copied through
the tables' own SQLAlchemy types, so JSON, binary and boolean columns keep their values.

**Blobs** are copied after the database snapshot, exactly those its ``document_blobs`` rows
name (not crypto-shredded, 'dir' backend); a missing file fails the backup.

**Keys.** With its keys a backup can decrypt every document: keep it like the keys themselves,
or pass ``--no-keys`` and back the keys up apart (keys given by environment variables —
``FHIR_CONSENT_SMART_JWKS``, ``FHIR_CONSENT_SIGNING_KEY``, ``FHIR_CONSENT_DOCUMENTS_MASTER_KEYS``
— are never in a backup; the manifest says which kinds it holds).

**Restore** checks every checksum first, then writes into an *empty* target only: a database
without the server's tables (or freshly migrated, with nothing stored), a blob directory
without those blobs, key locations that are empty or hold the very same keys. The database is
migrated to the backup's revision, filled, then migrated to this code's head; PostgreSQL
sequences are moved past the restored ids. Nothing existing is ever overwritten.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fhir_consent.config import Settings
from fhir_consent.documents.config import DocumentSettings
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.store.db import json_deserializer, json_serializer, normalize_url
from fhir_consent.store.migrate import upgrade

__all__ = [
    "FORMAT",
    "BackupError",
    "Manifest",
    "create_backup",
    "restore_backup",
    "verify_backup",
]

FORMAT: Final = "fhir-consent-backup/1"
MANIFEST: Final = "manifest.json"
DATABASE: Final = "database.sqlite3"
_CHUNK: Final = 1 << 20
_ROWS: Final = 1000


class BackupError(Exception):
    """A backup cannot be made, verified or restored; the message says why (no content)."""


@dataclass(slots=True)
class Manifest:
    """What a backup holds (``manifest.json``)."""

    created: str
    source_backend: str
    revision: str
    tables: dict[str, int]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    blobs: int = 0
    format: str = FORMAT

    def dumps(self) -> bytes:
        doc = {
            "format": self.format,
            "created": self.created,
            "source_backend": self.source_backend,
            "revision": self.revision,
            "tables": self.tables,
            "blobs": self.blobs,
            "keys": self.keys,
            "files": self.files,
        }
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        try:
            doc = orjson.loads((directory / MANIFEST).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            raise BackupError(f"{directory / MANIFEST} is missing or not JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BackupError(f"{directory} is not a {FORMAT} backup")
        return cls(
            created=str(doc["created"]),
            source_backend=str(doc["source_backend"]),
            revision=str(doc["revision"]),
            tables={str(k): int(v) for k, v in doc["tables"].items()},
            files=dict(doc["files"]),
            keys=list(doc.get("keys", [])),
            blobs=int(doc.get("blobs", 0)),
        )


# -- tables ------------------------------------------------------------------------------------


def _tables() -> list[sa.Table]:
    """Every table of the server, parents before children."""
    from fhir_consent.consent import tables as _consent  # noqa: F401 - registers its tables
    from fhir_consent.documents import tables as _documents  # noqa: F401
    from fhir_consent.ledger import tables as _ledger  # noqa: F401
    from fhir_consent.store.tables import metadata
    from smart_on_fhir.tables import metadata as smart_metadata

    tables = [*metadata.tables.values(), *smart_metadata.tables.values()]
    return list(sa.sql.util.sort_tables(tables))


def _engine(url: str | sa.URL) -> Engine:
    return sa.create_engine(
        url,
        poolclass=sa.NullPool,
        json_serializer=json_serializer,
        json_deserializer=json_deserializer,
    )


def _sqlite_path(url: str) -> Path | None:
    parsed = sa.make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise BackupError("an in-memory SQLite database cannot be backed up or restored")
    return Path(parsed.database)


def _revision(conn: Connection) -> str:
    found = [
        str(v) for v in conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
    ]
    if len(found) != 1:
        raise BackupError(f"the database has {len(found)} schema revisions, expected one")
    return found[0]


def _check_known_tables(conn: Connection, tables: Sequence[sa.Table]) -> None:
    present = set(sa.inspect(conn).get_table_names()) - {"alembic_version"}
    unknown = present - {t.name for t in tables}
    if unknown:
        raise BackupError(f"tables unknown to this version: {', '.join(sorted(unknown))}")


def _counts(conn: Connection, tables: Sequence[sa.Table]) -> dict[str, int]:
    names = set(sa.inspect(conn).get_table_names())
    return {
        str(t.name): int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar() or 0)
        for t in tables
        if t.name in names
    }


def _copy_rows(src: Connection, dst: Connection, tables: Sequence[sa.Table]) -> None:
    names = set(sa.inspect(src).get_table_names())
    for table in reversed(tables):  # seed rows of the migrations (ledger_head) make way
        dst.execute(table.delete())
    for table in tables:
        if table.name not in names:
            continue
        pk = list(table.primary_key.columns) or list(table.columns)
        result = src.execution_options(yield_per=_ROWS).execute(sa.select(table).order_by(*pk))
        for part in result.partitions():
            dst.execute(table.insert(), [dict(row._mapping) for row in part])


def _reset_sequences(conn: Connection, tables: Iterable[sa.Table]) -> None:
    """Move PostgreSQL sequences past the restored ids."""
    for table in tables:
        column = table.autoincrement_column
        if column is None:
            continue
        conn.execute(
            sa.text(
                f"SELECT setval(pg_get_serial_sequence(:t, :c), "
                f'COALESCE((SELECT MAX("{column.name}") FROM "{table.name}"), 0) + 1, false)'
            ),
            {"t": table.name, "c": column.name},
        )


# -- files -------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def _copy_file(src: Path, dst: Path) -> None:
    _private_dir(dst.parent)
    shutil.copyfile(src, dst)
    dst.chmod(stat.S_IMODE(src.stat().st_mode) & 0o600 or 0o600)


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and ".lock" not in path.name:
            yield path


@dataclass(frozen=True, slots=True)
class _KeyPlace:
    kind: str
    source: Path  # a directory, or a single file
    in_env: bool


def _key_places(
    settings: Settings, ledger: LedgerSettings, documents: DocumentSettings
) -> list[_KeyPlace]:
    from fhir_consent.crypto import ENV_SIGNING_KEY

    env_ledger = bool(os.environ.get(ENV_SIGNING_KEY) or os.environ.get(f"{ENV_SIGNING_KEY}_FILE"))
    return [
        _KeyPlace("smart", Path(settings.smart_keys_dir), settings.smart_jwks is not None),
        _KeyPlace("ledger", Path(ledger.keys_dir), env_ledger),
        _KeyPlace("documents", documents.master_key_file, documents.master_keys is not None),
    ]


# -- create ------------------------------------------------------------------------------------


def _backup_sqlite(path: Path, target: Path) -> None:
    if not path.is_file():
        raise BackupError(f"no SQLite database at {path}")
    src = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    finally:
        dst.close()
        src.close()


def _backup_postgresql(url: str, target: Path, tables: Sequence[sa.Table]) -> None:
    source = _engine(normalize_url(url))
    try:
        with source.connect() as probe:
            revision = _revision(probe)
        dst_url = f"sqlite:///{target}"
        upgrade(dst_url, revision)
        dst = _engine(dst_url)
        try:
            with (
                source.connect().execution_options(isolation_level="REPEATABLE READ") as src,
                src.begin(),
                dst.begin() as out,
            ):
                src.execute(sa.text("SET TRANSACTION READ ONLY"))
                if _revision(src) != revision:
                    raise BackupError("the schema changed while the backup started")
                _check_known_tables(src, tables)
                _copy_rows(src, out, tables)
        finally:
            dst.dispose()
    finally:
        source.dispose()


def _dir_blobs(conn: Connection) -> list[str]:
    from fhir_consent.documents.tables import document_blobs

    b = document_blobs.c
    rows = conn.execute(
        sa.select(b.blob_id).where(b.backend == "dir", b.shredded.is_(None)).order_by(b.blob_id)
    )
    return [str(r[0]) for r in rows]


def create_backup(
    directory: Path,
    *,
    settings: Settings,
    documents: DocumentSettings,
    ledger: LedgerSettings,
    include_keys: bool = True,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Manifest:
    """Back everything up into ``directory`` (new, or empty); see the module docstring."""
    if directory.exists() and any(directory.iterdir()):
        raise BackupError(f"{directory} is not empty")
    _private_dir(directory)
    tables = _tables()
    database = directory / DATABASE
    sqlite_path = _sqlite_path(settings.database_url)
    if sqlite_path is not None:
        _backup_sqlite(sqlite_path, database)
        backend = "sqlite"
    else:
        _backup_postgresql(settings.database_url, database, tables)
        backend = "postgresql"
    copy = _engine(f"sqlite:///{database}")
    try:
        with copy.connect() as conn:
            _check_known_tables(conn, tables)
            revision = _revision(conn)
            counts = _counts(conn, tables)
            blob_ids = _dir_blobs(conn)
    finally:
        copy.dispose()

    root = documents.resolved_blob_dir()
    for blob_id in blob_ids:
        src = root / blob_id[:2] / f"{blob_id}.blob"
        if not src.is_file():
            raise BackupError(f"blob {blob_id} is in the database but its file is missing")
        _copy_file(src, directory / "blobs" / blob_id[:2] / f"{blob_id}.blob")

    kinds: list[str] = []
    if include_keys:
        for place in _key_places(settings, ledger, documents):
            if place.in_env or not place.source.exists():
                continue
            target = directory / "keys" / place.kind
            if place.source.is_dir():
                for path in _files(place.source):
                    _copy_file(path, target / path.relative_to(place.source))
            else:
                _copy_file(place.source, target / place.source.name)
            kinds.append(place.kind)

    manifest = Manifest(
        created=now().isoformat(timespec="seconds").replace("+00:00", "Z"),
        source_backend=backend,
        revision=revision,
        tables=counts,
        keys=kinds,
        blobs=len(blob_ids),
    )
    for path in _files(directory):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            manifest.files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    out = directory / MANIFEST
    out.write_bytes(manifest.dumps())
    out.chmod(0o600)
    return manifest


# -- verify ------------------------------------------------------------------------------------


def verify_backup(directory: Path) -> list[str]:
    """Problems of a backup (empty when every file is there with its checksum)."""
    manifest = Manifest.load(directory)
    problems: list[str] = []
    for rel, meta in sorted(manifest.files.items()):
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != meta["size"] or _sha256(path) != meta["sha256"]:
            problems.append(f"{rel}: checksum mismatch")
    listed = set(manifest.files) | {MANIFEST}
    problems += [
        f"{rel}: not in the manifest"
        for rel in (p.relative_to(directory).as_posix() for p in _files(directory))
        if rel not in listed
    ]
    if DATABASE not in manifest.files:
        problems.append(f"{DATABASE}: not in the manifest")
    return problems


# -- restore -----------------------------------------------------------------------------------


def _target_state(conn: Connection, tables: Sequence[sa.Table]) -> str | None:
    """None for a database without our tables; its revision when freshly migrated (nothing
    stored); BackupError when it holds data."""
    names = set(sa.inspect(conn).get_table_names())
    ours = names & ({t.name for t in tables} | {"alembic_version"})
    if not ours:
        return None
    counts = _counts(conn, tables)
    head = (
        conn.execute(sa.text("SELECT size FROM ledger_head")).scalars().all()
        if ("ledger_head" in names)
        else []
    )
    stored = {name: n for name, n in counts.items() if n and name != "ledger_head"}
    if stored or any(int(size) for size in head):
        raise BackupError(
            "the target database is not empty (" + ", ".join(sorted(stored) or ["ledger"]) + ")"
        )
    return _revision(conn) if "alembic_version" in names else None


def _restore_database(directory: Path, url: str, manifest: Manifest) -> None:
    tables = _tables()
    target_path = _sqlite_path(url)
    backup_file = directory / DATABASE
    if target_path is not None and (not target_path.exists() or target_path.stat().st_size == 0):
        target_path.parent.mkdir(parents=True, exist_ok=True)
        copy_from = sqlite3.connect(f"file:{backup_file.resolve()}?mode=ro", uri=True)
        copy_to = sqlite3.connect(target_path)
        try:
            copy_from.backup(copy_to)
            copy_to.execute("PRAGMA journal_mode=WAL")
        finally:
            copy_to.close()
            copy_from.close()
    else:
        target = _engine(normalize_url(url))
        try:
            with target.connect() as conn:
                revision = _target_state(conn, tables)
            if revision is not None and revision != manifest.revision:
                raise BackupError(
                    f"the target database is at revision {revision}, the backup at "
                    f"{manifest.revision}: restore into a database without tables"
                )
            upgrade(url, manifest.revision)
            source = _engine(
                sa.make_url(f"sqlite:///file:{backup_file.resolve()}?mode=ro&uri=true")
            )
            try:
                with source.connect() as src, target.begin() as dst:
                    _copy_rows(src, dst, tables)
                    if dst.dialect.name == "postgresql":
                        _reset_sequences(dst, tables)
            finally:
                source.dispose()
        finally:
            target.dispose()
    upgrade(url)  # this code's head
    check = _engine(normalize_url(url))
    try:
        with check.connect() as conn:
            counts = _counts(conn, tables)
    finally:
        check.dispose()
    wrong = [name for name, n in manifest.tables.items() if counts.get(name) != n]
    if wrong:
        raise BackupError(f"restored row counts differ from the backup's: {', '.join(wrong)}")


def _same_file(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and _sha256(a) == _sha256(b)


def _plan_copy(pairs: Iterable[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """The copies to make; BackupError when a destination exists with other content."""
    todo: list[tuple[Path, Path]] = []
    for src, dst in pairs:
        if dst.exists():
            if not dst.is_file() or not _same_file(src, dst):
                raise BackupError(f"{dst} exists and differs from the backup's: not overwritten")
            continue
        todo.append((src, dst))
    return todo


def restore_backup(
    directory: Path,
    *,
    settings: Settings,
    documents: DocumentSettings,
    ledger: LedgerSettings,
) -> Manifest:
    """Restore ``directory`` into the installation ``settings`` describe (see the module
    docstring). Checks every checksum, and every destination, before writing anything."""
    problems = verify_backup(directory)
    if problems:
        raise BackupError("the backup is damaged: " + "; ".join(problems[:10]))
    manifest = Manifest.load(directory)

    copies: list[tuple[Path, Path]] = []
    blobs = directory / "blobs"
    if blobs.is_dir():
        root = documents.resolved_blob_dir()
        copies += _plan_copy((p, root / p.relative_to(blobs)) for p in _files(blobs))
    for place in _key_places(settings, ledger, documents):
        src_dir = directory / "keys" / place.kind
        if place.kind not in manifest.keys or not src_dir.is_dir():
            continue
        if place.in_env:
            continue  # the environment supplies these keys; nothing to put on disk
        if place.kind == "documents":
            pairs = [(p, place.source) for p in _files(src_dir)][:1]
        else:
            pairs = [(p, place.source / p.relative_to(src_dir)) for p in _files(src_dir)]
        copies += _plan_copy(pairs)

    _restore_database(directory, settings.database_url, manifest)
    for src, dst in copies:
        _copy_file(src, dst)
    return manifest
