"""Chunked, encrypted storage of document content in the database or in a directory.

Content is cut into chunks of ``chunk_size`` plaintext bytes; each chunk is sealed on its own
(:class:`~fhir_consent.documents.keys.ContentKey`), so both writing and reading stream with
memory bounded by a few chunks, and a range request decrypts only the chunks it needs. The
last chunk (possibly empty) carries the ``final`` bit in its nonce, so a blob cut short at a
chunk boundary is detected as surely as a corrupted byte.

Backends:

* ``db`` — one row per chunk in ``document_chunks`` (bytea / BLOB).
* ``dir`` — one file per blob, ``{blob_dir}/{id[:2]}/{id}.blob``: the chunk ciphertexts back to
  back (chunk ``i`` at offset ``i·(chunk_size+16)``), nothing else. Files are written under
  ``{blob_dir}/.spool`` first, flushed to disk, then renamed into place before the database
  transaction that references them commits. A failed transaction can leave an orphan file;
  ``fhir-consent documents gc`` removes those.

Streaming uploads are sealed as they arrive (ciphertext only, never plaintext at rest): into a
spool file for ``dir``, straight into ``document_chunks`` for ``db`` — in short transactions of
their own, behind a provisional blob row without a key (:class:`Spool`). The transaction that
records the Binary is short either way, so a slow client never holds a database transaction
or the database's write lock.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fhir_consent.documents.config import DocumentSettings
from fhir_consent.documents.errors import ContentDestroyed, IntegrityFailure, StorageFull
from fhir_consent.documents.keys import SEAL_OVERHEAD, SYSTEM_DOMAIN, ContentKey, DataKeyStore
from fhir_consent.documents.tables import document_blobs, document_chunks, document_versions
from fhir_consent.store.db import Database

__all__ = [
    "BlobInfo",
    "BlobReader",
    "BlobStore",
    "ShredReport",
    "Spool",
]

_READ_BATCH_BYTES = 4 * 1024 * 1024
_INSERT_BATCH_BYTES = 8 * 1024 * 1024
_STREAM_BATCH_BYTES = 2 * 1024 * 1024  # per transaction while an upload streams in
_IN_BATCH = 500
Backend = Literal["db", "dir"]
_FULL = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT"}


@contextmanager
def _space() -> Iterator[None]:
    """Turn 'no space left' / 'quota exceeded' while writing content into :class:`StorageFull`
    (every other OSError stays what it is)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            raise StorageFull(_FULL[exc.errno]) from None
        raise


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One stored blob's metadata (a row of ``document_blobs``)."""

    blob_id: str
    binary_id: str | None
    version_id: int | None
    patient_id: str | None
    data_key_id: str | None
    wrapped_key: bytes | None
    nonce_prefix: bytes
    content_type: str
    size: int
    sha1: str  # base64 SHA-1 of the plaintext (R4 Attachment.hash)
    chunk_size: int
    chunk_count: int
    backend: str
    created: int
    shredded: int | None

    def plain_len(self, index: int) -> int:
        """Plaintext length of chunk ``index``."""
        if index < self.chunk_count - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (self.chunk_count - 1)

    def chunks_for(self, start: int, end: int) -> tuple[int, int]:
        """First and last chunk index holding bytes ``start..end`` (inclusive)."""
        if self.size == 0:
            return 0, 0
        return start // self.chunk_size, end // self.chunk_size


_BLOB_COLS = tuple(document_blobs.c[name] for name in BlobInfo.__slots__)


class _Sink(Protocol):
    def put(self, index: int, ciphertext: bytes) -> None: ...


class _Sealer:
    """Cuts a byte stream into chunks and seals them. A complete chunk is held back until more
    data arrives or the stream ends, so that the last chunk carries the ``final`` bit. Writes
    of exactly one chunk (what the upload route sends) are sealed without copying."""

    def __init__(self, key: ContentKey, chunk_size: int, sink: _Sink) -> None:
        self.key = key
        self.chunk_size = chunk_size
        self.sink = sink
        self.buf = bytearray()  # a partial chunk
        self.held: bytes | None = None  # a complete chunk, sealed once we know what follows
        self.index = 0
        self.size = 0
        self.sha1 = hashlib.sha1(usedforsecurity=False)  # R4 Attachment.hash is SHA-1

    def _complete(self, chunk: bytes) -> None:
        if self.held is not None:
            self.sink.put(self.index, self.key.seal(self.index, False, self.held))
            self.index += 1
        self.held = chunk

    def write(self, data: bytes | memoryview) -> None:
        if not len(data):
            return
        self.size += len(data)
        self.sha1.update(data)
        n = self.chunk_size
        if not self.buf and len(data) == n and isinstance(data, bytes):
            self._complete(data)
            return
        with memoryview(data) as view:
            pos = 0
            if self.buf:
                pos = min(n - len(self.buf), len(view))
                self.buf += view[:pos]
                if len(self.buf) < n:
                    return
                self._complete(bytes(self.buf))
                self.buf.clear()
            while len(view) - pos >= n:
                self._complete(bytes(view[pos : pos + n]))
                pos += n
            self.buf += view[pos:]

    def finish(self) -> tuple[int, str, int]:
        """Seal the final chunk; returns ``(size, sha1_base64, chunk_count)``."""
        if self.buf or self.held is None:
            self._complete(bytes(self.buf))  # the partial (or empty) chunk is the last one
            self.buf.clear()
        assert self.held is not None
        self.sink.put(self.index, self.key.seal(self.index, True, self.held))
        self.held = None
        self.index += 1
        return self.size, base64.b64encode(self.sha1.digest()).decode("ascii"), self.index


class _FileSink:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh

    def put(self, index: int, ciphertext: bytes) -> None:
        self.fh.write(ciphertext)


class _DbSink:
    """Inserts chunk rows in batches of about 8 MiB."""

    def __init__(self, conn: Connection, blob_id: str) -> None:
        self.conn = conn
        self.blob_id = blob_id
        self.rows: list[dict[str, Any]] = []
        self.pending = 0

    def put(self, index: int, ciphertext: bytes) -> None:
        self.rows.append({"blob_id": self.blob_id, "seq": index, "data": ciphertext})
        self.pending += len(ciphertext)
        if self.pending >= _INSERT_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.conn.execute(document_chunks.insert(), self.rows)
            self.rows = []
            self.pending = 0


class _Batch:
    """Collects sealed chunks until a batch is worth a database round trip."""

    def __init__(self, blob_id: str) -> None:
        self.blob_id = blob_id
        self.rows: list[dict[str, Any]] = []
        self.pending = 0

    def put(self, index: int, ciphertext: bytes) -> None:
        self.rows.append({"blob_id": self.blob_id, "seq": index, "data": ciphertext})
        self.pending += len(ciphertext)

    def take(self, at_least: int) -> list[dict[str, Any]]:
        if self.pending < at_least or not self.rows:
            return []
        rows, self.rows, self.pending = self.rows, [], 0
        return rows


class Spool:
    """A streaming upload being sealed (ciphertext only, never plaintext at rest).

    * ``dir`` backend: the chunks go to a spool file under ``{blob_dir}/.spool``, moved into
      place by :meth:`BlobStore.commit_spool`.
    * ``db`` backend: the chunks go straight into ``document_chunks``, a batch of about
      ``_STREAM_BATCH_BYTES`` per short transaction of its own, *while the body is still
      arriving* — behind a provisional ``document_blobs`` row that has no wrapped key (so it
      can never be read). :meth:`BlobStore.commit_spool` completes that row in the write's
      transaction; a failed upload is removed by :meth:`BlobStore.discard`, and one a crash
      interrupted by ``fhir-consent documents gc``. Neither the event loop nor a slow client
      ever holds a database transaction open.

    ``write``, ``finish`` and ``store`` are synchronous (run them in worker threads): ``write``
    and ``finish`` hash and seal, returning the chunk rows ready for ``store`` (``db``), which
    may run concurrently with the next ``write``. ``close`` removes a spool file.
    """

    def __init__(self, store: BlobStore, content_type: str = "application/octet-stream") -> None:
        self._blobs = store
        self.blob_id = uuid.uuid4().hex
        self.key = ContentKey.generate(self.blob_id, store.keys.random)
        self.chunk_size = store.chunk_size
        self.backend: Backend = store.backend
        self.size = 0
        self.sha1 = ""
        self.chunk_count = 0
        self._fh: BinaryIO | None = None
        self._batch: _Batch | None = None
        if self.backend == "dir":
            self.path: Path | None = store._spool_path(self.blob_id)
            with _space():
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._fh = os.fdopen(fd, "wb")
            self._sealer = _Sealer(self.key, self.chunk_size, _FileSink(self._fh))
        else:
            self.path = None
            self._batch = _Batch(self.blob_id)
            self._sealer = _Sealer(self.key, self.chunk_size, self._batch)
            with store.db.write() as conn:
                store._insert_provisional(conn, self.key, content_type)

    def write(self, data: bytes | memoryview) -> list[dict[str, Any]]:
        """Hash and seal more content; returns chunk rows to :meth:`store` (``db``)."""
        with _space():
            self._sealer.write(data)
        return self._batch.take(_STREAM_BATCH_BYTES) if self._batch is not None else []

    @property
    def written(self) -> int:
        """Content bytes received so far."""
        return self._sealer.size

    def finish(self, *, sync: bool) -> list[dict[str, Any]]:
        """Seal the last chunk; close the spool file (flushed to disk when ``sync``). Returns
        the remaining chunk rows to :meth:`store` (``db``)."""
        with _space():
            self.size, self.sha1, self.chunk_count = self._sealer.finish()
            if self._fh is not None:
                self._fh.flush()
                if sync:
                    os.fsync(self._fh.fileno())
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        return self._batch.take(0) if self._batch is not None else []

    def store(self, rows: list[dict[str, Any]]) -> None:
        """Insert sealed chunk rows in a transaction of their own (``db`` backend)."""
        if rows:
            with self._blobs.db.write() as conn:
                conn.execute(document_chunks.insert(), rows)

    def close(self) -> None:
        """Close and remove the spool file (a no-op once it was moved into place)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def ciphertexts(self) -> Iterator[tuple[int, bytes]]:
        """The sealed chunks of a spool file, in order."""
        assert self.path is not None
        stride = self.chunk_size + SEAL_OVERHEAD
        with self.path.open("rb") as fh:
            for index in range(self.chunk_count):
                yield index, fh.read(stride)


@dataclass(frozen=True, slots=True)
class ShredReport:
    """What a crypto-shred destroyed (identifiers and counts only)."""

    patient_id: str
    data_keys: int
    blobs: int
    binary_ids: tuple[str, ...]
    files: tuple[Path, ...]


class BlobStore:
    """Encrypted blobs on one backend, with keys from a :class:`DataKeyStore`."""

    def __init__(
        self,
        settings: DocumentSettings,
        db: Database,
        keys: DataKeyStore,
        *,
        clock: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.db = db
        self.keys = keys
        self.clock = clock
        self.backend: Backend = settings.backend
        self.root = settings.resolved_blob_dir()
        self.chunk_size = settings.chunk_size  # directories are created on first write
        #: Concurrent transactions a streaming 'db' upload stores its batches in.
        self.write_sessions = 2 if self.backend == "db" and not db.is_sqlite else 1

    # -- paths -------------------------------------------------------------------------------

    def _file(self, blob_id: str) -> Path:
        return self.root / blob_id[:2] / f"{blob_id}.blob"

    def _spool_path(self, blob_id: str) -> Path:
        if self.backend == "dir":
            return self.root / ".spool" / blob_id
        base = self.settings.spool_dir or Path(tempfile.gettempdir())
        return base / f"fhir-consent-spool-{blob_id}"

    def file_of(self, info: BlobInfo) -> Path | None:
        """The file of a 'dir' blob (tests and maintenance)."""
        return self._file(info.blob_id) if info.backend == "dir" else None

    # -- writing -----------------------------------------------------------------------------

    def spool(self, content_type: str = "application/octet-stream") -> Spool:
        """Start a streaming upload (``db``: writes its provisional blob row)."""
        return Spool(self, content_type)

    def _insert_provisional(self, conn: Connection, key: ContentKey, content_type: str) -> None:
        """The row chunks of a streaming 'db' upload hang off until it is committed: no key,
        no owner, so nothing can read it (see :class:`Spool`)."""
        conn.execute(
            document_blobs.insert().values(
                blob_id=key.blob_id,
                binary_id=None,
                version_id=None,
                patient_id=None,
                data_key_id=None,
                wrapped_key=None,
                nonce_prefix=key.nonce_prefix,
                content_type=content_type[:255],
                size=0,
                sha1="",
                chunk_size=self.chunk_size,
                chunk_count=0,
                backend="db",
                created=self.clock(),
                shredded=None,
            )
        )

    def _insert_row(
        self,
        conn: Connection,
        key: ContentKey,
        *,
        content_type: str,
        patient_id: str,
        size: int,
        sha1: str,
        chunk_count: int,
    ) -> BlobInfo:
        values = self._blob_values(
            conn,
            key,
            content_type=content_type,
            patient_id=patient_id,
            size=size,
            sha1=sha1,
            chunk_count=chunk_count,
        )
        conn.execute(document_blobs.insert().values(**values))
        return BlobInfo(**values)

    def _blob_values(
        self,
        conn: Connection,
        key: ContentKey,
        *,
        content_type: str,
        patient_id: str,
        size: int,
        sha1: str,
        chunk_count: int,
    ) -> dict[str, Any]:
        data_key = self.keys.for_patient(conn, patient_id)
        return {
            "blob_id": key.blob_id,
            "binary_id": None,
            "version_id": None,
            "patient_id": patient_id,
            "data_key_id": data_key.key_id,
            "wrapped_key": data_key.wrap_content_key(key, self.keys.random),
            "nonce_prefix": key.nonce_prefix,
            "content_type": content_type[:255],
            "size": size,
            "sha1": sha1,
            "chunk_size": self.chunk_size,
            "chunk_count": chunk_count,
            "backend": self.backend,
            "created": self.clock(),
            "shredded": None,
        }

    def store_bytes(
        self, conn: Connection, data: bytes, content_type: str, patient_id: str = SYSTEM_DOMAIN
    ) -> BlobInfo:
        """Encrypt and store content held in memory, inside the caller's transaction."""
        blob_id = uuid.uuid4().hex
        key = ContentKey.generate(blob_id, self.keys.random)
        size = len(data)
        sha1 = base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode()
        count = max(1, -(-size // self.chunk_size))
        info = self._insert_row(
            conn,
            key,
            content_type=content_type,
            patient_id=patient_id,
            size=size,
            sha1=sha1,
            chunk_count=count,
        )
        view = memoryview(data)
        if self.backend == "db":
            sink = _DbSink(conn, blob_id)
            sealer = _Sealer(key, self.chunk_size, sink)
            sealer.write(view)
            sealer.finish()
            sink.flush()
            return info
        tmp = self._spool_path(blob_id)
        try:
            with _space():
                self._write_file(tmp, key, view)
            self._place(tmp, blob_id)
        finally:
            tmp.unlink(missing_ok=True)
        return info

    def _write_file(self, tmp: Path, key: ContentKey, view: memoryview) -> None:
        """Seal ``view`` into the new file ``tmp``, flushed to disk."""
        tmp.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            sealer = _Sealer(key, self.chunk_size, _FileSink(fh))
            sealer.write(view)
            sealer.finish()
            fh.flush()
            os.fsync(fh.fileno())

    def _place(self, tmp: Path, blob_id: str) -> None:
        final = self._file(blob_id)
        with _space():  # a new fan-out directory needs a block too
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def commit_spool(
        self, conn: Connection, spool: Spool, content_type: str, patient_id: str = SYSTEM_DOMAIN
    ) -> BlobInfo:
        """Record a finished spool inside the caller's transaction: the 'dir' backend moves
        the file into place; the 'db' backend, whose chunks are stored already, completes the
        provisional blob row (wrapped key, owner, size, hash) after checking that every chunk
        is there."""
        if spool.backend == "dir":
            info = self._insert_row(
                conn,
                spool.key,
                content_type=content_type,
                patient_id=patient_id,
                size=spool.size,
                sha1=spool.sha1,
                chunk_count=spool.chunk_count,
            )
            assert spool.path is not None
            self._place(spool.path, spool.blob_id)
            return info
        c = document_chunks.c
        stored = conn.execute(
            sa.select(sa.func.count()).where(c.blob_id == spool.blob_id)
        ).scalar_one()
        if stored != spool.chunk_count:
            raise IntegrityFailure(spool.blob_id)
        values = self._blob_values(
            conn,
            spool.key,
            content_type=content_type,
            patient_id=patient_id,
            size=spool.size,
            sha1=spool.sha1,
            chunk_count=spool.chunk_count,
        )
        b = document_blobs.c
        done = conn.execute(
            document_blobs.update()
            .where(b.blob_id == spool.blob_id, b.wrapped_key.is_(None), b.shredded.is_(None))
            .values({k: v for k, v in values.items() if k != "blob_id"})
        )
        if done.rowcount != 1:
            raise IntegrityFailure(spool.blob_id)
        return BlobInfo(**values)

    def discard(self, blob_id: str) -> None:
        """Best-effort removal of what a failed upload left: its 'dir' blob file, or its
        provisional 'db' blob row and chunks (never a committed blob)."""
        if self.backend == "dir":
            self._file(blob_id).unlink(missing_ok=True)
            return
        with self.db.write() as conn:
            self._drop_provisional(conn, [blob_id])

    def _drop_provisional(self, conn: Connection, blob_ids: Sequence[str]) -> int:
        b = document_blobs.c
        provisional = sa.and_(b.wrapped_key.is_(None), b.shredded.is_(None))
        gone = [
            r[0]
            for r in conn.execute(
                sa.select(b.blob_id).where(b.blob_id.in_(blob_ids), provisional)
            )
        ]
        if gone:
            conn.execute(document_chunks.delete().where(document_chunks.c.blob_id.in_(gone)))
            conn.execute(document_blobs.delete().where(b.blob_id.in_(gone), provisional))
        return len(gone)

    # -- reading -----------------------------------------------------------------------------

    def info(self, conn: Connection, blob_id: str) -> BlobInfo | None:
        """A blob's metadata row."""
        row = conn.execute(
            sa.select(*_BLOB_COLS).where(document_blobs.c.blob_id == blob_id)
        ).first()
        return BlobInfo(*row) if row is not None else None

    def content_key(self, conn: Connection, info: BlobInfo) -> ContentKey:
        """Unwrap the blob's content key: :class:`ContentDestroyed` once shredded."""
        if info.shredded is not None or info.data_key_id is None or info.wrapped_key is None:
            raise ContentDestroyed()
        data_key = self.keys.get(conn, info.data_key_id)
        if data_key is None:
            raise ContentDestroyed()
        return data_key.open_content_key(info.blob_id, info.wrapped_key, info.nonce_prefix)

    def version_blob(self, conn: Connection, binary_id: str, version_id: int) -> BlobInfo | None:
        """The blob holding the content of ``Binary/binary_id`` version ``version_id`` (None:
        that version has no content)."""
        v, b = document_versions.c, document_blobs.c
        row = conn.execute(
            sa.select(*_BLOB_COLS)
            .select_from(document_versions.join(document_blobs, b.blob_id == v.blob_id))
            .where(v.binary_id == binary_id, v.version_id == version_id)
        ).first()
        return BlobInfo(*row) if row is not None else None

    def record_version(
        self, conn: Connection, binary_id: str, version_id: int, blob_id: str
    ) -> None:
        """Record that a Binary version's content is ``blob_id`` (in the write's transaction)."""
        conn.execute(
            document_versions.insert().values(
                binary_id=binary_id, version_id=version_id, blob_id=blob_id
            )
        )

    def reader(
        self, info: BlobInfo, key: ContentKey, *, conn: Connection | None = None
    ) -> BlobReader:
        """A verified reader of the blob: in ``conn``'s transaction when given, else in read
        transactions of its own."""
        return BlobReader(self, info, key, conn)

    def _read_ciphertexts(
        self, info: BlobInfo, first: int, last: int, conn: Connection | None = None
    ) -> Iterator[tuple[int, bytes]]:
        if info.backend == "dir":
            yield from self._read_file(info, first, last)
            return
        if conn is not None:
            yield from _db_chunks(conn, info.blob_id, first, last)
            return
        with self.db.read() as own:
            yield from _db_chunks(own, info.blob_id, first, last)

    def _read_file(self, info: BlobInfo, first: int, last: int) -> Iterator[tuple[int, bytes]]:
        stride = info.chunk_size + SEAL_OVERHEAD
        expected = info.size + SEAL_OVERHEAD * info.chunk_count
        try:
            fh = self._file(info.blob_id).open("rb")
        except OSError:
            raise IntegrityFailure(info.blob_id) from None
        with fh:
            if os.fstat(fh.fileno()).st_size != expected:
                raise IntegrityFailure(info.blob_id)
            fh.seek(first * stride)
            for index in range(first, last + 1):
                yield index, fh.read(stride)

    # -- key domains, shredding, maintenance ---------------------------------------------------

    def attach(self, conn: Connection, blob_id: str, binary_id: str, version_id: int) -> None:
        """Record which Binary version introduced a blob (first writer wins)."""
        b = document_blobs.c
        conn.execute(
            document_blobs.update()
            .where(b.blob_id == blob_id, b.binary_id.is_(None))
            .values(binary_id=binary_id, version_id=version_id)
        )

    def rekey_binary(self, conn: Connection, binary_id: str, patient_id: str) -> int:
        """Move a Binary's blobs from the system domain to ``patient_id``'s data key (only the
        32-byte content keys are re-wrapped; the content is untouched)."""
        b = document_blobs.c
        rows = conn.execute(
            sa.select(*_BLOB_COLS).where(
                b.binary_id == binary_id,
                b.patient_id == SYSTEM_DOMAIN,
                b.shredded.is_(None),
            )
        ).all()
        if not rows:
            return 0
        target = self.keys.for_patient(conn, patient_id)
        for row in rows:
            info = BlobInfo(*row)
            key = self.content_key(conn, info)
            conn.execute(
                document_blobs.update()
                .where(b.blob_id == info.blob_id)
                .values(
                    patient_id=patient_id,
                    data_key_id=target.key_id,
                    wrapped_key=target.wrap_content_key(key, self.keys.random),
                )
            )
        return len(rows)

    def shred(self, conn: Connection, patient_id: str) -> ShredReport:
        """Crypto-shred a patient inside the caller's transaction: delete their data keys,
        their blobs' wrapped content keys and chunk rows. Delete the returned files after the
        transaction commits (:meth:`delete_files`); the content is unrecoverable either way."""
        key_ids = self.keys.shred(conn, patient_id)
        b = document_blobs.c
        rows = conn.execute(
            sa.select(b.blob_id, b.binary_id, b.backend).where(
                sa.or_(b.patient_id == patient_id, b.data_key_id.in_(key_ids or [""])),
                b.shredded.is_(None),
            )
        ).all()
        blob_ids = [r[0] for r in rows]
        now = self.clock()
        for part in _batches(blob_ids, _IN_BATCH):
            conn.execute(document_chunks.delete().where(document_chunks.c.blob_id.in_(part)))
            conn.execute(
                document_blobs.update()
                .where(b.blob_id.in_(part))
                .values(wrapped_key=None, data_key_id=None, shredded=now)
            )
        files = tuple(self._file(r[0]) for r in rows if r[2] == "dir")
        binaries = tuple(sorted({r[1] for r in rows if r[1] is not None}))
        return ShredReport(patient_id, len(key_ids), len(blob_ids), binaries, files)

    @staticmethod
    def delete_files(files: Sequence[Path]) -> int:
        """Remove blob files (after a shred committed); returns how many existed."""
        gone = 0
        for path in files:
            try:
                path.unlink()
                gone += 1
            except FileNotFoundError:
                pass
        return gone

    def gc(self, conn: Connection, *, older_than_s: int = 3600) -> int:
        """Remove 'dir' files (and stale spool files) no blob row references, and provisional
        'db' blobs, older than ``older_than_s`` (left behind by failed transactions or
        crashes)."""
        cutoff = time.time() - older_than_s
        removed = 0
        uses_dir = self.backend == "dir" or self.settings.blob_dir is not None
        spools = [
            *((self.root / ".spool").glob("*") if uses_dir else ()),
            *(self.settings.spool_dir or Path(tempfile.gettempdir())).glob("fhir-consent-spool-*"),
        ]
        for path in spools:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        candidates: list[Path] = []
        for path in self.root.glob("*/*.blob") if uses_dir else ():
            if path.stat().st_mtime < cutoff:
                candidates.append(path)
        b = document_blobs.c
        stale = [  # 'db' uploads a crash interrupted (see Spool)
            r[0]
            for r in conn.execute(
                sa.select(b.blob_id).where(
                    b.wrapped_key.is_(None),
                    b.shredded.is_(None),
                    b.created < self.clock() - older_than_s * 1_000_000,
                )
            )
        ]
        for part in _batches(stale, _IN_BATCH):
            removed += self._drop_provisional(conn, part)
        for part in _batches(candidates, _IN_BATCH):
            ids = [p.stem for p in part]
            known = {
                r[0]
                for r in conn.execute(
                    sa.select(document_blobs.c.blob_id).where(
                        document_blobs.c.blob_id.in_(ids), document_blobs.c.shredded.is_(None)
                    )
                )
            }
            for path in part:
                if path.stem not in known:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


class BlobReader:
    """Verified plaintext of one blob, chunk by chunk. Every chunk is authenticated (and its
    position and finality checked) before it is returned; any failure is
    :class:`IntegrityFailure`."""

    def __init__(
        self, store: BlobStore, info: BlobInfo, key: ContentKey, conn: Connection | None = None
    ) -> None:
        self.store = store
        self.info = info
        self.key = key
        self.conn = conn
        self.batch = max(1, _READ_BATCH_BYTES // info.chunk_size)

    def chunks(self, first: int, last: int) -> list[bytes]:
        """Plaintexts of chunks ``first..last`` (read in one go: keep the span small)."""
        info = self.info
        out: list[bytes] = []
        expect = first
        for index, ciphertext in self.store._read_ciphertexts(info, first, last, self.conn):
            if index != expect or len(ciphertext) != info.plain_len(index) + SEAL_OVERHEAD:
                raise IntegrityFailure(info.blob_id, expect)
            out.append(self.key.open(index, index == info.chunk_count - 1, ciphertext))
            expect += 1
        if expect != last + 1:
            raise IntegrityFailure(info.blob_id, expect)
        return out

    def spans(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """``first..last`` in read batches of about 4 MiB."""
        start = first
        while start <= last:
            end = min(last, start + self.batch - 1)
            yield start, end
            start = end + 1

    def verify(self, first: int, last: int) -> None:
        """Authenticate chunks ``first..last`` without keeping their plaintext."""
        for a, b in self.spans(first, last):
            self.chunks(a, b)


def _db_chunks(
    conn: Connection, blob_id: str, first: int, last: int
) -> Iterator[tuple[int, bytes]]:
    if conn.dialect.name == "postgresql":
        yield from _pg_binary_chunks(conn, blob_id, first, last)
        return
    c = document_chunks.c
    rows = conn.execute(
        sa.select(c.seq, c.data)
        .where(c.blob_id == blob_id, c.seq >= first, c.seq <= last)
        .order_by(c.seq)
    )
    for seq, data in rows:
        yield int(seq), bytes(data)


def _pg_binary_chunks(
    conn: Connection, blob_id: str, first: int, last: int
) -> Iterator[tuple[int, bytes]]:
    """Chunk rows through a psycopg *binary* cursor: bytea in text format is hex, twice the
    bytes on the wire plus decoding, which made PostgreSQL reads several times slower."""
    driver: Any = conn.connection.driver_connection
    with driver.cursor(binary=True) as cur:
        cur.execute(
            "SELECT seq, data FROM document_chunks"
            " WHERE blob_id = %s AND seq >= %s AND seq <= %s ORDER BY seq",
            (blob_id, first, last),
        )
        for seq, data in cur:
            yield int(seq), bytes(data)


def _batches(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
