"""The permissions ledger's pure format layer (ledger.md): no database, no web.

* :mod:`.entry` — ledger entries (ledger.md §1): build, sign, verify, open the sealed box;
* :mod:`.merkle` — RFC 9162 Merkle tree hashing, inclusion/consistency proofs and their
  verification over a :class:`~.merkle.TreeStore` of subtree hashes;
* :mod:`.checkpoint` — C2SP tlog-checkpoint / signed-note checkpoints;
* :mod:`.verify_proof` — the standalone offline verifier (stdlib + PyNaCl only).

This package module deliberately imports none of them, so that
``python -m fhir_consent.ledger.verify_proof`` loads nothing beyond the standard library and
PyNaCl.
"""

__all__ = ["checkpoint", "entry", "merkle", "verify_proof"]
