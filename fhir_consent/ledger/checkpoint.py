"""Signed checkpoints: C2SP tlog-checkpoint bodies in C2SP signed-note envelopes (ledger.md §2).

A checkpoint commits to the log's RFC 9162 tree head at one size::

    <origin>\\n
    <size, decimal, no leading zeros>\\n
    <base64 root hash>\\n
    \\n
    — <key name> <base64(4-byte key hash || 64-byte Ed25519 signature)>\\n

* The note text (signed bytes) is the three body lines including the final newline, not the
  blank line (c2sp.org/signed-note "Format").
* The key name is the origin (c2sp.org/tlog-checkpoint "Signatures": SHOULD match).
* The key hash is ``SHA-256(key name || 0x0A || 0x01 || 32-byte Ed25519 public key)[:4]``
  (signed-note "Ed25519 signatures"); 0x01 is the Ed25519 signature type.

Parsing is strict: we never emit extension lines, so a body of anything but exactly three lines
is rejected, as is non-canonical base64, a size with leading zeros or a sign, a root that is not
32 bytes, control characters, or a malformed signature line. Verification follows signed-note
"Signatures": lines whose (name, key hash) match no trusted key are ignored (this is what lets
witnesses cosign and keys rotate), a matching line that fails to verify rejects the whole note,
and a note with no verifying trusted signature is rejected.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from fhir_consent.crypto import (
    CryptoError,
    PublicSigningKey,
    SigningKeyPair,
    b64decode,
    b64encode,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "NoteSignature",
    "ED25519_SIGNATURE_TYPE",
    "MAX_SIGNATURES",
    "note_key_hash",
    "parse_checkpoint",
    "sign_checkpoint",
    "verifier_key",
    "verify_checkpoint",
]

ED25519_SIGNATURE_TYPE: Final = 0x01
#: signed-note: verifiers SHOULD cap signatures but MUST accept at least 16.
MAX_SIGNATURES: Final = 100
_SIG_PREFIX: Final = "\u2014 "  # em dash, space
_MAX_SIZE: Final = 2**63 - 1


class CheckpointError(ValueError):
    """A checkpoint is malformed, or no trusted signature on it verifies."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: the log's ``origin``, its ``size`` (leaves) and the RFC 9162 ``root``."""

    origin: str
    size: int
    root: bytes

    def __post_init__(self) -> None:
        _check_name(self.origin, "origin")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise CheckpointError("size must be an integer")
        if not 0 <= self.size <= _MAX_SIZE:
            raise CheckpointError("size out of range")
        if not isinstance(self.root, bytes) or len(self.root) != 32:
            raise CheckpointError("root must be a 32-byte hash")

    def body(self) -> bytes:
        """The note text that is signed (tlog-checkpoint "Note text")."""
        return f"{self.origin}\n{self.size}\n{b64encode(self.root)}\n".encode()


@dataclass(frozen=True, slots=True)
class NoteSignature:
    """One signature line: key name, 4-byte key hash and the signature bytes."""

    name: str
    key_hash: bytes
    signature: bytes


def _check_name(name: str, what: str) -> None:
    # signed-note: key names are non-empty, with no Unicode spaces and no '+'; tlog-checkpoint
    # origins SHOULD follow the same rule, and ours is the key name, so we require it.
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{what} must be a non-empty string")
    if any(c.isspace() or c == "+" or ord(c) < 0x20 or c == "\x7f" for c in name):
        raise CheckpointError(f"{what} must contain no spaces, '+' or control characters")


def note_key_hash(name: str, public_key: bytes) -> bytes:
    """``SHA-256(name || 0x0A || 0x01 || public key)[:4]`` (signed-note "Ed25519 signatures")."""
    data = name.encode() + b"\n" + bytes([ED25519_SIGNATURE_TYPE]) + public_key
    return hashlib.sha256(data).digest()[:4]


def verifier_key(name: str, public_key: PublicSigningKey) -> str:
    """The ``<name>+<hex key hash>+<base64(0x01 || key)>`` verifier key string understood by
    Go's ``golang.org/x/mod/sumdb/note`` and other signed-note tools."""
    _check_name(name, "key name")
    raw = public_key.public_bytes
    typed = bytes([ED25519_SIGNATURE_TYPE]) + raw
    return f"{name}+{note_key_hash(name, raw).hex()}+{base64.b64encode(typed).decode()}"


def sign_checkpoint(checkpoint: Checkpoint, key: SigningKeyPair) -> str:
    """The signed note text of ``checkpoint``, signed by ``key`` under the name ``origin``."""
    body = checkpoint.body()
    kh = note_key_hash(checkpoint.origin, key.public_bytes)
    sig = b64encode(kh + key.sign(body))
    return f"{body.decode()}\n{_SIG_PREFIX}{checkpoint.origin} {sig}\n"


def _parse_body(body: str) -> Checkpoint:
    lines = body.split("\n")
    # body ends with "\n", so the split yields a trailing empty string
    if len(lines) != 4 or lines[3] != "":
        raise CheckpointError(
            f"checkpoint body must be exactly 3 lines (origin, size, root); got {len(lines) - 1}"
        )
    origin, size_text, root_text = lines[:3]
    if not size_text or not size_text.isascii() or not size_text.isdigit():
        raise CheckpointError("checkpoint size is not a decimal number")
    if len(size_text) > 1 and size_text[0] == "0":
        raise CheckpointError("checkpoint size has leading zeros")
    if len(size_text) > 19:
        raise CheckpointError("checkpoint size out of range")
    try:
        root = b64decode(root_text, length=32)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint root hash: {exc}") from None
    return Checkpoint(origin, int(size_text), root)


def parse_checkpoint(text: str | bytes) -> tuple[Checkpoint, list[NoteSignature]]:
    """Strictly parse a signed checkpoint note into its tree head and signature lines.

    Does NOT verify signatures — use :func:`verify_checkpoint`.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError("checkpoint is not valid UTF-8") from None
    if not isinstance(text, str):
        raise CheckpointError("checkpoint must be text")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise CheckpointError("checkpoint contains control characters")
    if not text.endswith("\n"):
        raise CheckpointError("checkpoint must end with a newline")
    split = text.rfind("\n\n")  # the LAST blank line separates text from signatures
    if split < 0:
        raise CheckpointError("checkpoint has no blank line before its signatures")
    body, sig_block = text[: split + 1], text[split + 2 :]
    if "\n\n" in body:
        raise CheckpointError("checkpoint body contains an empty line")
    checkpoint = _parse_body(body)

    sig_lines = sig_block.split("\n")[:-1]  # sig_block ends with "\n"
    if not sig_lines:
        raise CheckpointError("checkpoint has no signature lines")
    if len(sig_lines) > MAX_SIGNATURES:
        raise CheckpointError("checkpoint has too many signatures")
    signatures: list[NoteSignature] = []
    for line in sig_lines:
        if not line.startswith(_SIG_PREFIX):
            raise CheckpointError("malformed signature line (must start with an em dash)")
        parts = line[len(_SIG_PREFIX) :].split(" ")
        if len(parts) != 2:
            raise CheckpointError("malformed signature line")
        name, sig_text = parts
        _check_name(name, "signature key name")
        try:
            raw = b64decode(sig_text)
        except ValueError:
            raise CheckpointError("signature is not valid base64") from None
        if len(raw) < 5:
            raise CheckpointError("signature is too short")
        signatures.append(NoteSignature(name, raw[:4], raw[4:]))
    return checkpoint, signatures


def verify_checkpoint(
    text: str | bytes,
    keys: PublicSigningKey | Iterable[PublicSigningKey],
    *,
    origin: str | None = None,
) -> Checkpoint:
    """Parse and verify a signed checkpoint; return its tree head.

    ``keys`` are the trusted Ed25519 public keys of the log (current and retired). A signature
    line counts only when its key name equals the checkpoint origin AND its key hash matches a
    trusted key. ``origin``, if given, must equal the checkpoint's origin.
    Raises :class:`CheckpointError`.
    """
    checkpoint, signatures = parse_checkpoint(text)
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(f"checkpoint origin {checkpoint.origin!r} is not {origin!r}")
    trusted = {
        note_key_hash(checkpoint.origin, k.public_bytes): k
        for k in ([keys] if isinstance(keys, PublicSigningKey) else keys)
    }
    body = checkpoint.body()
    verified = False
    for sig in signatures:
        if sig.name != checkpoint.origin:
            continue  # another party's signature (e.g. a witness): ignored
        key = trusted.get(sig.key_hash)
        if key is None:
            continue  # unknown key with our name: ignored, per signed-note
        try:
            key.verify(body, sig.signature)
        except CryptoError:
            raise CheckpointError("checkpoint signature does not verify") from None
        verified = True
    if not verified:
        raise CheckpointError("checkpoint carries no signature by a trusted key")
    return checkpoint
