"""Ledger entries: building, signing, verifying and opening them (ledger.md §1).

An entry is the canonical JSON (RFC 8785 style, :func:`fhir_consent.crypto.canonical_json`) of:

=================== ==============================================================================
``seq``             position in our log (0, 1, 2, …) — also its leaf index in the Merkle tree
``ts``              commit time, RFC 3339 UTC with a ``Z`` suffix and microseconds
``kind``            ``Consent`` or ``DocumentReference``
``ref``             ``<kind>/<id>/_history/<vid>``
``event``           see :data:`EVENTS` and :func:`event_for_consent`
``subject``         HMAC-SHA-256 pseudonym of the patient reference (hex), never the id
``resource_sha256`` hex SHA-256 of the canonical JSON of the resource version
``sealed``          base64 sealed box to the RMS of canonical JSON ``{"actor": …, "resource": …}``
``kid``             **addition to ledger.md §1**: key id of the signing key (hex of the first 8
                    bytes of SHA-256 of the Ed25519 public key), so that entries stay verifiable
                    after key rotation. It is covered by the signature.
``subject_kid``     **addition**: key id of the pseudonym secret that made ``subject``
                    (:attr:`fhir_consent.crypto.PseudonymKey.key_id`, reveals nothing about it)
``rms_kid``         **addition**: key id of the RMS public key ``sealed`` was sealed to
``sig``             base64 Ed25519 signature over the canonical JSON of every other field
=================== ==============================================================================

The three key ids let every key rotate on its own (``fhir-consent keys rotate --ledger``):
new entries name the new keys, old entries keep naming theirs. Entries written before
``subject_kid``/``rms_kid`` existed (:data:`ENTRY_FIELDS_V1`) stay valid; an entry has
either both or neither.

The leaf data of the Merkle tree (RFC 9162 §2.1.1) is :func:`entry_bytes`: the canonical JSON of
*all* fields including ``sig``. The signature covers the canonical JSON of the object without
``sig`` — no extra domain-separation prefix is added, so that ledger.md's "signature of the server
over everything above" holds literally; it cannot collide with a checkpoint signature because a
JSON object starts with ``{`` and a checkpoint note with its origin.

A FHIR delete has no resource body: pass ``None`` as the resource for the ``deleted`` event; the
sealed box then holds ``"resource": null`` and ``resource_sha256`` is SHA-256 of ``null``.
"""

from __future__ import annotations

import binascii
import datetime as _dt
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import nacl.bindings
import orjson

from fhir_consent.crypto import (
    CryptoError,
    KeyRing,
    PseudonymKey,
    PublicSigningKey,
    SealKeyPair,
    b64decode,
    canonical_json,
    canonical_json_text,
    sha256_hex,
)
from fhir_consent.ledger.merkle import leaf_hash

__all__ = [
    "CONSENT_EVENTS",
    "DOCUMENT_EVENTS",
    "ENTRY_FIELDS",
    "ENTRY_FIELDS_V1",
    "EVENTS",
    "KINDS",
    "EntryError",
    "LedgerEntry",
    "PreparedEntry",
    "build_entry",
    "build_entry_at",
    "build_entry_bytes",
    "check_subject",
    "entry_bytes",
    "entry_from_bytes",
    "entry_from_dict",
    "entry_leaf_hash",
    "entry_to_dict",
    "event_for_consent",
    "format_ts",
    "format_ts_us",
    "open_sealed",
    "prepare_entry",
    "signed_bytes",
    "verify_entry",
]

KINDS: Final = frozenset({"Consent", "DocumentReference"})
CONSENT_EVENTS: Final = frozenset(
    {"created", "proposed", "granted", "refused", "revoked", "withdrawn", "updated", "deleted"}
)
DOCUMENT_EVENTS: Final = frozenset({"created", "updated", "deleted"})
EVENTS: Final = CONSENT_EVENTS | DOCUMENT_EVENTS
#: Field order as in ledger.md §1 (serialisation sorts keys anyway).
ENTRY_FIELDS: Final = (
    "seq",
    "ts",
    "kind",
    "ref",
    "event",
    "subject",
    "subject_kid",
    "resource_sha256",
    "sealed",
    "rms_kid",
    "kid",
    "sig",
)
#: The fields of entries written before the pseudonym and RMS keys had ids in the entry.
ENTRY_FIELDS_V1: Final = tuple(f for f in ENTRY_FIELDS if f not in ("subject_kid", "rms_kid"))
_OPTIONAL_FIELDS: Final = frozenset(ENTRY_FIELDS) - frozenset(ENTRY_FIELDS_V1)

_FHIR_ID: Final = r"[A-Za-z0-9\-.]{1,64}"  # FHIR R4 id datatype
_REF_RE: Final = re.compile(rf"(Consent|DocumentReference)/({_FHIR_ID})/_history/({_FHIR_ID})")
_HEX64_RE: Final = re.compile(r"[0-9a-f]{64}")
_KID_RE: Final = re.compile(r"[0-9a-f]{16}")
_TS_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_MAX_SEQ: Final = 2**53 - 1  # also exact in JavaScript (browser verifier)
_SEALED_OVERHEAD: Final = 48  # ephemeral X25519 key + Poly1305 tag
_MAX_TS_US: Final = 253_402_300_800_000_000  # 10000-01-01T00:00:00Z
#: In orjson's output (no whitespace), where a number may start: an object member's value
#: right after ``":``, an array element right after ``[`` or ``,``; when one does, whether it
#: is a float (digits then '.', 'e' or 'E') or an integer of 16 digits or more (possibly beyond
#: 2**53). Times inside strings ("12:00:00.5") do not match (a digit precedes their ':'); a
#: look-alike inside a string only costs the general path. The first search usually fails.
_ANY_NUMBER: Final = re.compile(rb'(?:":|[,\[])-?[0-9]')
_NOT_FAST_NUMBER: Final = re.compile(rb'(?:":|[,\[])-?(?:[0-9]+[.eE]|[0-9]{16})')


class EntryError(ValueError):
    """A ledger entry is malformed, or its signature or sealed content does not check out."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger entry (ledger.md §1, plus ``kid``). All fields are JSON scalars."""

    seq: int
    ts: str
    kind: str
    ref: str
    event: str
    subject: str
    resource_sha256: str
    sealed: str
    kid: str
    sig: str
    subject_kid: str | None = None  # None only in entries of the first format
    rms_kid: str | None = None

    @property
    def key_id(self) -> str:
        """The signer's key id (alias of ``kid``)."""
        return self.kid


def format_ts(ts: _dt.datetime) -> str:
    """RFC 3339 UTC with microseconds and ``Z``, e.g. ``2024-05-01T12:00:00.000000Z``."""
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise EntryError("ts must be a timezone-aware datetime")
    return ts.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_for_consent(old_status: str | None, new_status: str | None, deleted: bool) -> str:
    """The ledger event for a Consent version (ledger.md §1, consent.md §2).

    ``old_status`` is the status of the previous version (``None`` on create), ``new_status``
    that of the new version (``None`` only for a delete), ``deleted`` is true for a FHIR delete.

    ============================== ============= ===========================================
    new status                     event         consent.md §2
    ============================== ============= ===========================================
    (FHIR delete)                  ``deleted``
    unchanged status               ``updated``   e.g. the patient narrows a proposal
    ``proposed``                   ``proposed``  1. a clinic asks
    ``active``                     ``granted``   2. the patient grants (or 4. acts alone)
    ``rejected``                   ``refused``   2. the patient refuses
    ``inactive``                   ``revoked``   3. the patient revokes
    ``entered-in-error``           ``withdrawn`` 1. a clinic withdraws its proposal
    ``draft`` (new resource)       ``created``
    ``draft`` (from another state) ``updated``
    ============================== ============= ===========================================
    """
    if deleted:
        return "deleted"
    if new_status is None:
        raise ValueError("a Consent version that is not deleted has a status")
    if old_status is not None and new_status == old_status:
        return "updated"
    mapped = {
        "proposed": "proposed",
        "active": "granted",
        "rejected": "refused",
        "inactive": "revoked",
        "entered-in-error": "withdrawn",
    }.get(new_status)
    if mapped is not None:
        return mapped
    if new_status == "draft":
        return "created" if old_status is None else "updated"
    raise ValueError(f"unknown Consent status {new_status!r}")


def entry_to_dict(entry: LedgerEntry) -> dict[str, Any]:
    """The entry as a JSON object (all fields it has)."""
    return {name: value for name in ENTRY_FIELDS if (value := getattr(entry, name)) is not None}


def _unsigned_dict(entry: LedgerEntry) -> dict[str, Any]:
    out = entry_to_dict(entry)
    del out["sig"]
    return out


def signed_bytes(entry: LedgerEntry) -> bytes:
    """The bytes the server signs: canonical JSON of every field except ``sig``."""
    return canonical_json(_unsigned_dict(entry))


def entry_bytes(entry: LedgerEntry) -> bytes:
    """The entry's canonical bytes — the Merkle leaf data and what is anchored externally."""
    return canonical_json(entry_to_dict(entry))


def entry_leaf_hash(entry: LedgerEntry) -> bytes:
    """``SHA-256(0x00 || entry_bytes(entry))`` — RFC 9162 §2.1.1."""
    return leaf_hash(entry_bytes(entry))


def _check_fields(entry: LedgerEntry, *, built: bool = False) -> None:
    """Syntactic checks of every field (no cryptography).

    ``built`` (from :func:`build_entry` only): ``ts`` comes from :func:`format_ts` and
    ``sealed`` from our own base64 encoder, so their costly re-parsing is skipped.
    """
    if isinstance(entry.seq, bool) or not isinstance(entry.seq, int):
        raise EntryError("seq must be an integer")
    if not 0 <= entry.seq <= _MAX_SEQ:
        raise EntryError("seq out of range")
    for name in ENTRY_FIELDS[1:]:
        value = getattr(entry, name)
        if not isinstance(value, str) and not (value is None and name in _OPTIONAL_FIELDS):
            raise EntryError(f"{name} must be a string")
    if (entry.subject_kid is None) != (entry.rms_kid is None):
        raise EntryError("an entry has both subject_kid and rms_kid, or neither")
    for name in ("subject_kid", "rms_kid"):
        value = getattr(entry, name)
        if value is not None and not _KID_RE.fullmatch(value):
            raise EntryError(f"{name} must be 16 lower-case hex digits")
    if not _TS_RE.fullmatch(entry.ts):
        raise EntryError("ts must be RFC 3339 UTC like 2024-05-01T12:00:00.000000Z")
    if not built:
        try:
            _dt.datetime.strptime(entry.ts, "%Y-%m-%dT%H:%M:%S.%fZ")
        except ValueError:
            raise EntryError("ts is not a valid date-time") from None
    if entry.kind not in KINDS:
        raise EntryError(f"kind must be one of {sorted(KINDS)}")
    m = _REF_RE.fullmatch(entry.ref)
    if m is None or m.group(1) != entry.kind:
        raise EntryError(f"ref must look like {entry.kind}/<id>/_history/<vid>")
    allowed = CONSENT_EVENTS if entry.kind == "Consent" else DOCUMENT_EVENTS
    if entry.event not in allowed:
        raise EntryError(f"event {entry.event!r} is not valid for {entry.kind}")
    if not _HEX64_RE.fullmatch(entry.subject):
        raise EntryError("subject must be 64 lower-case hex digits")
    if not _HEX64_RE.fullmatch(entry.resource_sha256):
        raise EntryError("resource_sha256 must be 64 lower-case hex digits")
    if not _KID_RE.fullmatch(entry.kid):
        raise EntryError("kid must be 16 lower-case hex digits")
    if not built:
        try:
            sealed = b64decode(entry.sealed)
        except ValueError:
            raise EntryError("sealed is not valid base64") from None
        if len(sealed) <= _SEALED_OVERHEAD:
            raise EntryError("sealed is too short to be a sealed box")
    if not built:
        try:
            b64decode(entry.sig, length=64)
        except ValueError:
            raise EntryError("sig must be base64 of a 64-byte Ed25519 signature") from None


def entry_from_dict(obj: Mapping[str, Any]) -> LedgerEntry:
    """Strictly rebuild an entry from a JSON object: exactly the known fields, well-formed."""
    if not isinstance(obj, Mapping):
        raise EntryError("an entry is a JSON object")
    keys = set(obj)
    if keys != set(ENTRY_FIELDS) and keys != set(ENTRY_FIELDS_V1):
        missing, extra = set(ENTRY_FIELDS) - keys, keys - set(ENTRY_FIELDS)
        raise EntryError(f"entry fields: missing {sorted(missing)}, unexpected {sorted(extra)}")
    entry = LedgerEntry(**{name: obj[name] for name in ENTRY_FIELDS if name in obj})
    _check_fields(entry)
    return entry


def entry_from_bytes(data: bytes) -> LedgerEntry:
    """Parse entry bytes, requiring them to be exactly canonical."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise EntryError("entry bytes are not JSON") from None
    entry = entry_from_dict(obj)
    if entry_bytes(entry) != data:
        raise EntryError("entry bytes are not in canonical form")
    return entry


def build_entry(
    seq: int,
    ts: _dt.datetime,
    kind: str,
    ref: str,
    event: str,
    patient_ref: str,
    resource_json_bytes: bytes | None,
    actor: str,
    keyring: KeyRing,
) -> LedgerEntry:
    """Build and sign the ledger entry for one resource version (ledger.md §1).

    ``resource_json_bytes`` is the JSON of the stored version (its ``resourceType`` must equal
    ``kind``; ``id`` and ``meta.versionId``, when present, must match ``ref``) or ``None`` for a
    ``deleted`` event. ``actor`` names who made the change (e.g. ``Practitioner/x``); it travels
    only inside the sealed box. ``patient_ref`` (e.g. ``Patient/123``) appears only as its keyed
    pseudonym.
    """
    return build_entry_bytes(
        seq, ts, kind, ref, event, patient_ref, resource_json_bytes, actor, keyring
    )[0]


def build_entry_bytes(
    seq: int,
    ts: _dt.datetime,
    kind: str,
    ref: str,
    event: str,
    patient_ref: str,
    resource_json_bytes: bytes | None,
    actor: str,
    keyring: KeyRing,
) -> tuple[LedgerEntry, bytes]:
    """:func:`build_entry` and the entry's canonical bytes (:func:`entry_bytes`) at once."""
    return build_entry_at(
        seq, format_ts(ts), kind, ref, event, patient_ref, resource_json_bytes, actor, keyring
    )


def format_ts_us(us: int) -> str:
    """:func:`format_ts` of a time in microseconds since the Unix epoch (UTC), without building
    a :class:`datetime.datetime` (the embedded log's write path)."""
    if isinstance(us, bool) or not isinstance(us, int) or not 0 <= us < _MAX_TS_US:
        raise EntryError("ts must be between 1970 and 9999")
    sec, frac = divmod(us, 1_000_000)
    t = time.gmtime(sec)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{frac:06d}Z"
    )


class _Kit:
    """What signing and sealing an entry needs from a :class:`KeyRing`, in the form the
    libsodium bindings take (looked up once per key, not once per entry)."""

    __slots__ = (
        "signing",
        "rms",
        "pseudonym_key",
        "sign_sk",
        "rms_pk",
        "pseudonym_secret",
        "kid",
        "rms_kid",
        "subject_kid",
    )

    def __init__(self, keyring: KeyRing) -> None:
        self.signing = keyring.signing
        self.rms = keyring.rms_public
        self.pseudonym_key = keyring.pseudonym_key
        # libsodium's 64-byte Ed25519 secret key (seed ‖ public key) for crypto_sign
        self.sign_sk: bytes = nacl.bindings.crypto_sign_seed_keypair(keyring.signing.secret_seed())[
            1
        ]
        self.rms_pk: bytes = keyring.rms_public.public_bytes
        self.pseudonym_secret: bytes = keyring.pseudonym_key.secret_bytes()
        self.kid: str = keyring.signing.key_id
        self.rms_kid: str = keyring.rms_public.key_id
        self.subject_kid: str = keyring.pseudonym_key.key_id

    def current(self, keyring: KeyRing) -> bool:
        return (
            self.signing is keyring.signing
            and self.rms is keyring.rms_public
            and self.pseudonym_key is keyring.pseudonym_key
        )


#: Kits by the id of the key ring's signing key (the kit holds that key, so the id cannot be
#: reused while the kit is cached); a rotated or replaced key simply makes a new kit.
_KITS: dict[int, _Kit] = {}


def _kit(keyring: KeyRing) -> _Kit:
    kit = _KITS.get(id(keyring.signing))
    if kit is None or not kit.current(keyring):
        if len(_KITS) >= 32:
            _KITS.clear()
        kit = _KITS[id(keyring.signing)] = _Kit(keyring)
    return kit


def _canonical_resource(raw: bytes) -> tuple[Any, bytes]:
    """``canonical_json_text(raw)`` with a cheaper test for when orjson's sorted output is
    already canonical: inside an object or array, a float or a large integer can only start
    right after ``":``, ``,`` or ``[`` (:data:`_NOT_FAST_NUMBER`), so a regular-expression
    search over the output finds every candidate (a look-alike inside a string only sends
    the value down the general path). Everything unusual goes to :func:`canonical_json_text`
    itself."""
    try:
        value = orjson.loads(raw)
        out = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return canonical_json_text(raw)
    if (
        not out.isascii()
        or out[:1] not in (b"{", b"[")
        or (_ANY_NUMBER.search(out) and _NOT_FAST_NUMBER.search(out))
        or out.count(b"[") + out.count(b"{") > 100
    ):
        return canonical_json_text(raw)
    return value, out


def build_entry_at(
    seq: int,
    ts: str,
    kind: str,
    ref: str,
    event: str,
    patient_ref: str,
    resource_json_bytes: bytes | None,
    actor: str,
    keyring: KeyRing,
) -> tuple[LedgerEntry, bytes]:
    """:func:`build_entry_bytes` with ``ts`` already formatted (:func:`format_ts`,
    :func:`format_ts_us`; it is checked)."""
    return prepare_entry(
        ts, kind, ref, event, patient_ref, resource_json_bytes, actor, keyring
    ).sign(seq)


class PreparedEntry:
    """An entry with everything but its ``seq`` — canonicalised, sealed, pseudonymised and
    hashed (:func:`prepare_entry`) — so that only signing waits for the log's head lock
    (:meth:`sign`)."""

    __slots__ = ("_fields", "_sign_sk")

    def __init__(self, fields: dict[str, Any], sign_sk: bytes) -> None:
        self._fields = fields
        self._sign_sk = sign_sk

    def sign(self, seq: int) -> tuple[LedgerEntry, bytes]:
        """The signed entry at position ``seq`` and its canonical bytes (:func:`entry_bytes`).

        Every value is a safe integer or an ASCII string that needs no JSON escaping (checked
        by :func:`prepare_entry`, or hex / base64 / key ids made there), so orjson's sorted
        output is the canonical JSON (:func:`fhir_consent.crypto.canonical_json`'s fast path).
        """
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise EntryError("seq must be an integer")
        if not 0 <= seq <= _MAX_SEQ:
            raise EntryError("seq out of range")
        fields = dict(self._fields, seq=seq)
        signed = nacl.bindings.crypto_sign(
            orjson.dumps(fields, option=orjson.OPT_SORT_KEYS), self._sign_sk
        )
        fields["sig"] = binascii.b2a_base64(signed[:64], newline=False).decode("ascii")
        return LedgerEntry(**fields), orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def prepare_entry(
    ts: str,
    kind: str,
    ref: str,
    event: str,
    patient_ref: str,
    resource_json_bytes: bytes | None,
    actor: str,
    keyring: KeyRing,
) -> PreparedEntry:
    """Check the inputs of an entry and do all its work that does not depend on ``seq``:
    canonical JSON of the resource, ``resource_sha256``, the sealed box, ``subject``."""
    m = _REF_RE.fullmatch(ref) if isinstance(ref, str) else None
    if kind not in KINDS or m is None or m.group(1) != kind:
        raise EntryError(f"ref {ref!r} is not a {kind} version reference")
    if not isinstance(ts, str) or not _TS_RE.fullmatch(ts):
        raise EntryError("ts must be RFC 3339 UTC like 2024-05-01T12:00:00.000000Z")
    if event not in (CONSENT_EVENTS if kind == "Consent" else DOCUMENT_EVENTS):
        raise EntryError(f"event {event!r} is not valid for {kind}")
    if not isinstance(actor, str) or not actor:
        raise EntryError("actor must be a non-empty string")
    if not isinstance(patient_ref, str) or not patient_ref:
        raise EntryError("patient_ref must be a non-empty string")
    resource: Any
    if resource_json_bytes is None:
        if event != "deleted":
            raise EntryError("only a 'deleted' entry may omit the resource")
        resource, resource_canonical = None, b"null"
    else:
        try:
            resource, resource_canonical = _canonical_resource(resource_json_bytes)
        except ValueError as exc:
            raise EntryError(f"resource cannot be canonicalised: {exc}") from None
        if not isinstance(resource, dict) or resource.get("resourceType") != kind:
            raise EntryError(f"resource is not a {kind}")
        if "id" in resource and resource["id"] != m.group(2):
            raise EntryError("resource id does not match ref")
        meta = resource.get("meta")
        vid = meta.get("versionId") if isinstance(meta, dict) else None
        if vid is not None and vid != m.group(3):
            raise EntryError("resource meta.versionId does not match ref")
    try:
        # == canonical_json({"actor": actor, "resource": resource}) without a second walk
        payload = b'{"actor":' + canonical_json(actor) + b',"resource":' + resource_canonical + b"}"
    except ValueError as exc:
        raise EntryError(f"actor cannot be canonicalised: {exc}") from None
    kit = _kit(keyring)
    try:  # the libsodium sealed box of ledger.md §1, to the RMS key (fresh ephemeral key)
        sealed = nacl.bindings.crypto_box_seal(payload, kit.rms_pk)
    except Exception:  # noqa: BLE001 - a libsodium failure; never echo its text
        raise CryptoError("sealing failed") from None
    return PreparedEntry(
        {
            "ts": ts,
            "kind": kind,
            "ref": ref,
            "event": event,
            # == PseudonymKey.pseudonym (HMAC-SHA-256, hex), by the one-shot OpenSSL call
            "subject": hmac.digest(kit.pseudonym_secret, patient_ref.encode(), "sha256").hex(),
            "subject_kid": kit.subject_kid,
            "resource_sha256": hashlib.sha256(resource_canonical).hexdigest(),
            "sealed": binascii.b2a_base64(sealed, newline=False).decode("ascii"),
            "rms_kid": kit.rms_kid,
            "kid": kit.kid,
        },
        kit.sign_sk,
    )


def verify_entry(entry: LedgerEntry, public_keys_by_id: Mapping[str, PublicSigningKey]) -> None:
    """Check an entry's fields and its signature by the key named in ``kid``.

    ``public_keys_by_id`` is e.g. :meth:`KeyRing.verify_keys` (current and retired keys).
    Raises :class:`EntryError` naming what is wrong.
    """
    _check_fields(entry)
    key = public_keys_by_id.get(entry.kid)
    if key is None:
        raise EntryError(f"entry {entry.seq}: unknown signing key id {entry.kid}")
    if key.key_id != entry.kid:
        raise EntryError(f"entry {entry.seq}: key registered under {entry.kid} has another id")
    try:
        key.verify(signed_bytes(entry), b64decode(entry.sig, length=64))
    except CryptoError:
        raise EntryError(f"entry {entry.seq}: signature does not verify") from None


def check_subject(
    entry: LedgerEntry, patient_ref: str, pseudonym_keys: Mapping[str, PseudonymKey]
) -> None:
    """Check that ``subject`` is the pseudonym of ``patient_ref`` under the key the entry
    names (``subject_kid``; entries of the first format: any of the keys). Raises
    :class:`EntryError`."""
    if entry.subject_kid is not None:
        key = pseudonym_keys.get(entry.subject_kid)
        if key is None:
            raise EntryError(f"entry {entry.seq}: unknown pseudonym key id {entry.subject_kid}")
        candidates = [key]
    else:
        candidates = list(pseudonym_keys.values())
    if not any(hmac.compare_digest(k.pseudonym(patient_ref), entry.subject) for k in candidates):
        raise EntryError(
            f"entry {entry.seq}: subject is not the pseudonym of the version's patient"
        )


def open_sealed(
    entry: LedgerEntry, rms_keys: SealKeyPair | Mapping[str, SealKeyPair]
) -> dict[str, Any]:
    """Decrypt ``sealed`` with the RMS key it was sealed to; return ``{"resource": …,
    "actor": …}``.

    ``rms_keys`` is one key pair or several by key id (e.g. :meth:`KeyRing.rms_keypairs`,
    current and retired); the entry's ``rms_kid`` picks the key (entries of the first format:
    each is tried). Also checks that the sealed resource matches the public
    ``resource_sha256`` commitment, so the server cannot seal something other than what it
    committed to. Raises :class:`EntryError`.
    """
    pairs = {rms_keys.key_id: rms_keys} if isinstance(rms_keys, SealKeyPair) else dict(rms_keys)
    if entry.rms_kid is not None:
        pair = pairs.get(entry.rms_kid)
        if pair is None:
            raise EntryError(
                f"entry {entry.seq}: sealed box cannot be opened with this key (it is sealed "
                f"to RMS key {entry.rms_kid})"
            )
        candidates = [pair]
    else:
        candidates = list(pairs.values())
    try:
        box = b64decode(entry.sealed)
    except ValueError:
        raise EntryError(f"entry {entry.seq}: sealed is not valid base64") from None
    plaintext: bytes | None = None
    for pair in candidates:
        try:
            plaintext = pair.unseal(box)
            break
        except CryptoError:
            continue
    if plaintext is None:
        raise EntryError(f"entry {entry.seq}: sealed box cannot be opened with this key")
    try:
        payload = orjson.loads(plaintext)
    except orjson.JSONDecodeError:
        raise EntryError(f"entry {entry.seq}: sealed content is not JSON") from None
    if not isinstance(payload, dict) or set(payload) != {"resource", "actor"}:
        raise EntryError(f"entry {entry.seq}: sealed content is not {{resource, actor}}")
    if not isinstance(payload["actor"], str):
        raise EntryError(f"entry {entry.seq}: sealed actor is not a string")
    if sha256_hex(canonical_json(payload["resource"])) != entry.resource_sha256:
        raise EntryError(f"entry {entry.seq}: sealed resource does not match resource_sha256")
    return payload
