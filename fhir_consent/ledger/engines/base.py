"""The external-ledger engine protocol (ledger.md §3) and its error tree.

An engine anchors batches of ledger entries on an external chain. The relay
(:mod:`fhir_consent.ledger.relay`) drives it in four steps, each safe to repeat:

1. :meth:`LedgerEngine.prepare` — choose the parameters that make the transaction *unique and
   repeatable* (Waves: the timestamp, so re-sending gives the same transaction id; EVM: the
   nonce). The relay stores them in ``ledger_batch`` before anything is sent.
2. :meth:`LedgerEngine.publish` — broadcast the batch with those parameters; returns the
   transaction id. Sending the same batch with the same parameters twice never yields two
   transactions carrying the same entries.
3. :meth:`LedgerEngine.find` — after a crash or a lost reply, ask the chain whether the batch
   is already there (and under which id) before sending it again.
4. :meth:`LedgerEngine.status` / :meth:`LedgerEngine.fetch` — confirmation height, and the
   entries a transaction carries (``ledger verify`` compares them byte for byte).

Errors::

    EngineError                 anything an engine reports
    ├── EngineUnavailable       transient: network error, timeout, 5xx, 429 — retry with backoff
    ├── EngineRejected          the node refused the request (4xx, node error code) — retry
    │                           later with backoff, the operator must look
    │   └── StaleParameters     the stored parameters can no longer be used (timestamp too
    │                           old, nonce taken by another transaction): prepare anew
    └── EngineProtocolError     the node answered something this client does not understand

Engines are looked up by name in :data:`ENGINES` today; issue 9 moves the registry to the
``fhir_consent.ledger_engines`` entry-point group with the same factory signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fhir_consent.ledger.config import LedgerSettings

__all__ = [
    "ENGINES",
    "AnchorItem",
    "EngineError",
    "EngineFactory",
    "EngineProtocolError",
    "EngineRejected",
    "EngineUnavailable",
    "LedgerEngine",
    "PrepareContext",
    "StaleParameters",
    "TxStatus",
    "create_engine",
    "register_engine",
]


class EngineError(Exception):
    """An external ledger engine failed; ``code`` is a short machine-readable reason."""

    def __init__(self, message: str, *, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class EngineUnavailable(EngineError):
    """The node cannot be reached or is overloaded (network error, timeout, 5xx, 429)."""


class EngineRejected(EngineError):
    """The node refused the request (client error or a node error code)."""


class StaleParameters(EngineRejected):
    """The batch's stored parameters can no longer be used; prepare it again."""


class EngineProtocolError(EngineError):
    """The node's answer does not have the expected shape."""


@dataclass(frozen=True, slots=True)
class AnchorItem:
    """One ledger entry to anchor: its ``seq`` and canonical bytes (ledger.md §1)."""

    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TxStatus:
    """Where a transaction stands: ``known`` (in the pool or a block), its block ``height``
    (None while unconfirmed) and the chain's current ``tip`` height."""

    known: bool
    height: int | None
    tip: int

    def confirmations(self) -> int:
        """Blocks on top of the one holding the transaction (0 in that block itself)."""
        return -1 if self.height is None else self.tip - self.height


@dataclass(frozen=True, slots=True)
class PrepareContext:
    """What the relay knows when it asks for a batch's parameters.

    ``in_flight``: the parameters of this engine's batches that are not confirmed yet, plus
    those of the newest batch, oldest first (EVM: nonces already taken, so the next batch
    takes the one after them even when the node has forgotten its pool). ``replacing``: the
    parameters this batch had when they went stale (EVM: keep its nonce when that nonce was
    never used, so no hole opens before later batches).
    """

    in_flight: Sequence[Mapping[str, Any]] = ()
    replacing: Mapping[str, Any] | None = None


@runtime_checkable
class LedgerEngine(Protocol):
    """An external ledger the relay anchors entries on (ledger.md §3)."""

    name: str

    def fit(self, items: Sequence[AnchorItem]) -> int:
        """How many of ``items`` (a prefix, in order) fit one transaction; 0 when the first
        alone exceeds the engine's limits (the relay then marks it skipped)."""
        ...

    def prepare(
        self, items: Sequence[AnchorItem], context: PrepareContext | None = None
    ) -> dict[str, Any]:
        """Parameters (JSON-serialisable) that make the batch's transaction repeatable."""
        ...

    def publish(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> str:
        """Broadcast the batch; return its transaction id."""
        ...

    def find(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> str | None:
        """The id of an earlier broadcast of this batch still known to the node, or None."""
        ...

    def status(self, txid: str) -> TxStatus:
        """The transaction's inclusion height and the chain tip."""
        ...

    def fetch(self, txid: str) -> dict[int, bytes]:
        """The entries (``seq`` → bytes) a transaction of ours carries on the chain."""
        ...

    def close(self) -> None:
        """Release network resources."""
        ...


EngineFactory = Callable[[LedgerSettings, str], LedgerEngine]

#: Engine factories by name: ``factory(settings, origin)``.
ENGINES: dict[str, EngineFactory] = {}


def register_engine(name: str, factory: EngineFactory) -> None:
    """Register an engine factory under ``name`` (entry points in issue 9)."""
    ENGINES[name] = factory


def create_engine(settings: LedgerSettings, origin: str) -> LedgerEngine | None:
    """The configured external engine, or None for the embedded log alone."""
    if settings.engine == "embedded":
        return None
    if not ENGINES:
        from fhir_consent.ledger.engines import evm, waves  # noqa: F401  (register themselves)
    factory = ENGINES.get(settings.engine)
    if factory is None:
        raise EngineError(f"unknown ledger engine {settings.engine!r}", code="config")
    return factory(settings, origin)
