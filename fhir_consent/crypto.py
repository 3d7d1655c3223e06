"""Cryptographic primitives and key files for the permissions ledger (ledger.md §1).

Everything here uses PyNaCl's high-level objects (``nacl.signing``, ``nacl.public``), plus the
standard library for SHA-256 and HMAC-SHA-256. Every cryptographic failure surfaces as one opaque
exception type, :class:`CryptoError`, raised ``from None`` so that nothing from the underlying
library (or any key material) leaks into tracebacks or logs. Key objects never show secrets in
``repr()``/``str()``: they show their key id only.

Algorithms (fixed by ledger.md §1):

* Ed25519 (RFC 8032) — the server's signature over each ledger entry and each checkpoint.
* X25519 + XSalsa20-Poly1305 sealed boxes (libsodium ``crypto_box_seal``) — the entry's ``sealed``
  field, readable only by the Record Management System (RMS).
* HMAC-SHA-256 with a server secret — the patient pseudonym in the entry's ``subject`` field.
* SHA-256 — public commitments (``resource_sha256``) and key ids.
* Canonical JSON in the style of RFC 8785 (JCS) — the byte form that is hashed and signed.

Key ids: an Ed25519 or X25519 public key's id is the hex of the first 8 bytes of SHA-256 of its
32 raw bytes (16 hex digits). A pseudonym secret's id is derived with HMAC so that it reveals
nothing about the secret.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import hmac
import math
import os
import re
import secrets
import stat
from collections.abc import Mapping
from json.encoder import encode_basestring as _json_string
from pathlib import Path
from typing import Any, Final

import nacl.exceptions
import nacl.public
import nacl.signing
import orjson

__all__ = [
    "ENV_PSEUDONYM_SECRET",
    "ENV_RETIRED_PSEUDONYM_SECRETS",
    "ENV_RETIRED_RMS_PRIVATE_KEYS",
    "ENV_RETIRED_RMS_PUBLIC_KEYS",
    "ENV_RETIRED_SIGNING_KEYS",
    "ENV_RMS_PRIVATE_KEY",
    "ENV_RMS_PUBLIC_KEY",
    "ENV_SIGNING_KEY",
    "CryptoError",
    "KeyRing",
    "KeyRingError",
    "PseudonymKey",
    "PublicSigningKey",
    "SealKeyPair",
    "SealPublicKey",
    "SigningKeyPair",
    "b64decode",
    "b64encode",
    "canonical_json",
    "canonical_json_text",
    "pseudonym",
    "sha256_hex",
]

#: Environment variables read by :meth:`KeyRing.from_env` (values are standard base64).
ENV_SIGNING_KEY: Final = "FHIR_CONSENT_SIGNING_KEY"  # 32-byte Ed25519 seed (secret)
ENV_RETIRED_SIGNING_KEYS: Final = "FHIR_CONSENT_RETIRED_SIGNING_KEYS"  # comma-separated publics
ENV_RMS_PUBLIC_KEY: Final = "FHIR_CONSENT_RMS_PUBLIC_KEY"  # 32-byte X25519 public key
ENV_RMS_PRIVATE_KEY: Final = "FHIR_CONSENT_RMS_PRIVATE_KEY"  # optional; the RMS side only
ENV_PSEUDONYM_SECRET: Final = "FHIR_CONSENT_PSEUDONYM_SECRET"  # >= 32 random bytes (secret)
#: Earlier keys kept after a rotation (comma-separated base64), so old entries still open/verify.
ENV_RETIRED_RMS_PUBLIC_KEYS: Final = "FHIR_CONSENT_RETIRED_RMS_PUBLIC_KEYS"
ENV_RETIRED_RMS_PRIVATE_KEYS: Final = "FHIR_CONSENT_RETIRED_RMS_PRIVATE_KEYS"  # RMS side only
ENV_RETIRED_PSEUDONYM_SECRETS: Final = "FHIR_CONSENT_RETIRED_PSEUDONYM_SECRETS"  # secret

_KEY_LEN: Final = 32
_SIG_LEN: Final = 64
_MIN_PSEUDONYM_SECRET: Final = 32
_MAX_SAFE_INT: Final = 2**53 - 1  # I-JSON (RFC 7493 §2.2): integers exactly representable


class CryptoError(Exception):
    """The single, deliberately opaque failure of any cryptographic operation.

    Bad signatures, undecryptable sealed boxes, malformed keys and unusable key files all raise
    this (or its subclass :class:`KeyRingError`). Messages never contain key material.
    """


class KeyRingError(CryptoError):
    """A key file or key environment variable is missing, malformed, unsafe or already exists."""


# --------------------------------------------------------------------------------------------
# Hashing, base64, canonical JSON
# --------------------------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of ``data`` (the ``resource_sha256`` commitment, ledger.md §1)."""
    return hashlib.sha256(data).hexdigest()


def b64encode(data: bytes) -> str:
    """Standard base64 with padding (RFC 4648 §4), as used by every field of the ledger."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, *, length: int | None = None) -> bytes:
    """Strict standard-base64 decoding: rejects non-alphabet characters, missing padding and
    non-canonical encodings; optionally requires an exact decoded ``length``.

    Raises :class:`ValueError`.
    """
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("non-canonical base64")
    if length is not None and len(raw) != length:
        raise ValueError(f"expected {length} bytes, got {len(raw)}")
    return raw


def _es_number(value: float) -> str:
    """Serialise a finite float like ECMAScript ``Number.prototype.toString`` (RFC 8785 §3.2.2.3).

    ``repr(float)`` already yields the shortest round-tripping digits (as ECMAScript requires);
    only the placement of the decimal point and the exponent syntax differ.
    """
    if not math.isfinite(value):
        raise ValueError("NaN and infinities are not allowed in canonical JSON")
    if value == 0:
        return "0"  # also for -0.0
    sign = "-" if value < 0 else ""
    text = repr(abs(value))
    mantissa, _, exp_text = text.partition("e")
    exponent = int(exp_text) if exp_text else 0
    int_part, _, frac_part = mantissa.partition(".")
    digits = int_part + frac_part
    point = len(int_part) + exponent  # value = 0.<digits> * 10**point
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        exp = ("e+" if e >= 0 else "e-") + str(abs(e))
        out = digits + exp if k == 1 else digits[0] + "." + digits[1:] + exp
    return sign + out


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _check_tree(obj: object, depth: int = 0) -> bool:
    """Validate a JSON value tree; return True when orjson's output is already canonical.

    orjson with ``OPT_SORT_KEYS`` produces exactly the RFC 8785 bytes for our value types —
    objects with ASCII keys, strings, integers within ±(2**53-1), booleans and null: it emits no
    whitespace, writes UTF-8 unescaped, escapes only ``"`` ``\\`` and U+0000..U+001F (using
    ``\\b \\f \\n \\r \\t`` and lower-case ``\\u00xx``), and sorts keys by code point, which equals
    RFC 8785's UTF-16 order for ASCII keys. It differs from RFC 8785 for floats (``1.0``,
    ``1e21``) and for keys with characters at or above U+E000, and it writes NaN as ``null``;
    those cases take the slow, pure-Python path. ``tests/test_crypto.py`` checks both paths
    agree on random data.
    """
    if depth > 100:
        raise ValueError("JSON value nested too deeply")
    if obj is None or isinstance(obj, bool | str):
        return True
    if isinstance(obj, int):
        if -_MAX_SAFE_INT <= obj <= _MAX_SAFE_INT:
            return True
        # RFC 8785 numbers are IEEE 754 doubles: a larger integer is accepted only when a double
        # represents it exactly, and is then written as ECMAScript writes that double.
        try:
            exact = int(float(obj)) == obj
        except OverflowError:
            exact = False
        if not exact:
            raise ValueError("integer not exactly representable as an IEEE 754 double")
        return False
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError("NaN and infinities are not allowed in canonical JSON")
        return False
    if isinstance(obj, list | tuple):
        fast = True
        for item in obj:
            fast = _check_tree(item, depth + 1) and fast
        return fast
    if isinstance(obj, dict):
        fast = True
        for key, item in obj.items():
            if not isinstance(key, str):
                raise ValueError("JSON object keys must be strings")
            if not key.isascii():
                fast = False
            fast = _check_tree(item, depth + 1) and fast
        return fast
    raise ValueError(f"type {type(obj).__name__} is not allowed in canonical JSON")


def _encode_slow(obj: object, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append(_json_string(obj))
    elif isinstance(obj, int):
        out.append(str(obj) if -_MAX_SAFE_INT <= obj <= _MAX_SAFE_INT else _es_number(float(obj)))
    elif isinstance(obj, float):
        out.append(_es_number(obj))
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, item in enumerate(obj):
            if i:
                out.append(",")
            _encode_slow(item, out)
        out.append("]")
    else:
        assert isinstance(obj, dict)
        out.append("{")
        for i, key in enumerate(sorted(obj, key=_utf16_key)):
            if i:
                out.append(",")
            out.append(_json_string(key))
            out.append(":")
            _encode_slow(obj[key], out)
        out.append("}")


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes of ``obj`` (RFC 8785 / JCS style, ledger.md §1).

    Sorted keys (UTF-16 code-unit order), no insignificant whitespace, UTF-8, strings escaped as
    in ECMAScript ``JSON.stringify``, numbers as ECMAScript renders doubles; NaN/Infinity,
    integers that no double represents exactly, non-string keys, lone surrogates and non-JSON
    types are rejected
    with :class:`ValueError`. Common values go through orjson (see :func:`_check_tree` for why
    that is byte-identical); values holding floats or non-ASCII keys use a pure-Python encoder.
    """
    if _check_tree(obj):
        try:
            return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError as exc:  # e.g. lone surrogates
            raise ValueError(f"cannot encode as canonical JSON: {exc}") from None
    out: list[str] = []
    _encode_slow(obj, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("lone surrogate in string") from None


_STRING_TOKEN: Final = re.compile(rb'"(?:[^"\\]|\\.)*"')
#: In orjson's output with the strings removed: a float (a digit then '.', 'e' or 'E') or an
#: integer of 16 digits or more (possibly beyond 2**53).
_NOT_FAST_NUMBER: Final = re.compile(rb"[0-9][.eE]|[0-9]{16}")


def canonical_json_text(text: bytes | str) -> tuple[Any, bytes]:
    """Parse JSON text and return ``(value, canonical_json(value))`` — the same bytes as
    :func:`canonical_json`, cheaper for the usual document.

    Parsed JSON text holds only objects, arrays, strings, integers, floats, booleans and null
    (never NaN, infinities or other types), so the orjson bytes are canonical unless they hold
    a float, an integer beyond 2**53, or a non-ASCII key (see :func:`_check_tree`). Instead of
    walking the value in Python, this looks for those in orjson's output: with every string
    token removed, a digit followed by ``.``/``e``/``E`` is a float and 16 digits in a row may
    be a large integer; non-ASCII output may hold a non-ASCII key. Any of these sends the
    value through :func:`canonical_json` (so the rules, limits and errors are the same).
    Raises :class:`ValueError` for invalid JSON.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ValueError("not valid JSON") from None
    try:
        out = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return value, canonical_json(value)  # raises the canonical error
    if not out.isascii() or _NOT_FAST_NUMBER.search(_STRING_TOKEN.sub(b"", out)):
        return value, canonical_json(value)
    if out.count(b"[") + out.count(b"{") > 100 and _depth(value) > 100:
        raise ValueError("JSON value nested too deeply")
    return value, out


def _depth(obj: object) -> int:
    if isinstance(obj, dict):
        return 1 + max((_depth(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max((_depth(v) for v in obj), default=0)
    return 0


# --------------------------------------------------------------------------------------------
# Key objects
# --------------------------------------------------------------------------------------------


def _public_key_id(public: bytes) -> str:
    return hashlib.sha256(public).digest()[:8].hex()


class PublicSigningKey:
    """An Ed25519 public key (verify only), e.g. a retired server key kept for old entries."""

    __slots__ = ("_vk", "_raw", "key_id")

    def __init__(self, public: bytes) -> None:
        if not isinstance(public, bytes) or len(public) != _KEY_LEN:
            raise CryptoError("an Ed25519 public key is 32 bytes")
        try:
            self._vk = nacl.signing.VerifyKey(public)
        except Exception:
            raise CryptoError("invalid Ed25519 public key") from None
        self._raw = public
        self.key_id: str = _public_key_id(public)

    @classmethod
    def from_base64(cls, text: str) -> PublicSigningKey:
        try:
            return cls(b64decode(text, length=_KEY_LEN))
        except ValueError:
            raise CryptoError("invalid base64 Ed25519 public key") from None

    @property
    def public_bytes(self) -> bytes:
        return self._raw

    def to_base64(self) -> str:
        return b64encode(self._raw)

    def verify(self, message: bytes, signature: bytes) -> None:
        """Check a detached Ed25519 signature; raise :class:`CryptoError` if it does not verify."""
        if not isinstance(signature, bytes) or len(signature) != _SIG_LEN:
            raise CryptoError("signature verification failed")
        try:
            self._vk.verify(message, signature)
        except Exception:
            raise CryptoError("signature verification failed") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicSigningKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"PublicSigningKey(key_id={self.key_id!r})"


class SigningKeyPair:
    """The server's Ed25519 signing key (RFC 8032). ``repr()`` shows only the key id."""

    __slots__ = ("_sk", "public_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._sk = signing_key
        self.public_key: PublicSigningKey = PublicSigningKey(bytes(signing_key.verify_key))

    @classmethod
    def generate(cls) -> SigningKeyPair:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKeyPair:
        if not isinstance(seed, bytes) or len(seed) != _KEY_LEN:
            raise CryptoError("an Ed25519 seed is 32 bytes")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def key_id(self) -> str:
        return self.public_key.key_id

    @property
    def public_bytes(self) -> bytes:
        return self.public_key.public_bytes

    def secret_seed(self) -> bytes:
        """The 32-byte secret seed — for writing key files only; never log it."""
        return bytes(self._sk)

    def sign(self, message: bytes) -> bytes:
        """A 64-byte detached Ed25519 signature of ``message``."""
        return bytes(self._sk.sign(message).signature)

    def verify(self, message: bytes, signature: bytes) -> None:
        self.public_key.verify(message, signature)

    def __repr__(self) -> str:
        return f"SigningKeyPair(key_id={self.key_id!r})"


class SealPublicKey:
    """An X25519 public key that anyone may use to seal data to its owner (the RMS)."""

    __slots__ = ("_pk", "_box", "key_id")

    def __init__(self, public: bytes) -> None:
        if not isinstance(public, bytes) or len(public) != _KEY_LEN:
            raise CryptoError("an X25519 public key is 32 bytes")
        try:
            self._pk = nacl.public.PublicKey(public)
            self._box = nacl.public.SealedBox(self._pk)
        except Exception:
            raise CryptoError("invalid X25519 public key") from None
        self.key_id: str = _public_key_id(public)

    @classmethod
    def from_base64(cls, text: str) -> SealPublicKey:
        try:
            return cls(b64decode(text, length=_KEY_LEN))
        except ValueError:
            raise CryptoError("invalid base64 X25519 public key") from None

    @property
    def public_bytes(self) -> bytes:
        return bytes(self._pk)

    def to_base64(self) -> str:
        return b64encode(self.public_bytes)

    def seal(self, plaintext: bytes) -> bytes:
        """An anonymous libsodium sealed box (X25519 + XSalsa20-Poly1305) to this key."""
        try:
            return bytes(self._box.encrypt(plaintext))
        except Exception:
            raise CryptoError("sealing failed") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SealPublicKey) and other.public_bytes == self.public_bytes

    def __hash__(self) -> int:
        return hash(self.public_bytes)

    def __repr__(self) -> str:
        return f"SealPublicKey(key_id={self.key_id!r})"


class SealKeyPair:
    """The RMS's X25519 key pair, which opens sealed boxes. ``repr()`` shows only the key id."""

    __slots__ = ("_sk", "_unseal_box", "public_key")

    def __init__(self, private_key: nacl.public.PrivateKey) -> None:
        self._sk = private_key
        self._unseal_box = nacl.public.SealedBox(private_key)
        self.public_key: SealPublicKey = SealPublicKey(bytes(private_key.public_key))

    @classmethod
    def generate(cls) -> SealKeyPair:
        return cls(nacl.public.PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, private: bytes) -> SealKeyPair:
        if not isinstance(private, bytes) or len(private) != _KEY_LEN:
            raise CryptoError("an X25519 private key is 32 bytes")
        return cls(nacl.public.PrivateKey(private))

    @property
    def key_id(self) -> str:
        return self.public_key.key_id

    def secret_bytes(self) -> bytes:
        """The 32-byte private key — for writing key files only; never log it."""
        return bytes(self._sk)

    def seal(self, plaintext: bytes) -> bytes:
        return self.public_key.seal(plaintext)

    def unseal(self, ciphertext: bytes) -> bytes:
        """Open a sealed box; raise :class:`CryptoError` if it was not sealed to this key or
        was altered."""
        try:
            return bytes(self._unseal_box.decrypt(ciphertext))
        except Exception:
            raise CryptoError("cannot open sealed box") from None

    def __repr__(self) -> str:
        return f"SealKeyPair(key_id={self.key_id!r})"


def pseudonym(secret: bytes, patient_ref: str) -> str:
    """Keyed pseudonym of a patient: hex HMAC-SHA-256(secret, UTF-8 ``patient_ref``) (ledger.md §1).

    Pass the patient's canonical relative reference, e.g. ``"Patient/123"``; the same reference
    always yields the same pseudonym under one secret, and nothing about it without the secret.

    Why the standard library: ledger.md fixes HMAC-SHA-256, which PyNaCl's high-level API does
    not offer (its keyed hashes are BLAKE2b and SipHash). ``hmac`` with ``hashlib.sha256`` is the
    OpenSSL-backed, well-reviewed RFC 2104 implementation — and a browser can recompute the same
    value with WebCrypto's HMAC, which it could not do for BLAKE2b.
    """
    if not isinstance(secret, bytes) or len(secret) < _MIN_PSEUDONYM_SECRET:
        raise CryptoError("the pseudonym secret must be at least 32 bytes")
    if not isinstance(patient_ref, str) or not patient_ref:
        raise ValueError("patient_ref must be a non-empty string")
    return hmac.new(secret, patient_ref.encode("utf-8"), hashlib.sha256).hexdigest()


class PseudonymKey:
    """The server secret behind patient pseudonyms. ``repr()`` shows only the key id."""

    __slots__ = ("_secret", "key_id")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < _MIN_PSEUDONYM_SECRET:
            raise CryptoError("the pseudonym secret must be at least 32 bytes")
        self._secret = secret
        # An id that identifies the secret without revealing anything about it.
        self.key_id: str = (
            hmac.new(secret, b"fhir-consent key id", hashlib.sha256).digest()[:8].hex()
        )

    @classmethod
    def generate(cls) -> PseudonymKey:
        return cls(secrets.token_bytes(_KEY_LEN))

    def secret_bytes(self) -> bytes:
        """The secret — for writing key files only; never log it."""
        return self._secret

    def pseudonym(self, patient_ref: str) -> str:
        return pseudonym(self._secret, patient_ref)

    def __repr__(self) -> str:
        return f"PseudonymKey(key_id={self.key_id!r})"


# --------------------------------------------------------------------------------------------
# Key ring and key files
# --------------------------------------------------------------------------------------------

_FORMAT: Final = "fhir-consent-key/1"
SIGNING_FILE: Final = "signing.key"
RETIRED_PREFIX: Final = "signing-retired-"
RETIRED_SUFFIX: Final = ".pub"
RMS_PRIVATE_FILE: Final = "rms-seal.key"
RMS_PUBLIC_FILE: Final = "rms-seal.pub"
RMS_RETIRED_PREFIX: Final = "rms-seal-retired-"  # <kid>.pub, and <kid>.key when held
PSEUDONYM_FILE: Final = "pseudonym.key"
PSEUDONYM_RETIRED_PREFIX: Final = "pseudonym-retired-"  # <kid>.key


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, doc: Mapping[str, str]) -> None:
    """Create ``path`` with mode 0600; never overwrite or follow a symlink."""
    data = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyRingError(f"refusing to overwrite existing key file {path}") from None
    try:
        os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key_file(path: Path, expected_type: str, *, secret: bool) -> dict[str, str]:
    try:
        st = os.stat(path, follow_symlinks=True)
    except FileNotFoundError:
        raise KeyRingError(f"missing key file {path}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyRingError(f"key file {path} is not a regular file")
    if secret and st.st_mode & 0o077:
        raise KeyRingError(
            f"key file {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o});"
            " it must be 0600"
        )
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        raise KeyRingError(f"unreadable key file {path}") from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != _FORMAT
        or doc.get("type") != expected_type
        or not all(isinstance(v, str) for v in doc.values())
    ):
        raise KeyRingError(f"key file {path} is not a {expected_type} key ({_FORMAT})")
    return doc


def _field(doc: Mapping[str, str], name: str, path: Path, *, length: int | None = None) -> bytes:
    try:
        return b64decode(doc[name], length=length)
    except (KeyError, ValueError):
        raise KeyRingError(f"key file {path}: field {name!r} is missing or malformed") from None


def _check_id(doc: Mapping[str, str], actual: str, path: Path) -> None:
    if doc.get("key_id") != actual:
        raise KeyRingError(f"key file {path}: key_id does not match the key material")


def _replace(directory: Path, name: str, doc: Mapping[str, str]) -> None:
    """Atomically replace ``directory/name`` with a new 0600 key file (write, then rename)."""
    tmp = directory / f".{name}.{secrets.token_hex(8)}.tmp"
    _write_new(tmp, doc)
    try:
        os.replace(tmp, directory / name)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise KeyRingError(f"cannot replace {directory / name}") from None


def _read_rms_private(path: Path, public: SealPublicKey) -> SealKeyPair:
    doc = _read_key_file(path, "x25519-private", secret=True)
    pair = SealKeyPair.from_private_bytes(_field(doc, "secret", path, length=_KEY_LEN))
    _check_id(doc, pair.key_id, path)
    if pair.public_key != public:
        raise KeyRingError(f"key file {path} does not match its public key")
    return pair


def _read_pseudonym(path: Path) -> PseudonymKey:
    doc = _read_key_file(path, "hmac-sha256-secret", secret=True)
    secret = _field(doc, "secret", path)
    if len(secret) < _MIN_PSEUDONYM_SECRET:
        raise KeyRingError(f"key file {path}: the secret must be at least 32 bytes")
    pkey = PseudonymKey(secret)
    _check_id(doc, pkey.key_id, path)
    return pkey


class KeyRing:
    """All keys the ledger needs, loaded from a key directory or from environment variables.

    * ``signing`` — the current Ed25519 key that signs new entries and checkpoints;
    * ``retired`` — public keys of earlier signing keys, by key id, so old entries still verify;
    * ``rms_public`` — the RMS's current X25519 public key that new ``sealed`` fields are
      sealed to;
    * ``rms_keypair`` — the RMS private key, or ``None`` (production servers should not hold it:
      delete ``rms-seal.key`` or leave ``FHIR_CONSENT_RMS_PRIVATE_KEY`` unset);
    * ``retired_rms`` — earlier RMS public keys by key id (entries name the one they were
      sealed to in ``rms_kid``), and ``retired_rms_keypairs`` the private halves held here;
    * ``pseudonym_key`` — the current HMAC secret for ``subject``; ``retired_pseudonym`` the
      earlier ones by key id (entries name theirs in ``subject_kid``), so ``ledger verify``
      can still recompute old subjects.

    Every kind rotates by key id (:meth:`rotate_signing_key`, :meth:`rotate_rms_key`,
    :meth:`rotate_pseudonym_key`): new entries use the new key, old entries keep naming
    theirs, and the retired keys stay in the ring.

    Key directory layout (one JSON document per file, every file mode 0600, directory 0700)::

        signing.key                     current Ed25519 seed + public key + key_id
        signing-retired-<kid>.pub       one per retired signing key (public key only)
        rms-seal.key                    X25519 private key (optional)
        rms-seal.pub                    X25519 public key
        rms-seal-retired-<kid>.pub      one per retired RMS key (and .key when held here)
        pseudonym.key                   HMAC-SHA-256 secret
        pseudonym-retired-<kid>.key     one per retired pseudonym secret

    Files holding secrets are refused when group/other can access them.
    """

    __slots__ = (
        "signing",
        "retired",
        "rms_public",
        "rms_keypair",
        "retired_rms",
        "retired_rms_keypairs",
        "pseudonym_key",
        "retired_pseudonym",
    )

    def __init__(
        self,
        signing: SigningKeyPair,
        rms_public: SealPublicKey,
        pseudonym_key: PseudonymKey,
        *,
        retired: Mapping[str, PublicSigningKey] | None = None,
        rms_keypair: SealKeyPair | None = None,
        retired_rms: Mapping[str, SealPublicKey | SealKeyPair] | None = None,
        retired_pseudonym: Mapping[str, PseudonymKey] | None = None,
    ) -> None:
        if rms_keypair is not None and rms_keypair.public_key != rms_public:
            raise KeyRingError("the RMS private key does not match the RMS public key")
        self.signing = signing
        self.rms_public = rms_public
        self.rms_keypair = rms_keypair
        self.pseudonym_key = pseudonym_key
        self.retired: dict[str, PublicSigningKey] = {}
        for kid, key in (retired or {}).items():
            if kid != key.key_id:
                raise KeyRingError(f"retired key id {kid!r} does not match its key")
            if kid != signing.key_id:
                self.retired[kid] = key
        self.retired_rms: dict[str, SealPublicKey] = {}
        self.retired_rms_keypairs: dict[str, SealKeyPair] = {}
        for kid, rkey in (retired_rms or {}).items():
            if kid != rkey.key_id:
                raise KeyRingError(f"retired RMS key id {kid!r} does not match its key")
            if kid == rms_public.key_id:
                continue
            if isinstance(rkey, SealKeyPair):
                self.retired_rms_keypairs[kid] = rkey
                self.retired_rms[kid] = rkey.public_key
            else:
                self.retired_rms[kid] = rkey
        self.retired_pseudonym: dict[str, PseudonymKey] = {}
        for kid, pkey in (retired_pseudonym or {}).items():
            if kid != pkey.key_id:
                raise KeyRingError(f"retired pseudonym key id {kid!r} does not match its key")
            if kid != pseudonym_key.key_id:
                self.retired_pseudonym[kid] = pkey

    # -- use ------------------------------------------------------------------------------

    @property
    def signing_key_id(self) -> str:
        return self.signing.key_id

    def verify_keys(self) -> dict[str, PublicSigningKey]:
        """Every public key an entry or checkpoint of this log may be signed with, by key id."""
        keys = dict(self.retired)
        keys[self.signing.key_id] = self.signing.public_key
        return keys

    def pseudonym(self, patient_ref: str) -> str:
        return self.pseudonym_key.pseudonym(patient_ref)

    def pseudonym_keys(self) -> dict[str, PseudonymKey]:
        """Every pseudonym secret of this log (current and retired), by key id."""
        keys = dict(self.retired_pseudonym)
        keys[self.pseudonym_key.key_id] = self.pseudonym_key
        return keys

    def rms_public_keys(self) -> dict[str, SealPublicKey]:
        """Every RMS public key entries of this log were sealed to, by key id."""
        keys = dict(self.retired_rms)
        keys[self.rms_public.key_id] = self.rms_public
        return keys

    def rms_keypairs(self) -> dict[str, SealKeyPair]:
        """The RMS private keys held here (current and retired), by key id — usually none
        on a production server."""
        keys = dict(self.retired_rms_keypairs)
        if self.rms_keypair is not None:
            keys[self.rms_keypair.key_id] = self.rms_keypair
        return keys

    def public_bundle(self) -> dict[str, Any]:
        """Public keys and key ids for verifiers (JSON-serialisable; contains no secret)."""
        return {
            "signing_key_id": self.signing.key_id,
            "signing_keys": {kid: key.to_base64() for kid, key in self.verify_keys().items()},
            "rms_seal_key_id": self.rms_public.key_id,
            "rms_seal_key": self.rms_public.to_base64(),
            "rms_seal_keys": {kid: k.to_base64() for kid, k in self.rms_public_keys().items()},
            "pseudonym_key_id": self.pseudonym_key.key_id,
            "pseudonym_key_ids": sorted(self.pseudonym_keys()),
        }

    def to_env(self) -> dict[str, str]:
        """The environment-variable form of this key ring (contains SECRETS; for provisioning)."""
        env = {
            ENV_SIGNING_KEY: b64encode(self.signing.secret_seed()),
            ENV_RMS_PUBLIC_KEY: self.rms_public.to_base64(),
            ENV_PSEUDONYM_SECRET: b64encode(self.pseudonym_key.secret_bytes()),
        }
        if self.retired:
            env[ENV_RETIRED_SIGNING_KEYS] = ",".join(k.to_base64() for k in self.retired.values())
        if self.rms_keypair is not None:
            env[ENV_RMS_PRIVATE_KEY] = b64encode(self.rms_keypair.secret_bytes())
        if self.retired_rms:
            env[ENV_RETIRED_RMS_PUBLIC_KEYS] = ",".join(
                k.to_base64() for k in self.retired_rms.values()
            )
        if self.retired_rms_keypairs:
            env[ENV_RETIRED_RMS_PRIVATE_KEYS] = ",".join(
                b64encode(k.secret_bytes()) for k in self.retired_rms_keypairs.values()
            )
        if self.retired_pseudonym:
            env[ENV_RETIRED_PSEUDONYM_SECRETS] = ",".join(
                b64encode(k.secret_bytes()) for k in self.retired_pseudonym.values()
            )
        return env

    def __repr__(self) -> str:
        return (
            f"KeyRing(signing={self.signing.key_id!r}, retired={sorted(self.retired)!r}, "
            f"rms={self.rms_public.key_id!r}, rms_private={self.rms_keypair is not None}, "
            f"retired_rms={sorted(self.retired_rms)!r}, "
            f"pseudonym={self.pseudonym_key.key_id!r}, "
            f"retired_pseudonym={sorted(self.retired_pseudonym)!r})"
        )

    # -- key directory --------------------------------------------------------------------

    @classmethod
    def generate(cls, directory: str | os.PathLike[str]) -> KeyRing:
        """Create a fresh key ring in ``directory`` (created 0700 if needed).

        Refuses (``KeyRingError``) if any of the key files already exists.
        """
        d = Path(directory)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in (SIGNING_FILE, RMS_PRIVATE_FILE, RMS_PUBLIC_FILE, PSEUDONYM_FILE):
            if (d / name).exists() or (d / name).is_symlink():
                raise KeyRingError(f"refusing to overwrite existing key file {d / name}")
        signing = SigningKeyPair.generate()
        rms = SealKeyPair.generate()
        pkey = PseudonymKey.generate()
        created = _now()
        _write_new(d / PSEUDONYM_FILE, _pseudonym_doc(pkey, created))
        _write_new(d / RMS_PRIVATE_FILE, _rms_private_doc(rms, created))
        _write_new(d / RMS_PUBLIC_FILE, _rms_public_doc(rms.public_key, created))
        _write_new(d / SIGNING_FILE, _signing_doc(signing, created))
        _fsync_dir(d)
        return cls(signing, rms.public_key, pkey, rms_keypair=rms)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> KeyRing:
        """Load a key ring written by :meth:`generate` (and :meth:`rotate_signing_key`)."""
        d = Path(directory)
        if not d.is_dir():
            raise KeyRingError(f"key directory {d} does not exist")

        path = d / SIGNING_FILE
        doc = _read_key_file(path, "ed25519-signing", secret=True)
        try:
            signing = SigningKeyPair.from_seed(_field(doc, "secret", path, length=_KEY_LEN))
        except KeyRingError:
            raise
        except CryptoError:
            raise KeyRingError(f"key file {path}: invalid Ed25519 seed") from None
        _check_id(doc, signing.key_id, path)
        if _field(doc, "public", path, length=_KEY_LEN) != signing.public_bytes:
            raise KeyRingError(f"key file {path}: public key does not match the seed")

        retired: dict[str, PublicSigningKey] = {}
        for path in sorted(d.glob(f"{RETIRED_PREFIX}*{RETIRED_SUFFIX}")):
            doc = _read_key_file(path, "ed25519-public", secret=False)
            try:
                key = PublicSigningKey(_field(doc, "public", path, length=_KEY_LEN))
            except KeyRingError:
                raise
            except CryptoError:
                raise KeyRingError(f"key file {path}: invalid Ed25519 public key") from None
            _check_id(doc, key.key_id, path)
            retired[key.key_id] = key

        path = d / RMS_PUBLIC_FILE
        doc = _read_key_file(path, "x25519-public", secret=False)
        rms_public = SealPublicKey(_field(doc, "public", path, length=_KEY_LEN))
        _check_id(doc, rms_public.key_id, path)

        rms_keypair: SealKeyPair | None = None
        path = d / RMS_PRIVATE_FILE
        if path.exists():
            rms_keypair = _read_rms_private(path, rms_public)

        retired_rms: dict[str, SealPublicKey | SealKeyPair] = {}
        for path in sorted(d.glob(f"{RMS_RETIRED_PREFIX}*.pub")):
            doc = _read_key_file(path, "x25519-public", secret=False)
            public_key = SealPublicKey(_field(doc, "public", path, length=_KEY_LEN))
            _check_id(doc, public_key.key_id, path)
            private_path = path.with_suffix(".key")
            if private_path.exists():
                retired_rms[public_key.key_id] = _read_rms_private(private_path, public_key)
            else:
                retired_rms[public_key.key_id] = public_key

        pkey = _read_pseudonym(d / PSEUDONYM_FILE)
        retired_pseudonym: dict[str, PseudonymKey] = {}
        for path in sorted(d.glob(f"{PSEUDONYM_RETIRED_PREFIX}*.key")):
            old_key = _read_pseudonym(path)
            retired_pseudonym[old_key.key_id] = old_key

        return cls(
            signing,
            rms_public,
            pkey,
            retired=retired,
            rms_keypair=rms_keypair,
            retired_rms=retired_rms,
            retired_pseudonym=retired_pseudonym,
        )

    @classmethod
    def rotate_signing_key(cls, directory: str | os.PathLike[str]) -> KeyRing:
        """Replace the current signing key with a new one, keeping the old public key.

        The old public key is written to ``signing-retired-<kid>.pub`` *before* the new key
        replaces ``signing.key`` (atomically, via rename), so a crash at any point leaves a
        loadable key ring under which every existing entry still verifies. The old private
        seed is dropped. Returns the reloaded key ring.
        """
        d = Path(directory)
        old = cls.load(d)
        retired_path = d / f"{RETIRED_PREFIX}{old.signing.key_id}{RETIRED_SUFFIX}"
        if not retired_path.exists():
            _write_new(retired_path, _public_signing_doc(old.signing.public_key, _now()))
        _replace(d, SIGNING_FILE, _signing_doc(SigningKeyPair.generate(), _now()))
        _fsync_dir(d)
        return cls.load(d)

    @classmethod
    def rotate_rms_key(
        cls, directory: str | os.PathLike[str], public: SealPublicKey | None = None
    ) -> KeyRing:
        """Seal new entries to a new RMS key: ``public`` (the RMS made the pair and gave us
        its public key), else a pair generated here (``rms-seal.key``, to hand to the RMS).

        The old public key — and the old private key when this directory holds it — is kept
        as ``rms-seal-retired-<kid>.pub``/``.key`` *before* the current files are replaced, so
        entries sealed to it (they name it in ``rms_kid``) can still be opened. Returns the
        reloaded key ring.
        """
        d = Path(directory)
        old = cls.load(d)
        if public is not None and public == old.rms_public:
            raise KeyRingError("the new RMS public key is the current one")
        kid = old.rms_public.key_id
        retired_pub = d / f"{RMS_RETIRED_PREFIX}{kid}.pub"
        if not retired_pub.exists():
            if old.rms_keypair is not None:
                _write_new(
                    d / f"{RMS_RETIRED_PREFIX}{kid}.key", _rms_private_doc(old.rms_keypair, _now())
                )
            _write_new(retired_pub, _rms_public_doc(old.rms_public, _now()))
        created = _now()
        if public is None:
            pair = SealKeyPair.generate()
            _replace(d, RMS_PRIVATE_FILE, _rms_private_doc(pair, created))
            _replace(d, RMS_PUBLIC_FILE, _rms_public_doc(pair.public_key, created))
        else:
            (d / RMS_PRIVATE_FILE).unlink(missing_ok=True)  # kept above as retired, if held
            _replace(d, RMS_PUBLIC_FILE, _rms_public_doc(public, created))
        _fsync_dir(d)
        return cls.load(d)

    @classmethod
    def rotate_pseudonym_key(cls, directory: str | os.PathLike[str]) -> KeyRing:
        """New pseudonym secret for new entries; the old one is kept as
        ``pseudonym-retired-<kid>.key`` (written before ``pseudonym.key`` is replaced) so
        ``ledger verify`` can still recompute old entries' ``subject``. A patient's entries
        from before and after the rotation carry unrelated pseudonyms. Returns the reloaded
        key ring."""
        d = Path(directory)
        old = cls.load(d)
        retired_path = d / f"{PSEUDONYM_RETIRED_PREFIX}{old.pseudonym_key.key_id}.key"
        if not retired_path.exists():
            _write_new(retired_path, _pseudonym_doc(old.pseudonym_key, _now()))
        _replace(d, PSEUDONYM_FILE, _pseudonym_doc(PseudonymKey.generate(), _now()))
        _fsync_dir(d)
        return cls.load(d)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KeyRing:
        """Build a key ring from base64 environment values (e.g. ``os.environ``).

        Required: ``FHIR_CONSENT_SIGNING_KEY`` (32-byte Ed25519 seed),
        ``FHIR_CONSENT_PSEUDONYM_SECRET`` (>= 32 bytes) and ``FHIR_CONSENT_RMS_PUBLIC_KEY``
        (unless ``FHIR_CONSENT_RMS_PRIVATE_KEY`` is given). Optional:
        ``FHIR_CONSENT_RETIRED_SIGNING_KEYS`` (comma-separated Ed25519 public keys).
        Error messages name the variable, never its value.
        """

        def get(name: str, length: int | None = None, *, required: bool = True) -> bytes | None:
            value = env.get(name)
            if value is None or value.strip() == "":
                if required:
                    raise KeyRingError(f"environment variable {name} is not set")
                return None
            try:
                raw = b64decode(value.strip(), length=length)
            except ValueError:
                raise KeyRingError(f"environment variable {name} is not valid base64") from None
            return raw

        seed = get(ENV_SIGNING_KEY, _KEY_LEN)
        assert seed is not None
        signing = SigningKeyPair.from_seed(seed)

        secret = get(ENV_PSEUDONYM_SECRET)
        assert secret is not None
        if len(secret) < _MIN_PSEUDONYM_SECRET:
            raise KeyRingError(f"environment variable {ENV_PSEUDONYM_SECRET} is shorter than 32")
        pkey = PseudonymKey(secret)

        private = get(ENV_RMS_PRIVATE_KEY, _KEY_LEN, required=False)
        rms_keypair = SealKeyPair.from_private_bytes(private) if private is not None else None
        public = get(ENV_RMS_PUBLIC_KEY, _KEY_LEN, required=rms_keypair is None)
        if public is not None:
            rms_public = SealPublicKey(public)
        else:
            assert rms_keypair is not None
            rms_public = rms_keypair.public_key

        retired: dict[str, PublicSigningKey] = {}
        for i, item in enumerate((env.get(ENV_RETIRED_SIGNING_KEYS) or "").split(",")):
            if not item.strip():
                continue
            try:
                key = PublicSigningKey.from_base64(item.strip())
            except CryptoError:
                raise KeyRingError(
                    f"environment variable {ENV_RETIRED_SIGNING_KEYS}: item {i} is not a valid"
                    " Ed25519 public key"
                ) from None
            retired[key.key_id] = key

        def items(name: str) -> list[tuple[int, bytes]]:
            out: list[tuple[int, bytes]] = []
            for i, item in enumerate((env.get(name) or "").split(",")):
                if item.strip():
                    try:
                        out.append((i, b64decode(item.strip())))
                    except ValueError:
                        raise KeyRingError(
                            f"environment variable {name}: item {i} is not base64"
                        ) from None
            return out

        retired_rms: dict[str, SealPublicKey | SealKeyPair] = {}
        for i, raw in items(ENV_RETIRED_RMS_PUBLIC_KEYS):
            if len(raw) != _KEY_LEN:
                raise KeyRingError(f"{ENV_RETIRED_RMS_PUBLIC_KEYS}: item {i} is not a 32-byte key")
            rms_key = SealPublicKey(raw)
            retired_rms[rms_key.key_id] = rms_key
        for i, raw in items(ENV_RETIRED_RMS_PRIVATE_KEYS):
            if len(raw) != _KEY_LEN:
                raise KeyRingError(f"{ENV_RETIRED_RMS_PRIVATE_KEYS}: item {i} is not a 32-byte key")
            pair = SealKeyPair.from_private_bytes(raw)
            retired_rms[pair.key_id] = pair
        retired_pseudonym: dict[str, PseudonymKey] = {}
        for i, raw in items(ENV_RETIRED_PSEUDONYM_SECRETS):
            if len(raw) < _MIN_PSEUDONYM_SECRET:
                raise KeyRingError(
                    f"{ENV_RETIRED_PSEUDONYM_SECRETS}: item {i} is shorter than 32 bytes"
                )
            old_pkey = PseudonymKey(raw)
            retired_pseudonym[old_pkey.key_id] = old_pkey
        return cls(
            signing,
            rms_public,
            pkey,
            retired=retired,
            rms_keypair=rms_keypair,
            retired_rms=retired_rms,
            retired_pseudonym=retired_pseudonym,
        )


def _signing_doc(key: SigningKeyPair, created: str) -> dict[str, str]:
    return {
        "format": _FORMAT,
        "type": "ed25519-signing",
        "key_id": key.key_id,
        "public": b64encode(key.public_bytes),
        "secret": b64encode(key.secret_seed()),
        "created": created,
    }


def _public_signing_doc(key: PublicSigningKey, created: str) -> dict[str, str]:
    return {
        "format": _FORMAT,
        "type": "ed25519-public",
        "key_id": key.key_id,
        "public": key.to_base64(),
        "retired": created,
    }


def _rms_private_doc(key: SealKeyPair, created: str) -> dict[str, str]:
    return {
        "format": _FORMAT,
        "type": "x25519-private",
        "key_id": key.key_id,
        "public": key.public_key.to_base64(),
        "secret": b64encode(key.secret_bytes()),
        "created": created,
    }


def _rms_public_doc(key: SealPublicKey, created: str) -> dict[str, str]:
    return {
        "format": _FORMAT,
        "type": "x25519-public",
        "key_id": key.key_id,
        "public": key.to_base64(),
        "created": created,
    }


def _pseudonym_doc(key: PseudonymKey, created: str) -> dict[str, str]:
    return {
        "format": _FORMAT,
        "type": "hmac-sha256-secret",
        "key_id": key.key_id,
        "secret": b64encode(key.secret_bytes()),
        "created": created,
    }
