"""``fhir-consent ledger verify``: re-verify the whole ledger (ledger.md §2 "Auditable").

Checks, each failure named as one line in :attr:`VerifyReport.problems`:

1. **Entries** (ledger.md §1): ``seq`` runs 0, 1, 2, … with no gap up to the head's size; every
   entry is canonical, well-formed, signed by a known key (current or retired, by ``kid``), and
   its ``seq``, ``ref``, ``kind`` and ``ts`` match the row that stores it.
2. **Tree** (RFC 9162 §2.1.1): every stored node of ``ledger_node`` equals the hash recomputed
   from the entries (leaf = SHA-256(0x00 ‖ entry), node = SHA-256(0x01 ‖ left ‖ right)); no node
   is missing or extra; the head's compact range equals the recomputed one.
3. **Checkpoints** (C2SP tlog-checkpoint / signed-note): each stored note parses strictly,
   carries a verifying signature by a log key under the log's origin, matches its row, and its
   root equals the recomputed root at its size; consecutive checkpoints are consistent
   (RFC 9162 §2.1.4.2).
4. **Versions ↔ entries**: every Consent and DocumentReference version has its entry, every
   entry its version, and ``resource_sha256`` commits to exactly the stored version (a
   deletion to ``null``). With the key ring (``keyring=``): ``subject`` is the pseudonym of
   the version's patient under the key ``subject_kid`` names (a deletion: the patient of the
   version before it), ``rms_kid`` names an RMS key of this log, and — for every RMS key
   whose private half is held here — the sealed box opens and holds exactly that version.
   Retired keys count: a log stays verifiable across rotations of every key.
5. **External ledger** (when an engine is given): every anchored entry (``sent`` or
   ``confirmed``) is in its transaction on the chain, byte for byte; with ``scan_chain``, every
   transaction of ours on the chain is read and no entry appears twice.

Memory is O(size) hashes (about 64 bytes per entry); entries are streamed in chunks.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fhir_consent.crypto import KeyRing, PublicSigningKey, canonical_json_text, sha256_hex
from fhir_consent.ledger.checkpoint import CheckpointError, verify_checkpoint
from fhir_consent.ledger.engines.base import EngineError, LedgerEngine
from fhir_consent.ledger.entry import (
    KINDS,
    EntryError,
    LedgerEntry,
    check_subject,
    entry_from_bytes,
    open_sealed,
    verify_entry,
)
from fhir_consent.ledger.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    CompactRange,
    InvalidProofError,
    MemoryTreeStore,
    consistency_proof,
    leaf_hash,
    verify_consistency,
)
from fhir_consent.ledger.tables import (
    ledger_batch,
    ledger_checkpoint,
    ledger_entry,
    ledger_head,
    ledger_node,
    ledger_outbox,
)
from fhir_consent.store.db import Database
from fhir_consent.store.tables import resource_versions

__all__ = ["Progress", "VerifyReport", "verify_ledger"]

Progress = Callable[[str, int, int], None]
_CHUNK: Final = 1_000
_NULL_SHA: Final = sha256_hex(b"null")


@dataclass(slots=True)
class VerifyReport:
    """The outcome of :func:`verify_ledger`; ``ok`` when ``problems`` is empty."""

    problems: list[str] = field(default_factory=list)
    size: int = 0
    root: bytes = EMPTY_ROOT
    entries: int = 0
    nodes: int = 0
    checkpoints: int = 0
    versions: int = 0
    outbox: dict[str, int] = field(default_factory=dict)
    anchored_checked: int = 0
    subjects_checked: int = 0
    sealed_checked: int = 0
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.outbox.items())) or "none"
        return (
            f"log size {self.size}, root {self.root.hex()}; {self.entries} entries, "
            f"{self.nodes} tree nodes, {self.checkpoints} checkpoints, {self.versions} "
            f"Consent/DocumentReference versions; outbox: {counts}; "
            f"{self.anchored_checked} anchored entries checked on the external ledger; "
            f"{self.subjects_checked} subjects and {self.sealed_checked} sealed boxes checked"
        )


class _Report:
    def __init__(self, report: VerifyReport, limit: int) -> None:
        self.report = report
        self.limit = limit

    def add(self, problem: str) -> None:
        if len(self.report.problems) < self.limit:
            self.report.problems.append(problem)
        else:
            self.report.truncated = True


def _ts(us: int) -> str:
    dt = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC) + _dt.timedelta(microseconds=us)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _chunks(conn: Connection, total: int) -> Iterator[list[Any]]:
    e = ledger_entry.c
    last = -1
    while True:
        rows = conn.execute(
            sa.select(e.seq, e.ref, e.kind, e.ts, e.data)
            .where(e.seq > last)
            .order_by(e.seq)
            .limit(_CHUNK)
        ).all()
        if not rows:
            return
        yield list(rows)
        last = int(rows[-1].seq)


def _versions_for(conn: Connection, refs: list[tuple[str, str, int]]) -> dict[str, bytes | None]:
    v = resource_versions.c
    out: dict[str, bytes | None] = {}
    for start in range(0, len(refs), 200):
        part = refs[start : start + 200]
        cond = sa.or_(
            *(sa.and_(v.res_type == t, v.res_id == i, v.version_id == n) for t, i, n in part)
        )
        for row in conn.execute(
            sa.select(v.res_type, v.res_id, v.version_id, v.deleted, v.content).where(cond)
        ):
            ref = f"{row.res_type}/{row.res_id}/_history/{row.version_id}"
            out[ref] = None if row.deleted or row.content is None else bytes(row.content)
    return out


def _split_ref(ref: str) -> tuple[str, str, int] | None:
    parts = ref.split("/")
    if len(parts) != 4 or parts[2] != "_history" or not parts[3].isdigit():
        return None
    return parts[0], parts[1], int(parts[3])


def _check_keys(
    conn: Connection,
    ring: KeyRing,
    entries: list[tuple[Any, LedgerEntry | None]],
    versions: dict[str, bytes | None],
    report: VerifyReport,
    out: _Report,
) -> None:
    """Subjects, RMS key ids and (where the private key is here) sealed boxes of a chunk."""
    from fhir_consent.ledger.service import patient_reference

    pseudonym_keys = ring.pseudonym_keys()
    rms_ids = set(ring.rms_public_keys())
    rms_pairs = ring.rms_keypairs()
    previous: dict[str, bytes | None] = {}
    wanted = []
    for row, entry in entries:
        split = _split_ref(row.ref)
        if entry is not None and entry.event == "deleted" and split and split[2] > 1:
            wanted.append((split[0], split[1], split[2] - 1))
    if wanted:
        previous = _versions_for(conn, wanted)
    for row, entry in entries:
        if entry is None or row.ref not in versions:
            continue
        content = versions[row.ref]
        if content is None:  # a deletion: the patient of the version before it
            split = _split_ref(row.ref)
            if split is not None:
                content = previous.get(f"{split[0]}/{split[1]}/_history/{split[2] - 1}")
        try:
            resource = orjson.loads(content) if content is not None else None
        except orjson.JSONDecodeError:
            resource = None  # reported above (resource_sha256)
        try:
            check_subject(entry, patient_reference(resource), pseudonym_keys)
            report.subjects_checked += 1
        except EntryError as exc:
            out.add(str(exc))
        if entry.rms_kid is not None and entry.rms_kid not in rms_ids:
            out.add(f"entry {entry.seq}: sealed to RMS key {entry.rms_kid}, not a key of this log")
            continue
        if entry.rms_kid is None and not rms_pairs:
            continue
        if entry.rms_kid is not None and entry.rms_kid not in rms_pairs:
            continue  # the RMS holds that private key, not this server
        try:
            open_sealed(entry, rms_pairs)
            report.sealed_checked += 1
        except EntryError as exc:
            out.add(str(exc))


def _check_entries(
    conn: Connection,
    keys: Mapping[str, PublicSigningKey],
    out: _Report,
    size: int,
    checkpoint_sizes: set[int],
    progress: Progress | None,
    ring: KeyRing | None = None,
) -> tuple[MemoryTreeStore, CompactRange, dict[int, bytes], dict[int, bytes]]:
    tree = MemoryTreeStore()
    cr = CompactRange()
    roots: dict[int, bytes] = {0: EMPTY_ROOT} if 0 in checkpoint_sizes else {}
    data_by_seq: dict[int, bytes] = {}
    expected = 0
    for rows in _chunks(conn, size):
        entries: list[tuple[Any, LedgerEntry | None]] = []
        for row in rows:
            seq = int(row.seq)
            while expected < seq:
                out.add(f"entry {expected}: missing (deleted from ledger_entry?)")
                # keep positions aligned: a missing leaf breaks every root after it anyway
                tree.put_nodes(cr.append(bytes(HASH_SIZE)))
                expected += 1
            expected = seq + 1
            data = bytes(row.data)
            tree.put_nodes(cr.append(leaf_hash(data)))
            if cr.size in checkpoint_sizes:
                roots[cr.size] = cr.root()
            data_by_seq[seq] = data
            entry: LedgerEntry | None
            try:
                entry = entry_from_bytes(data)
                verify_entry(entry, keys)
            except EntryError as exc:
                out.add(f"entry {seq}: {exc}")
                entry = None
            if entry is not None:
                if entry.seq != seq:
                    out.add(f"entry {seq}: its bytes say seq {entry.seq}")
                if entry.ref != row.ref or entry.kind != row.kind:
                    out.add(f"entry {seq}: stored as {row.ref} but the entry is {entry.ref}")
                if entry.ts != _ts(int(row.ts)):
                    out.add(f"entry {seq}: ts does not match the stored commit time")
            entries.append((row, entry))
        # versions of this chunk
        wanted = [p for row, _ in entries if (p := _split_ref(row.ref)) is not None]
        versions = _versions_for(conn, wanted)
        for row, entry in entries:
            if row.ref not in versions:
                out.add(f"entry {row.seq}: its version {row.ref} is not in the database")
                continue
            if entry is None:
                continue
            content = versions[row.ref]
            if content is None:
                sha = _NULL_SHA
                if entry.event != "deleted":
                    out.add(f"{row.ref}: a deletion, but entry {row.seq} says {entry.event}")
            else:
                try:
                    sha = sha256_hex(canonical_json_text(content)[1])
                except ValueError:
                    sha = ""
            if sha != entry.resource_sha256:
                out.add(
                    f"{row.ref}: the stored version does not match entry {row.seq} "
                    "(resource_sha256)"
                )
        if ring is not None:
            _check_keys(conn, ring, entries, versions, out.report, out)
        if progress is not None:
            progress("entries", expected, size)
    while expected < size:
        out.add(f"entry {expected}: missing (deleted from ledger_entry?)")
        tree.put_nodes(cr.append(bytes(HASH_SIZE)))
        expected += 1
    if expected > size:
        out.add(f"ledger_head: size {size}, but entries run to {expected - 1}")
    return tree, cr, roots, data_by_seq


def _check_nodes(conn: Connection, tree: MemoryTreeStore, size: int, out: _Report) -> int:
    """Merge-walk the stored nodes (ordered by level, idx) against the expected tree: level
    ``l`` holds exactly ``size >> l`` perfect-subtree nodes, indexed from 0."""
    n = ledger_node.c
    level_sizes = [size >> lv for lv in range(size.bit_length())]
    want = [0, 0]  # the next expected (level, idx)

    def flush_until(level: int, idx: int) -> None:
        while (want[0], want[1]) < (level, idx) and want[0] < len(level_sizes):
            if want[1] < level_sizes[want[0]]:
                out.add(f"tree node ({want[0]}, {want[1]}): missing from ledger_node")
                want[1] += 1
            else:
                want[0], want[1] = want[0] + 1, 0

    count = 0
    for level, idx, h in conn.execute(sa.select(n.level, n.idx, n.hash).order_by(n.level, n.idx)):
        level, idx = int(level), int(idx)
        count += 1
        if level >= len(level_sizes) or idx >= level_sizes[level]:
            out.add(f"tree node ({level}, {idx}): not part of a tree of size {size}")
            continue
        flush_until(level, idx)
        if (want[0], want[1]) == (level, idx):
            want[1] += 1
        expected = tree.get_nodes([(level, idx)]).get((level, idx))
        if expected is None or bytes(h) != expected:
            out.add(f"tree node ({level}, {idx}): hash does not match the entries")
    flush_until(len(level_sizes), 0)
    return count


def _check_checkpoints(
    conn: Connection,
    keys: Mapping[str, PublicSigningKey],
    origin: str,
    size: int,
    roots: dict[int, bytes],
    tree: MemoryTreeStore,
    out: _Report,
) -> int:
    c = ledger_checkpoint.c
    previous: tuple[int, bytes] | None = None
    count = 0
    for row in conn.execute(sa.select(c.size, c.root, c.note).order_by(c.size)):
        count += 1
        cp_size = int(row.size)
        where = f"checkpoint at size {cp_size}"
        try:
            cp = verify_checkpoint(row.note, list(keys.values()), origin=origin)
        except CheckpointError as exc:
            out.add(f"{where}: {exc}")
            continue
        if cp.size != cp_size or cp.root != bytes(row.root):
            out.add(f"{where}: the signed note does not match its row")
            continue
        if cp_size > size:
            out.add(f"{where}: beyond the log's size {size}")
            continue
        if roots.get(cp_size) != cp.root:
            out.add(f"{where}: its root is not the root of the entries (forked or rewritten)")
            continue
        if previous is not None:
            try:
                proof = consistency_proof(previous[0], cp_size, tree)
                verify_consistency(previous[0], cp_size, proof, previous[1], cp.root)
            except (InvalidProofError, LookupError, ValueError):
                out.add(f"{where}: not consistent with the checkpoint at size {previous[0]}")
        previous = (cp_size, cp.root)
    return count


def _check_versions(conn: Connection, out: _Report, progress: Progress | None) -> int:
    v, e = resource_versions.c, ledger_entry.c
    ref = v.res_type + "/" + v.res_id + "/_history/" + sa.cast(v.version_id, sa.String)
    total = int(
        conn.execute(
            sa.select(sa.func.count())
            .select_from(resource_versions)
            .where(v.res_type.in_(sorted(KINDS)))
        ).scalar_one()
    )
    orphans = conn.execute(
        sa.select(v.res_type, v.res_id, v.version_id)
        .where(v.res_type.in_(sorted(KINDS)), ~sa.exists().where(e.ref == ref))
        .order_by(v.seq)
    )
    for row in orphans:
        out.add(f"{row.res_type}/{row.res_id}/_history/{row.version_id}: has no ledger entry")
    if progress is not None:
        progress("versions", total, total)
    return total


def _check_external(
    conn: Connection,
    engine: LedgerEngine,
    data_by_seq: dict[int, bytes],
    out: _Report,
    scan_chain: bool,
    progress: Progress | None,
) -> int:
    b, o = ledger_batch.c, ledger_outbox.c
    checked = 0
    unbatched = conn.execute(
        sa.select(o.seq).where(o.status.in_(("sent", "confirmed")), o.txid.is_(None))
    ).scalars()
    for seq in unbatched:
        out.add(f"entry {seq}: marked anchored but has no transaction id")
    batches = conn.execute(
        sa.select(b.id, b.txid, b.state)
        .where(b.engine == engine.name, b.state.in_(("sent", "confirmed")))
        .order_by(b.id)
    ).all()
    for i, batch in enumerate(batches):
        seqs = [
            int(s) for s in conn.execute(sa.select(o.seq).where(o.batch_id == batch.id)).scalars()
        ]
        try:
            on_chain = engine.fetch(str(batch.txid))
        except EngineError as exc:
            out.add(f"external ledger: transaction {batch.txid} cannot be read ({exc.code})")
            continue
        if batch.state == "confirmed" and not on_chain:
            out.add(f"external ledger: transaction {batch.txid} (batch {batch.id}) not found")
            continue
        for seq in seqs:
            if not on_chain:
                break  # sent, not yet in a block
            checked += 1
            if seq not in on_chain:
                out.add(f"entry {seq}: not in its {engine.name} transaction {batch.txid}")
            elif data_by_seq.get(seq) != on_chain[seq]:
                out.add(f"entry {seq}: differs from its copy on {engine.name} ({batch.txid})")
        if progress is not None:
            progress("external", i + 1, len(batches))
    scan = getattr(engine, "scan", None)
    if scan_chain and callable(scan):
        seen: dict[int, list[str]] = {}
        try:
            for txid, entries in scan():
                for seq in entries:
                    seen.setdefault(seq, []).append(str(txid))
        except EngineError as exc:
            out.add(f"external ledger: cannot scan the chain ({exc.code})")
        for seq, txids in sorted(seen.items()):
            if len(txids) > 1:
                out.add(f"entry {seq}: on {engine.name} {len(txids)} times ({', '.join(txids)})")
            if seq not in data_by_seq:
                out.add(f"entry {seq}: on {engine.name} but not in the embedded log")
    return checked


def verify_ledger(
    db: Database,
    keys: Mapping[str, PublicSigningKey],
    origin: str,
    *,
    engine: LedgerEngine | None = None,
    scan_chain: bool = False,
    progress: Progress | None = None,
    max_problems: int = 1_000,
    keyring: KeyRing | None = None,
) -> VerifyReport:
    """Re-verify everything (see the module docstring); never raises for what it finds.

    ``keys`` are the log's signing keys by id; ``keyring`` (optional) adds the checks of
    subjects and sealed boxes."""
    report = VerifyReport()
    out = _Report(report, max_problems)
    with db.read() as conn:
        head = conn.execute(sa.select(ledger_head.c.size, ledger_head.c.compact)).first()
        size = int(head.size) if head is not None else 0
        report.size = size
        cp_sizes = set(conn.execute(sa.select(ledger_checkpoint.c.size)).scalars())
        tree, cr, roots, data_by_seq = _check_entries(
            conn, keys, out, size, cp_sizes, progress, keyring
        )
        report.entries = len(data_by_seq)
        report.root = cr.root()
        compact = b"".join(cr.hashes)
        if head is not None and (cr.size != size or bytes(head.compact) != compact):
            out.add("ledger_head: its compact range does not match the entries")
        report.nodes = _check_nodes(conn, tree, size, out)
        report.checkpoints = _check_checkpoints(conn, keys, origin, size, roots, tree, out)
        report.versions = _check_versions(conn, out, progress)
        status = ledger_outbox.c.status
        counts = {
            str(row[0]): int(row[1])
            for row in conn.execute(sa.select(status, sa.func.count()).group_by(status))
        }
        report.outbox = counts
        if engine is not None:
            report.anchored_checked = _check_external(
                conn, engine, data_by_seq, out, scan_chain, progress
            )
    return report
