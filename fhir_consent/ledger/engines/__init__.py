"""External ledger engines (ledger.md §3): the protocol in :mod:`.base`, Waves Enterprise in
:mod:`.waves`, EVM JSON-RPC in :mod:`.evm`."""

from fhir_consent.ledger.engines.base import (
    ENGINES,
    AnchorItem,
    EngineError,
    EngineProtocolError,
    EngineRejected,
    EngineUnavailable,
    LedgerEngine,
    StaleParameters,
    TxStatus,
    create_engine,
    register_engine,
)

__all__ = [
    "ENGINES",
    "AnchorItem",
    "EngineError",
    "EngineProtocolError",
    "EngineRejected",
    "EngineUnavailable",
    "LedgerEngine",
    "StaleParameters",
    "TxStatus",
    "create_engine",
    "register_engine",
]
