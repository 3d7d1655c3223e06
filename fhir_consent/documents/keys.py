"""Envelope encryption of document content — every cryptographic step of the document store.

Three layers, all PyNaCl ``SecretBox`` (XSalsa20-Poly1305, authenticated encryption):

1. **Master keys** (:class:`MasterKeyRing`) live outside the database: in a key ring file or an
   environment variable. Each has a key id; one is active. Rotation adds a key, makes it active
   and re-wraps every data key (``fhir-consent documents rotate-master-key``).
2. **Data keys** (:class:`DataKey`), one per patient, are stored in ``document_data_keys`` only
   wrapped by a master key. Deleting a patient's row is **crypto-shredding**: every content key
   wrapped under it — hence all of that patient's content — becomes unrecoverable.
3. **Content keys** (:class:`ContentKey`), fresh for every stored blob and wrapped by the data
   key, encrypt the content in chunks. Chunk ``i`` uses the nonce
   ``prefix(16) ‖ uint64_be(2·i + final)``: a chunk moved to another position, a blob cut at a
   chunk boundary (its last chunk then lacks the ``final`` bit) or a chunk from another blob
   (another key) fails authentication.

Wrapped keys carry their context (key id, patient, blob id) inside the sealed plaintext, so a
wrapped key copied to another row does not open there. Every failure to open is one opaque
:class:`~fhir_consent.documents.errors.IntegrityFailure` or
:class:`~fhir_consent.documents.errors.MasterKeyError`; ``repr()`` of a key shows its id only.
Nothing here caches unwrapped data keys, so a shred takes effect on the next read everywhere.

.. warning:: The master key ring file is the root secret of all document content. Keep it out
   of database backups (a backup holding both can decrypt everything not yet shredded).
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import nacl.bindings
import nacl.exceptions
import nacl.secret
import nacl.utils
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from fhir_consent.crypto import b64decode, b64encode
from fhir_consent.documents.errors import IntegrityFailure, MasterKeyError
from fhir_consent.documents.tables import document_data_keys

__all__ = [
    "KEY_BYTES",
    "SEAL_OVERHEAD",
    "ContentKey",
    "DataKey",
    "DataKeyStore",
    "MasterKeyRing",
    "SYSTEM_DOMAIN",
]

KEY_BYTES: Final = nacl.secret.SecretBox.KEY_SIZE  # 32
SEAL_OVERHEAD: Final = nacl.secret.SecretBox.MACBYTES  # 16 bytes of Poly1305 tag per chunk
#: The data-key domain of content not (yet) tied to a patient.
SYSTEM_DOMAIN: Final = ""
_NONCE_PREFIX: Final = 16
_FORMAT: Final = "fhir-consent/document-master-keys/1"
_KID_BYTES: Final = 8

Random = Callable[[int], bytes]


def _random(n: int) -> bytes:
    return bytes(nacl.utils.random(n))


def _context(*parts: str) -> bytes:
    return "\x1f".join(parts).encode("utf-8") + b"\x1e"


class _Sealer:
    """A SecretBox with random nonces, binding a context string into the plaintext."""

    __slots__ = ("_box",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise MasterKeyError("a key is 32 bytes")
        self._box = nacl.secret.SecretBox(key)

    def seal(self, context: bytes, secret: bytes, random: Random) -> bytes:
        return bytes(self._box.encrypt(context + secret, random(nacl.secret.SecretBox.NONCE_SIZE)))

    def open(self, context: bytes, sealed: bytes) -> bytes | None:
        try:
            plain = bytes(self._box.decrypt(sealed))
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return None
        if not secrets.compare_digest(plain[: len(context)], context):
            return None
        return plain[len(context) :]


# --------------------------------------------------------------------------------------------
# Master keys
# --------------------------------------------------------------------------------------------


def _new_kid(random: Random) -> str:
    return random(_KID_BYTES).hex()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class MasterKeyRing:
    """The master keys: one active (wraps new data keys), the others kept to unwrap old ones.

    Build it with :meth:`load` (a key ring file, created on first use) or :meth:`from_value`
    (``FHIR_CONSENT_DOCUMENTS_MASTER_KEYS``). A ring loaded from a file re-reads the file when
    asked for an unknown key id, so workers pick up a rotation made by the admin command.
    """

    __slots__ = ("_keys", "_mtime", "_path", "active_kid")

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active: str,
        *,
        path: Path | None = None,
        mtime: int | None = None,
    ) -> None:
        if active not in keys:
            raise MasterKeyError("the active master key id is not in the ring")
        self._keys = {kid: _Sealer(key) for kid, key in keys.items()}
        self.active_kid = active
        self._path = path
        self._mtime = mtime

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of every key in the ring (active first when written by :meth:`rotate`)."""
        return tuple(self._keys)

    def __repr__(self) -> str:
        return f"MasterKeyRing(active={self.active_kid!r}, keys={len(self._keys)})"

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def generate(cls, random: Random = _random) -> MasterKeyRing:
        """A ring with one fresh key (tests, and the first start without a key file)."""
        kid = _new_kid(random)
        return cls({kid: random(KEY_BYTES)}, kid)

    @classmethod
    def from_value(cls, value: str) -> MasterKeyRing:
        """Parse ``kid:base64key[,kid:base64key…]``; the first key is active."""
        keys: dict[str, bytes] = {}
        for i, item in enumerate(p.strip() for p in value.split(",")):
            if not item:
                continue
            kid, sep, b64 = item.partition(":")
            try:
                if not sep or not kid or not kid.isascii() or len(kid) > 32:
                    raise ValueError
                keys[kid] = b64decode(b64.strip(), length=KEY_BYTES)
            except ValueError:
                raise MasterKeyError(
                    f"FHIR_CONSENT_DOCUMENTS_MASTER_KEYS item {i} is not 'kid:base64-32-bytes'"
                ) from None
        if not keys:
            raise MasterKeyError("FHIR_CONSENT_DOCUMENTS_MASTER_KEYS holds no key")
        return cls(keys, next(iter(keys)))

    @classmethod
    def load(cls, path: Path, *, create: bool = True) -> MasterKeyRing:
        """Read a key ring file; when it is missing and ``create``, write one with a fresh key
        (mode 0600, in a 0700 directory)."""
        if not path.exists():
            if not create:
                raise MasterKeyError(f"master key file {path} does not exist")
            ring = cls.generate()
            try:
                _write_ring(path, ring, exclusive=True)
            except FileExistsError:  # another worker created it first
                pass
        return cls._read(path)

    @classmethod
    def _read(cls, path: Path) -> MasterKeyRing:
        try:
            mtime = path.stat().st_mtime_ns
            doc = json.loads(path.read_text("utf-8"))
            if doc.get("format") != _FORMAT:
                raise ValueError
            keys = {
                str(item["kid"]): b64decode(str(item["key"]), length=KEY_BYTES)
                for item in doc["keys"]
            }
            active = str(doc["active"])
        except (OSError, ValueError, KeyError, TypeError):
            raise MasterKeyError(f"master key file {path} is unreadable or malformed") from None
        return cls(keys, active, path=path, mtime=mtime)

    def _reload(self) -> None:
        assert self._path is not None
        fresh = MasterKeyRing._read(self._path)
        self._keys, self.active_kid, self._mtime = fresh._keys, fresh.active_kid, fresh._mtime

    def _reload_if_changed(self) -> None:
        """Pick up a rotation written by another process (file-based rings only)."""
        if self._path is None:
            return
        try:
            changed = self._path.stat().st_mtime_ns != self._mtime
        except OSError:
            return
        if changed:
            self._reload()

    def rotate(self, random: Random = _random) -> MasterKeyRing:
        """A ring with a new active key, keeping the current keys; written back to the file
        when this ring came from one."""
        kid = _new_kid(random)
        keys = {k: self._secret(k) for k in self._keys}
        keys = {kid: random(KEY_BYTES), **keys}
        ring = MasterKeyRing(keys, kid, path=self._path)
        if self._path is not None:
            _write_ring(self._path, ring, exclusive=False)
            return MasterKeyRing._read(self._path)
        return ring

    def without(self, kids: set[str]) -> MasterKeyRing:
        """A ring without the given (retired, unused) keys; written back to its file."""
        if self.active_kid in kids:
            raise MasterKeyError("the active master key cannot be removed")
        keys = {k: self._secret(k) for k in self._keys if k not in kids}
        ring = MasterKeyRing(keys, self.active_kid, path=self._path)
        if self._path is not None:
            _write_ring(self._path, ring, exclusive=False)
            return MasterKeyRing._read(self._path)
        return ring

    @property
    def from_file(self) -> bool:
        """Whether the ring was read from (and rotates into) a key ring file."""
        return self._path is not None

    def _secret(self, kid: str) -> bytes:
        return bytes(self._keys[kid]._box)

    # -- use ---------------------------------------------------------------------------------

    def wrap(self, context: bytes, secret: bytes, random: Random = _random) -> tuple[str, bytes]:
        """Seal ``secret`` (bound to ``context``) under the active key: ``(kid, sealed)``."""
        self._reload_if_changed()
        return self.active_kid, self._keys[self.active_kid].seal(context, secret, random)

    def unwrap(self, kid: str, context: bytes, sealed: bytes) -> bytes:
        """Open a wrapped secret; :class:`MasterKeyError` for an unknown key id,
        :class:`IntegrityFailure` when it does not authenticate."""
        sealer = self._keys.get(kid)
        if sealer is None and self._path is not None:
            self._reload()  # rotated by another process?
            sealer = self._keys.get(kid)
        if sealer is None:
            raise MasterKeyError(f"master key {kid} is not in the key ring")
        plain = sealer.open(context, sealed)
        if plain is None:
            raise IntegrityFailure("data-key", -1)
        return plain


def _write_ring(path: Path, ring: MasterKeyRing, *, exclusive: bool) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {
        "format": _FORMAT,
        "active": ring.active_kid,
        "keys": [
            {"kid": kid, "key": b64encode(ring._secret(kid)), "created": _now_iso()}
            for kid in ring.key_ids
        ],
    }
    data = json.dumps(doc, indent=2).encode("utf-8")
    target = path if exclusive else path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if not exclusive:
            os.replace(target, path)
    except BaseException:
        if not exclusive:
            target.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Content keys (one per blob) and data keys (one per patient)
# --------------------------------------------------------------------------------------------


class ContentKey:
    """The key of one blob: seals and opens its chunks (XSalsa20-Poly1305 per chunk).

    Chunks go through ``crypto_secretbox_easy``/``crypto_secretbox_open_easy`` — the very
    calls ``SecretBox.encrypt``/``decrypt`` make — directly, to skip the high-level object's
    nonce-prefixed copy of every megabyte; a chunk is exactly what
    ``SecretBox(key).encrypt(chunk, nonce).ciphertext`` returns (the tests check both ways).
    """

    __slots__ = ("_key", "_prefix", "blob_id")

    def __init__(self, blob_id: str, key: bytes, nonce_prefix: bytes) -> None:
        if len(key) != KEY_BYTES or len(nonce_prefix) != _NONCE_PREFIX:
            raise IntegrityFailure(blob_id)
        self.blob_id = blob_id
        self._key = bytes(key)
        self._prefix = bytes(nonce_prefix)

    @classmethod
    def generate(cls, blob_id: str, random: Random = _random) -> ContentKey:
        """A fresh key and nonce prefix for one new blob."""
        return cls(blob_id, random(KEY_BYTES), random(_NONCE_PREFIX))

    @property
    def nonce_prefix(self) -> bytes:
        """The blob's 16 random nonce bytes (stored in the clear with the blob)."""
        return self._prefix

    def secret_bytes(self) -> bytes:
        """The raw key, for wrapping only; never log it."""
        return self._key

    def nonce(self, index: int, final: bool) -> bytes:
        """The 24-byte nonce of chunk ``index``: ``prefix ‖ uint64_be(2·index + final)``."""
        return self._prefix + struct.pack(">Q", (index << 1) | int(final))

    def seal(self, index: int, final: bool, plaintext: bytes) -> bytes:
        """The ciphertext of chunk ``index`` (``len(plaintext) + 16`` bytes)."""
        return bytes(
            nacl.bindings.crypto_secretbox_easy(plaintext, self.nonce(index, final), self._key)
        )

    def open(self, index: int, final: bool, ciphertext: bytes) -> bytes:
        """The plaintext of chunk ``index``, or :class:`IntegrityFailure`."""
        try:
            return bytes(
                nacl.bindings.crypto_secretbox_open_easy(
                    ciphertext, self.nonce(index, final), self._key
                )
            )
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise IntegrityFailure(self.blob_id, index) from None

    def __repr__(self) -> str:
        return f"ContentKey(blob_id={self.blob_id!r})"


class DataKey:
    """A patient's data key: wraps the content keys of that patient's blobs."""

    __slots__ = ("_sealer", "key_id", "patient_id")

    def __init__(self, key_id: str, patient_id: str, key: bytes) -> None:
        self.key_id = key_id
        self.patient_id = patient_id
        self._sealer = _Sealer(key)

    def wrap_content_key(self, ck: ContentKey, random: Random = _random) -> bytes:
        """Seal a blob's content key under this data key, bound to the blob id."""
        return self._sealer.seal(
            _context("ck1", self.key_id, ck.blob_id), ck.secret_bytes(), random
        )

    def open_content_key(self, blob_id: str, wrapped: bytes, nonce_prefix: bytes) -> ContentKey:
        """Unwrap a blob's content key (:class:`IntegrityFailure` if it does not open)."""
        key = self._sealer.open(_context("ck1", self.key_id, blob_id), wrapped)
        if key is None:
            raise IntegrityFailure(blob_id)
        return ContentKey(blob_id, key, nonce_prefix)

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id!r})"


class DataKeyStore:
    """Per-patient data keys in ``document_data_keys``, wrapped by the master key ring.

    Unwrapped keys are never cached: every use reads the row, so a shred is effective at once.
    """

    def __init__(
        self,
        ring: MasterKeyRing | Callable[[], MasterKeyRing] | None,
        clock: Callable[[], int],
        random: Random = _random,
    ) -> None:
        self._ring = ring
        self._lock = threading.Lock()
        self.clock = clock
        self.random = random

    @property
    def ring(self) -> MasterKeyRing:
        """The master key ring, loaded on first use when given as a loader (so installing the
        document store touches no key file until a document is stored or read).
        :class:`MasterKeyError` when built without one, as the shred command is: deleting
        keys needs no master key."""
        ring = self._ring
        if isinstance(ring, MasterKeyRing):
            return ring
        if ring is None:
            raise MasterKeyError("no master key ring is configured")
        with self._lock:
            if not isinstance(self._ring, MasterKeyRing):
                self._ring = ring()
            return self._ring

    def _context(self, key_id: str, patient_id: str) -> bytes:
        return _context("dk1", key_id, patient_id)

    def _open_row(self, row: Any) -> DataKey:
        key_id, patient_id, kid, wrapped = row
        return DataKey(
            key_id, patient_id, self.ring.unwrap(kid, self._context(key_id, patient_id), wrapped)
        )

    def get(self, conn: Connection, key_id: str) -> DataKey | None:
        """The data key with this id, or None once it has been shredded."""
        t = document_data_keys.c
        row = conn.execute(
            sa.select(t.key_id, t.patient_id, t.master_kid, t.wrapped).where(t.key_id == key_id)
        ).first()
        return self._open_row(row) if row is not None else None

    def for_patient(self, conn: Connection, patient_id: str) -> DataKey:
        """The patient's live data key, created on first use (race-safe)."""
        t = document_data_keys.c
        query = sa.select(t.key_id, t.patient_id, t.master_kid, t.wrapped).where(
            t.patient_id == patient_id
        )
        row = conn.execute(query).first()
        if row is not None:
            return self._open_row(row)
        key_id = self.random(16).hex()
        secret = self.random(KEY_BYTES)
        kid, wrapped = self.ring.wrap(self._context(key_id, patient_id), secret, self.random)
        try:
            with conn.begin_nested():
                conn.execute(
                    document_data_keys.insert().values(
                        key_id=key_id,
                        patient_id=patient_id,
                        master_kid=kid,
                        wrapped=wrapped,
                        created=self.clock(),
                    )
                )
        except IntegrityError:  # a concurrent writer created it
            row = conn.execute(query).first()
            if row is None:
                raise
            return self._open_row(row)
        return DataKey(key_id, patient_id, secret)

    def shred(self, conn: Connection, patient_id: str) -> list[str]:
        """Delete the patient's data key(s); returns the deleted key ids."""
        t = document_data_keys.c
        ids = [r[0] for r in conn.execute(sa.select(t.key_id).where(t.patient_id == patient_id))]
        if ids:
            conn.execute(document_data_keys.delete().where(t.key_id.in_(ids)))
        return ids

    def rewrap_all(self, conn: Connection) -> int:
        """Re-wrap every data key not under the active master key; returns how many."""
        t = document_data_keys.c
        rows = conn.execute(
            sa.select(t.key_id, t.patient_id, t.master_kid, t.wrapped).where(
                t.master_kid != self.ring.active_kid
            )
        ).all()
        for key_id, patient_id, kid, wrapped in rows:
            ctx = self._context(key_id, patient_id)
            secret = self.ring.unwrap(kid, ctx, wrapped)
            new_kid, new_wrapped = self.ring.wrap(ctx, secret, self.random)
            conn.execute(
                document_data_keys.update()
                .where(t.key_id == key_id)
                .values(master_kid=new_kid, wrapped=new_wrapped)
            )
        return len(rows)

    def master_kids_in_use(self, conn: Connection) -> set[str]:
        """The master key ids some stored data key is wrapped under."""
        t = document_data_keys.c
        return {r[0] for r in conn.execute(sa.select(t.master_kid).distinct())}
