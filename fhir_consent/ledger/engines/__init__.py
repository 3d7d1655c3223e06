"""External ledger engines (ledger.md §3): the protocol and the entry-point registry in
:mod:`.base`, Waves Enterprise in :mod:`.waves`, EVM JSON-RPC in :mod:`.evm`, and
:mod:`.embedded` (none). Third-party engines: ``docs/ledger-engines.md``."""

from fhir_consent.ledger.engines.base import (
    BUILTIN_ENGINES,
    EMBEDDED,
    ENGINES,
    ENTRY_POINT_GROUP,
    AnchorItem,
    EngineError,
    EngineProtocolError,
    EngineRejected,
    EngineUnavailable,
    LedgerEngine,
    PrepareContext,
    StaleParameters,
    TxStatus,
    available_engines,
    create_engine,
    load_engine_factory,
    register_engine,
)

__all__ = [
    "BUILTIN_ENGINES",
    "EMBEDDED",
    "ENGINES",
    "ENTRY_POINT_GROUP",
    "AnchorItem",
    "EngineError",
    "EngineProtocolError",
    "EngineRejected",
    "EngineUnavailable",
    "LedgerEngine",
    "PrepareContext",
    "StaleParameters",
    "TxStatus",
    "available_engines",
    "create_engine",
    "load_engine_factory",
    "register_engine",
]
