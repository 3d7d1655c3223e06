"""The permissions ledger (ledger.md).

Format layer (pure: no database, no web):

* :mod:`.entry` — ledger entries (ledger.md §1): build, sign, verify, open the sealed box;
* :mod:`.merkle` — RFC 9162 Merkle tree hashing, inclusion/consistency proofs and their
  verification over a :class:`~.merkle.TreeStore` of subtree hashes;
* :mod:`.checkpoint` — C2SP tlog-checkpoint / signed-note checkpoints;
* :mod:`.verify_proof` — the standalone offline verifier (stdlib + PyNaCl only).

Service layer (ledger.md §2–§3):

* :mod:`.config` — :class:`~.config.LedgerSettings` (``FHIR_CONSENT_LEDGER_*``);
* :mod:`.tables` — the ledger tables, on the store's metadata (migration ``0003``);
* :mod:`.embedded` — the embedded Merkle log in the database, checkpoints, proofs;
* :mod:`.service` — the write listener: one entry per Consent/DocumentReference version, in the
  write's transaction; :data:`~.service.current_actor`;
* :mod:`.outbox`, :mod:`.relay` — exactly-once anchoring on an external engine;
* :mod:`.engines` — the engine protocol, Waves Enterprise and EVM;
* :mod:`.verify` — ``fhir-consent ledger verify``;
* :mod:`.api` — ``$ledger-proof``, ``$ledger-checkpoint``, ``$ledger-consistency`` and
  :func:`~.api.install`; :mod:`.cli` — the command-line helpers.

This package module deliberately imports none of them, so that
``python -m fhir_consent.ledger.verify_proof`` loads nothing beyond the standard library and
PyNaCl.
"""

__all__ = [
    "api",
    "checkpoint",
    "cli",
    "config",
    "embedded",
    "engines",
    "entry",
    "merkle",
    "outbox",
    "relay",
    "service",
    "tables",
    "verify",
    "verify_proof",
]
