"""The ``embedded`` engine: the embedded Merkle log alone, no external ledger (ledger.md §3).

The embedded log is always written (it is the local source of truth,
:mod:`fhir_consent.ledger.embedded`); choosing this engine means no relay anchors it
elsewhere. Declared in the ``fhir_consent.ledger_engines`` entry-point group like every
engine, its factory returns None.
"""

from __future__ import annotations

from fhir_consent.ledger.config import LedgerSettings

__all__ = ["create"]


def create(settings: LedgerSettings, origin: str) -> None:
    """No external engine: the relay does not run and entries get no outbox rows."""
    return None
