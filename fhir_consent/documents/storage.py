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

Streaming uploads are spooled (as ciphertext, never plaintext) before the short database
transaction that records them, so a slow client never holds the database's write lock.
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
from fhir_consent.documents.tables import document_blobs, document_chunks
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


class Spool:
    """A streaming upload being sealed into a spool file (ciphertext only).

    ``write`` and ``finish`` are synchronous (run them in a worker thread); ``close`` removes
    whatever is left. Use :meth:`BlobStore.commit_spool` to record it.
    """

    def __init__(self, store: BlobStore) -> None:
        self.blob_id = uuid.uuid4().hex
        self.key = ContentKey.generate(self.blob_id, store.keys.random)
        self.chunk_size = store.chunk_size
        self.path = store._spool_path(self.blob_id)
        with _space():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._fh: BinaryIO | None = os.fdopen(fd, "wb")
        self._sealer = _Sealer(self.key, self.chunk_size, _FileSink(self._fh))
        self.size = 0
        self.sha1 = ""
        self.chunk_count = 0

    def write(self, data: bytes | memoryview) -> None:
        """Hash and seal more content (whole chunks go to the spool file)."""
        with _space():
            self._sealer.write(data)

    @property
    def written(self) -> int:
        """Content bytes received so far."""
        return self._sealer.size

    def finish(self, *, sync: bool) -> None:
        """Seal the last chunk and close the file (flushed to disk when ``sync``)."""
        assert self._fh is not None
        with _space():
            self.size, self.sha1, self.chunk_count = self._sealer.finish()
            self._fh.flush()
            if sync:
                os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None

    def close(self) -> None:
        """Close and remove the spool file (a no-op once it was moved into place)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)

    def ciphertexts(self) -> Iterator[tuple[int, bytes]]:
        """The sealed chunks, in order (to copy them into the database)."""
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

    def spool(self) -> Spool:
        """Start a streaming upload."""
        return Spool(self)

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
        data_key = self.keys.for_patient(conn, patient_id)
        values: dict[str, Any] = {
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
        conn.execute(document_blobs.insert().values(**values))
        return BlobInfo(**values)

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
        """Record a finished spool inside the caller's transaction (the 'dir' backend moves the
        file into place; the 'db' backend copies its chunks into rows)."""
        info = self._insert_row(
            conn,
            spool.key,
            content_type=content_type,
            patient_id=patient_id,
            size=spool.size,
            sha1=spool.sha1,
            chunk_count=spool.chunk_count,
        )
        if self.backend == "dir":
            self._place(spool.path, spool.blob_id)
        else:
            sink = _DbSink(conn, spool.blob_id)
            for index, ciphertext in spool.ciphertexts():
                sink.put(index, ciphertext)
            sink.flush()
        return info

    def discard(self, blob_id: str) -> None:
        """Best-effort removal of a 'dir' blob file whose transaction failed."""
        if self.backend == "dir":
            self._file(blob_id).unlink(missing_ok=True)

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

    def reader(self, info: BlobInfo, key: ContentKey) -> BlobReader:
        """A verified reader of the blob (opens its own read transactions)."""
        return BlobReader(self, info, key)

    def _read_ciphertexts(
        self, info: BlobInfo, first: int, last: int
    ) -> Iterator[tuple[int, bytes]]:
        if info.backend == "dir":
            yield from self._read_file(info, first, last)
            return
        c = document_chunks.c
        with self.db.read() as conn:
            if conn.dialect.name == "postgresql":
                yield from _pg_binary_chunks(conn, info.blob_id, first, last)
                return
            rows = conn.execute(
                sa.select(c.seq, c.data)
                .where(c.blob_id == info.blob_id, c.seq >= first, c.seq <= last)
                .order_by(c.seq)
            )
            for seq, data in rows:
                yield int(seq), bytes(data)

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
        """Remove 'dir' files (and stale spool files) no blob row references, older than
        ``older_than_s`` (left behind by failed transactions or crashes)."""
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

    def __init__(self, store: BlobStore, info: BlobInfo, key: ContentKey) -> None:
        self.store = store
        self.info = info
        self.key = key
        self.batch = max(1, _READ_BATCH_BYTES // info.chunk_size)

    def chunks(self, first: int, last: int) -> list[bytes]:
        """Plaintexts of chunks ``first..last`` (read in one go: keep the span small)."""
        info = self.info
        out: list[bytes] = []
        expect = first
        for index, ciphertext in self.store._read_ciphertexts(info, first, last):
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
