"""Administration of the document store: ``fhir-consent documents …``.

``shred --patient Patient/x --yes``
    **Crypto-shredding.** Deletes the patient's data key(s), every content key wrapped under
    them, their chunk rows and blob files. All of that patient's document content becomes
    unrecoverable at once — including copies in database backups, as long as the master key
    ring is not backed up together with them — while the Binary and DocumentReference resources
    (metadata) remain; downloads then answer 410 Gone. Without ``--yes`` it only reports what it
    would destroy. Irreversible.
``rotate-master-key [--prune]``
    Adds a new master key to the key ring file, makes it active and re-wraps every data key
    under it (the content is not re-encrypted). ``--prune`` then removes keys nothing uses —
    run it once every worker has picked up the new ring.
``rewrap``
    Re-wraps every data key under the active master key (after adding a key at the front of
    ``FHIR_CONSENT_DOCUMENTS_MASTER_KEYS``).
``gc [--older-than SECONDS]``
    Removes blob files (directory backend) and spool files that no blob references.

Output names counts and ids only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from fhir_consent.documents.config import DocumentSettings
from fhir_consent.documents.errors import DocumentError, MasterKeyError
from fhir_consent.documents.keys import DataKeyStore
from fhir_consent.documents.storage import BlobStore, ShredReport
from fhir_consent.documents.tables import document_blobs
from fhir_consent.documents.wiring import load_master_keys
from fhir_consent.fhir.services import system_clock
from fhir_consent.fhir.validation import is_valid_id
from fhir_consent.store.db import Database

__all__ = [
    "RotationReport",
    "add_parser",
    "gc",
    "parse_patient",
    "rewrap",
    "rotate_master_key",
    "shred",
]


def parse_patient(text: str) -> str:
    """``Patient/x`` or ``x`` → ``x`` (:class:`ValueError` otherwise)."""
    pid = text.removeprefix("Patient/")
    if not is_valid_id(pid):
        raise ValueError("expected Patient/<id>")
    return pid


def _store(db: Database, settings: DocumentSettings, clock: Callable[[], int]) -> BlobStore:
    return BlobStore(settings, db, DataKeyStore(None, clock), clock=clock)


def shred(
    db: Database,
    patient: str,
    settings: DocumentSettings | None = None,
    *,
    clock: Callable[[], int] = system_clock,
) -> ShredReport:
    """Crypto-shred ``patient``'s document content (see the module docstring). Needs no master
    key: destroying the data keys is enough. Files are deleted after the transaction commits."""
    pid = parse_patient(patient)
    store = _store(db, settings or DocumentSettings(), clock)
    with db.write() as conn:
        report = store.shred(conn, pid)
    store.delete_files(report.files)
    return report


def count_patient_blobs(db: Database, patient: str) -> int:
    """How many live blobs ``patient`` has (the dry run of :func:`shred`)."""
    b = document_blobs.c
    with db.read() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(document_blobs)
                .where(b.patient_id == parse_patient(patient), b.shredded.is_(None))
            ).scalar_one()
        )


@dataclass(frozen=True, slots=True)
class RotationReport:
    """The outcome of a master key rotation or re-wrap (key ids and counts only)."""

    active_kid: str
    rewrapped: int
    pruned: tuple[str, ...]


def rewrap(
    db: Database, settings: DocumentSettings, *, clock: Callable[[], int] = system_clock
) -> RotationReport:
    """Re-wrap every data key under the active master key."""
    ring = load_master_keys(settings, create=False)
    keys = DataKeyStore(ring, clock)
    with db.write() as conn:
        n = keys.rewrap_all(conn)
    return RotationReport(ring.active_kid, n, ())


def rotate_master_key(
    db: Database,
    settings: DocumentSettings,
    *,
    prune: bool = False,
    clock: Callable[[], int] = system_clock,
) -> RotationReport:
    """Add a master key to the key ring file, activate it, re-wrap all data keys; with
    ``prune`` drop the keys no data key uses any more."""
    if settings.master_keys is not None:
        raise MasterKeyError(
            "master keys come from FHIR_CONSENT_DOCUMENTS_MASTER_KEYS: put a new key first "
            "there, restart, then run 'fhir-consent documents rewrap'"
        )
    ring = load_master_keys(settings, create=False).rotate()
    keys = DataKeyStore(ring, clock)
    with db.write() as conn:
        n = keys.rewrap_all(conn)
        used = keys.master_kids_in_use(conn)
    pruned: tuple[str, ...] = ()
    if prune:
        unused = {k for k in ring.key_ids if k not in used and k != ring.active_kid}
        ring = ring.without(unused)
        pruned = tuple(sorted(unused))
    return RotationReport(ring.active_kid, n, pruned)


def gc(
    db: Database,
    settings: DocumentSettings,
    *,
    older_than_s: int = 3600,
    clock: Callable[[], int] = system_clock,
) -> int:
    """Remove orphan blob and spool files; returns how many."""
    store = _store(db, settings, clock)
    with db.read() as conn:
        return store.gc(conn, older_than_s=older_than_s)


# -- command line ---------------------------------------------------------------------------


def _database(args: argparse.Namespace) -> Database:
    from fhir_consent.config import Settings

    return Database(args.database_url or Settings().database_url, pool_size=1)


def _print(text: str) -> None:
    print(text)  # noqa: T201 - command output


def _cmd_shred(args: argparse.Namespace) -> int:
    try:
        parse_patient(args.patient)
    except ValueError:
        _print("error: --patient must be Patient/<id>")
        return 2
    db = _database(args)
    try:
        if not args.yes:
            n = count_patient_blobs(db, args.patient)
            _print(f"would destroy {n} stored content blob(s) of {args.patient}; add --yes")
            return 1
        report = shred(db, args.patient, DocumentSettings())
        _print(
            f"shredded {args.patient}: {report.data_keys} data key(s), {report.blobs} blob(s), "
            f"content of {len(report.binary_ids)} Binary resource(s) destroyed"
        )
        return 0
    finally:
        db.dispose()


def _cmd_rotate(args: argparse.Namespace) -> int:
    db = _database(args)
    try:
        report = rotate_master_key(db, DocumentSettings(), prune=args.prune)
    except DocumentError as exc:
        _print(f"error: {exc}")
        return 1
    finally:
        db.dispose()
    _print(
        f"active master key {report.active_kid}; re-wrapped {report.rewrapped} data key(s)"
        + (f"; removed {len(report.pruned)} unused key(s)" if report.pruned else "")
    )
    return 0


def _cmd_rewrap(args: argparse.Namespace) -> int:
    db = _database(args)
    try:
        report = rewrap(db, DocumentSettings())
    except DocumentError as exc:
        _print(f"error: {exc}")
        return 1
    finally:
        db.dispose()
    _print(f"active master key {report.active_kid}; re-wrapped {report.rewrapped} data key(s)")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    db = _database(args)
    try:
        n = gc(db, DocumentSettings(), older_than_s=args.older_than)
    finally:
        db.dispose()
    _print(f"removed {n} orphan file(s)")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``documents`` (with ``shred``, ``rotate-master-key``, ``rewrap``, ``gc``) to the
    ``fhir-consent`` command's subparsers; each sets ``func`` returning an exit code."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "documents", help="document store administration (crypto-shredding, master keys)"
    )
    sub = parser.add_subparsers(dest="documents_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help="overrides FHIR_CONSENT_DATABASE_URL")

    p = sub.add_parser(
        "shred",
        help="crypto-shred a patient's document content (irreversible)",
        description="Delete the patient's data keys: all their document content becomes "
        "unrecoverable. Without --yes, only report what would be destroyed.",
    )
    p.add_argument("--patient", required=True, help="Patient/<id>")
    p.add_argument("--yes", action="store_true", help="really destroy the content")
    common(p)
    p.set_defaults(func=_cmd_shred)

    p = sub.add_parser("rotate-master-key", help="add and activate a master key, re-wrap keys")
    p.add_argument("--prune", action="store_true", help="then remove unused master keys")
    common(p)
    p.set_defaults(func=_cmd_rotate)

    p = sub.add_parser("rewrap", help="re-wrap all data keys under the active master key")
    common(p)
    p.set_defaults(func=_cmd_rewrap)

    p = sub.add_parser("gc", help="remove orphan blob and spool files")
    p.add_argument("--older-than", type=int, default=3600, help="seconds (default 3600)")
    common(p)
    p.set_defaults(func=_cmd_gc)
    return parser
