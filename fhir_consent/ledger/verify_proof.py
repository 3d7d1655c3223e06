"""Standalone, offline verifier for a fhir-consent ledger proof document (ledger.md §2).

Usage::

    python -m fhir_consent.ledger.verify_proof PROOF.json [--trusted-key B64]... [--origin O]
    python verify_proof.py PROOF.json          # this file copied anywhere, with PyNaCl installed

prints ``OK: …`` and exits 0 when every check passes, or ``FAILED: <reason>`` and exits 1.

Why this module re-implements the hashing instead of importing the package: it is meant to be
handed to patients, auditors and other parties who do not run (or trust) our server code. It
imports nothing but the Python standard library and PyNaCl, so this one file can be copied,
read in a few minutes and run on its own; and because it shares no code with the server, a bug
in the server's Merkle, canonical-JSON or checkpoint code cannot make a bad proof pass here.
The test suite cross-checks the two implementations against each other.

The proof document (JSON)::

    {
      "entry": {"seq": 7, "ts": "…", "kind": "Consent", "ref": "Consent/c1/_history/2",
                "event": "granted", "subject": "<hex>", "subject_kid": "<16 hex>",
                "resource_sha256": "<hex>", "sealed": "<b64>", "rms_kid": "<16 hex>",
                "kid": "<16 hex>", "sig": "<b64>"},
      "leaf_index": 7,
      "inclusion_proof": ["<b64 32-byte hash>", …],
      "checkpoint": "<origin>\\n<size>\\n<b64 root>\\n\\n— <origin> <b64 sig>\\n",
      "public_key": "<b64 32-byte Ed25519 key of the log>",
      "entry_public_key": "<b64>"          (optional: when the entry was signed by a retired key)
    }

Checks, in order (each failure names its reason):

1. the checkpoint is a well-formed C2SP tlog-checkpoint signed note with exactly three body
   lines, and a signature line named after its origin with key hash
   ``SHA-256(origin || 0x0A || 0x01 || public_key)[:4]`` verifies under ``public_key``
   (c2sp.org/signed-note, c2sp.org/tlog-checkpoint); no matching line may fail;
2. the entry has exactly the ledger.md §1 fields plus ``kid`` (and, since the pseudonym and
   RMS keys rotate by id, ``subject_kid`` and ``rms_kid``), and its Ed25519 signature over
   the canonical JSON of all fields but ``sig`` verifies under the key whose id
   (``hex(SHA-256(key)[:8])``) is ``kid``: ``public_key``, or ``entry_public_key`` after a
   key rotation;
3. ``leaf_index`` equals the entry's ``seq`` and is below the checkpoint's tree size;
4. the leaf hash ``SHA-256(0x00 || canonical JSON of the entry)`` with ``inclusion_proof``
   leads to the checkpoint's root (RFC 9162 §2.1.3.2).

Trust: a document that carries its own public key only proves it is self-consistent. Pin the
log's published key(s) with ``--trusted-key`` (or ``trusted_keys=``), and its origin with
``--origin``, to prove the entry is in *that* log.

Checking the same JSON in a browser with WebCrypto (no library needed):

* canonical JSON of the entry (every value is a string or a safe integer, keys are ASCII)::

      const canon = o => "{" + Object.keys(o).sort()
          .map(k => JSON.stringify(k) + ":" + JSON.stringify(o[k])).join(",") + "}";

  the signed bytes are ``canon`` of the entry without ``sig``; the leaf data is ``canon`` of the
  whole entry; encode both with ``TextEncoder``;
* Ed25519: ``crypto.subtle.importKey("raw", key, {name: "Ed25519"}, false, ["verify"])`` and
  ``crypto.subtle.verify("Ed25519", key, signature, data)``; SHA-256:
  ``crypto.subtle.digest("SHA-256", data)``; base64: ``atob``;
* checkpoint: split the note at its last ``"\\n\\n"``; the signed body includes its final
  ``"\\n"``; a signature line is ``"\\u2014 " + origin + " " + base64(keyhash4 || sig64)``;
* RFC 9162 §2.1.3.2: compute ``fn``/``sn`` with ``BigInt`` (JavaScript's ``>>`` and ``&`` are
  32-bit).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import nacl.exceptions
import nacl.signing

__all__ = [
    "ENTRY_FIELDS",
    "ENTRY_FIELDS_V2",
    "ProofError",
    "main",
    "make_document",
    "verify_document",
]

ENTRY_FIELDS: Final = (
    "seq",
    "ts",
    "kind",
    "ref",
    "event",
    "subject",
    "resource_sha256",
    "sealed",
    "kid",
    "sig",
)
#: Since key rotation of the pseudonym and RMS keys, entries also name those keys.
ENTRY_FIELDS_V2: Final = (*ENTRY_FIELDS, "subject_kid", "rms_kid")
_REQUIRED: Final = frozenset({"entry", "leaf_index", "inclusion_proof", "checkpoint", "public_key"})
_OPTIONAL: Final = frozenset({"entry_public_key"})
_MAX_SAFE_INT: Final = 2**53 - 1
_MAX_PROOF: Final = 64
_SIG_PREFIX: Final = "\u2014 "


class ProofError(Exception):
    """The proof document is malformed or one of its checks fails; ``str()`` says which."""


# -- primitives (deliberately duplicated from the package; see the module docstring) ----------


def _b64(text: object, what: str, length: int | None = None) -> bytes:
    if not isinstance(text, str) or not text.isascii():
        raise ProofError(f"{what} is not a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProofError(f"{what} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise ProofError(f"{what} is not canonical base64")
    if length is not None and len(raw) != length:
        raise ProofError(f"{what} must be {length} bytes, not {len(raw)}")
    return raw


def _canonical(obj: Mapping[str, object]) -> bytes:
    """RFC 8785 canonical JSON for a flat object of strings and safe integers.

    For such values the standard library's sorted, whitespace-free, non-ASCII-preserving output
    is exactly RFC 8785 (keys are ASCII, so code-point order equals UTF-16 order).
    """
    try:
        return json.dumps(
            dict(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
    except (UnicodeEncodeError, TypeError, ValueError):
        raise ProofError("entry cannot be canonicalised") from None


def _leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).digest()[:8].hex()


def _note_key_hash(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode("utf-8") + b"\n\x01" + public_key).digest()[:4]


def _ed25519_ok(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        return False
    return True


def _root_from_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2 steps 1-5 (the caller compares the result with the root)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside the checkpoint's tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is too long for this index and tree size")
        if fn & 1 or fn == sn:
            r = _node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short for this index and tree size")
    return r


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise ProofError("checkpoint origin / key name is empty or contains spaces or '+'")


def _parse_checkpoint(text: object) -> tuple[str, int, bytes, bytes, list[tuple[str, bytes]]]:
    """Strict C2SP checkpoint parse: (origin, size, root, signed body, [(name, sig bytes)])."""
    if not isinstance(text, str):
        raise ProofError("checkpoint must be a string")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise ProofError("checkpoint contains control characters")
    if not text.endswith("\n"):
        raise ProofError("checkpoint must end with a newline")
    split = text.rfind("\n\n")
    if split < 0:
        raise ProofError("checkpoint has no blank line before its signatures")
    body, sig_block = text[: split + 1], text[split + 2 :]
    lines = body.split("\n")
    if len(lines) != 4 or lines[3] != "" or "" in lines[:3]:
        raise ProofError("checkpoint body must be exactly 3 lines: origin, size, root hash")
    origin, size_text, root_text = lines[:3]
    _check_name(origin)
    if not (size_text.isascii() and size_text.isdigit()) or (
        len(size_text) > 1 and size_text[0] == "0"
    ):
        raise ProofError("checkpoint size is not a decimal number without leading zeros")
    if len(size_text) > 19:
        raise ProofError("checkpoint size out of range")
    root = _b64(root_text, "checkpoint root hash", 32)
    sigs: list[tuple[str, bytes]] = []
    sig_lines = sig_block.split("\n")[:-1]
    if not sig_lines or len(sig_lines) > 100:
        raise ProofError("checkpoint must carry 1 to 100 signature lines")
    for line in sig_lines:
        parts = line[len(_SIG_PREFIX) :].split(" ")
        if not line.startswith(_SIG_PREFIX) or len(parts) != 2:
            raise ProofError("malformed checkpoint signature line")
        _check_name(parts[0])
        raw = _b64(parts[1], "checkpoint signature")
        if len(raw) < 5:
            raise ProofError("checkpoint signature is too short")
        sigs.append((parts[0], raw))
    return origin, int(size_text), root, body.encode("utf-8"), sigs


# -- the verifier ----------------------------------------------------------------------------


def _check_entry_shape(entry: object) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ProofError("entry must be a JSON object")
    if set(entry) != set(ENTRY_FIELDS) and set(entry) != set(ENTRY_FIELDS_V2):
        missing = sorted(set(ENTRY_FIELDS_V2) - set(entry))
        extra = sorted(set(entry) - set(ENTRY_FIELDS_V2))
        raise ProofError(f"entry fields: missing {missing}, unexpected {extra}")
    seq = entry["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= _MAX_SAFE_INT:
        raise ProofError("entry seq must be a non-negative safe integer")
    for name in [f for f in entry if f != "seq"]:
        if not isinstance(entry[name], str):
            raise ProofError(f"entry {name} must be a string")
    return entry


def verify_document(
    doc: Mapping[str, Any],
    *,
    trusted_keys: Iterable[bytes] | None = None,
    origin: str | None = None,
) -> None:
    """Verify a proof document (see the module docstring); raise :class:`ProofError` if any
    check fails. ``trusted_keys`` (raw 32-byte Ed25519 keys) and ``origin`` pin the log."""
    if not isinstance(doc, Mapping):
        raise ProofError("the proof document must be a JSON object")
    keys = set(doc)
    if not _REQUIRED <= keys or not keys <= _REQUIRED | _OPTIONAL:
        raise ProofError(
            f"proof document fields: missing {sorted(_REQUIRED - keys)}, "
            f"unexpected {sorted(keys - _REQUIRED - _OPTIONAL)}"
        )
    log_key = _b64(doc["public_key"], "public_key", 32)
    entry_key = (
        _b64(doc["entry_public_key"], "entry_public_key", 32)
        if doc.get("entry_public_key") is not None
        else None
    )
    if trusted_keys is not None:
        trusted = {bytes(k) for k in trusted_keys}
        if log_key not in trusted:
            raise ProofError("public_key is not one of the trusted keys")
        if entry_key is not None and entry_key not in trusted:
            raise ProofError("entry_public_key is not one of the trusted keys")

    # 1. checkpoint (C2SP signed note)
    cp_origin, size, root, body, sigs = _parse_checkpoint(doc["checkpoint"])
    if origin is not None and cp_origin != origin:
        raise ProofError(f"checkpoint origin {cp_origin!r} is not the expected {origin!r}")
    key_hash = _note_key_hash(cp_origin, log_key)
    matching = [raw[4:] for name, raw in sigs if name == cp_origin and raw[:4] == key_hash]
    if not matching:
        raise ProofError("checkpoint carries no signature by public_key under its origin")
    for sig in matching:
        if not _ed25519_ok(log_key, body, sig):
            raise ProofError("checkpoint signature does not verify")

    # 2. entry signature
    entry = _check_entry_shape(doc["entry"])
    if entry["kid"] == _key_id(log_key):
        signer = log_key
    elif entry_key is not None and entry["kid"] == _key_id(entry_key):
        signer = entry_key
    else:
        raise ProofError(f"entry was signed by key {entry['kid']}, which the document lacks")
    unsigned = {k: v for k, v in entry.items() if k != "sig"}
    sig = _b64(entry["sig"], "entry sig", 64)
    if not _ed25519_ok(signer, _canonical(unsigned), sig):
        raise ProofError("entry signature does not verify")

    # 3. position
    index = doc["leaf_index"]
    if isinstance(index, bool) or not isinstance(index, int):
        raise ProofError("leaf_index must be an integer")
    if index != entry["seq"]:
        raise ProofError(f"leaf_index {index} is not the entry's seq {entry['seq']}")

    # 4. inclusion (RFC 9162 §2.1.3.2)
    proof_items = doc["inclusion_proof"]
    if not isinstance(proof_items, list) or len(proof_items) > _MAX_PROOF:
        raise ProofError("inclusion_proof must be a list of at most 64 hashes")
    proof = [_b64(p, f"inclusion_proof[{i}]", 32) for i, p in enumerate(proof_items)]
    computed = _root_from_inclusion(_leaf_hash(_canonical(entry)), index, size, proof)
    if not hmac.compare_digest(computed, root):
        raise ProofError("inclusion proof does not lead to the checkpoint's root hash")


def make_document(
    entry: Mapping[str, Any],
    leaf_index: int,
    inclusion_proof: Sequence[bytes],
    checkpoint: str,
    public_key: bytes,
    entry_public_key: bytes | None = None,
) -> dict[str, Any]:
    """Assemble a proof document (the server side; no checks performed)."""

    def enc(b: bytes) -> str:
        return base64.b64encode(b).decode("ascii")

    doc: dict[str, Any] = {
        "entry": dict(entry),
        "leaf_index": leaf_index,
        "inclusion_proof": [enc(p) for p in inclusion_proof],
        "checkpoint": checkpoint,
        "public_key": enc(public_key),
    }
    if entry_public_key is not None and entry_public_key != public_key:
        doc["entry_public_key"] = enc(entry_public_key)
    return doc


def _load(text: str) -> Any:
    def no_constants(name: str) -> Any:
        raise ProofError(f"invalid JSON constant {name}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ProofError(f"duplicate JSON key {k!r}")
            out[k] = v
        return out

    try:
        return json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise ProofError(f"not valid JSON: {exc.msg} at line {exc.lineno}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="verify_proof",
        description="Verify a fhir-consent ledger proof document offline.",
    )
    parser.add_argument("file", help="proof document (JSON); '-' reads standard input")
    parser.add_argument(
        "--trusted-key",
        action="append",
        default=None,
        metavar="B64",
        help="the log's published Ed25519 public key (base64); repeat for retired keys",
    )
    parser.add_argument("--origin", help="the log's expected checkpoint origin")
    args = parser.parse_args(argv)
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            try:
                with open(args.file, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise ProofError(f"cannot read {args.file}: {exc}") from None
        trusted = (
            None
            if args.trusted_key is None
            else [_b64(k, "--trusted-key", 32) for k in args.trusted_key]
        )
        doc = _load(text)
        verify_document(doc, trusted_keys=trusted, origin=args.origin)
    except ProofError as exc:
        sys.stdout.write(f"FAILED: {exc}\n")
        return 1
    entry = doc["entry"]
    cp_origin, size = doc["checkpoint"].split("\n", 2)[:2]
    sys.stdout.write(
        f"OK: entry {entry['seq']} ({entry['event']} {entry['ref']}) is signed and included in "
        f"{cp_origin} at tree size {size}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
