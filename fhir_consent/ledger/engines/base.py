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

Finding engines (issue 9): by name (``FHIR_CONSENT_LEDGER_ENGINE``) in the
``fhir_consent.ledger_engines`` entry-point group (:mod:`importlib.metadata`). Each entry
point names an :data:`EngineFactory` — ``factory(settings, origin)`` returning a
:class:`LedgerEngine`, or None for "no external ledger" (the built-in ``embedded``). The
built-in ``embedded``, ``waves`` and ``evm`` are declared that way in ``pyproject.toml``;
:data:`BUILTIN_ENGINES` repeats those declarations for a source checkout that was never
installed (so has no metadata). A third-party package adds an engine by declaring one
entry point — see ``docs/ledger-engines.md`` and ``tests/plugins/fc_engine_example``.
:func:`register_engine` registers a factory in-process (embedding, tests) and wins over
entry points.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module, metadata
from typing import Any, Final, Protocol, runtime_checkable

from fhir_consent.ledger.config import LedgerSettings

__all__ = [
    "BUILTIN_ENGINES",
    "EMBEDDED",
    "ENGINES",
    "ENTRY_POINT_GROUP",
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
    "available_engines",
    "create_engine",
    "load_engine_factory",
    "register_engine",
]

log = logging.getLogger("fhir_consent.ledger.engines")

#: The entry-point group engines are declared in.
ENTRY_POINT_GROUP: Final = "fhir_consent.ledger_engines"
#: The engine name meaning "the embedded log only, no external ledger".
EMBEDDED: Final = "embedded"
#: The built-in engines' entry points exactly as ``pyproject.toml`` declares them (used only
#: when the installed metadata does not know the name: a checkout that was never installed).
BUILTIN_ENGINES: Final[Mapping[str, str]] = {
    "embedded": "fhir_consent.ledger.engines.embedded:create",
    "evm": "fhir_consent.ledger.engines.evm:EvmEngine.from_settings",
    "waves": "fhir_consent.ledger.engines.waves:WavesEngine.from_settings",
}


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
    """An external ledger the relay anchors entries on (ledger.md §3).

    Every method may be called again after a crash with the same arguments, from another
    process: none may keep state the relay did not store. Methods raise the
    :class:`EngineError` subclasses above (never anything else for node trouble) with short
    ``code`` values; messages must not carry entry contents or secrets (they are logged).
    """

    #: Stored with each batch and lease: must be stable for the life of the log.
    name: str

    def fit(self, items: Sequence[AnchorItem]) -> int:
        """How many of ``items`` (a prefix, in order) fit one transaction; 0 when the first
        alone exceeds the engine's limits (the relay then marks it skipped)."""
        ...

    def prepare(
        self, items: Sequence[AnchorItem], context: PrepareContext | None = None
    ) -> dict[str, Any]:
        """Parameters (JSON-serialisable) that make the batch's transaction repeatable; the
        relay stores them before the first :meth:`publish`."""
        ...

    def publish(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> str:
        """Publish a batch: broadcast its transaction; return the transaction id. The same
        items and parameters must never put the entries on the ledger twice."""
        ...

    def find(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> str | None:
        """The id of an earlier broadcast of this batch still known to the node, or None
        when it provably never went out (then the relay publishes)."""
        ...

    def status(self, txid: str) -> TxStatus:
        """Confirmation status: whether the ledger knows the transaction, its inclusion
        height and the tip (confirmed at ``height + k``)."""
        ...

    def fetch(self, txid: str) -> dict[int, bytes]:
        """Fetch by id: the entries (``seq`` → canonical bytes) the transaction carries on the
        ledger; empty while it is not in a block (``ledger verify`` compares them)."""
        ...

    def close(self) -> None:
        """Release network resources."""
        ...


#: ``factory(settings, origin)``: an engine, or None for the embedded log alone.
EngineFactory = Callable[[LedgerSettings, str], "LedgerEngine | None"]

#: Factories registered in this process by :func:`register_engine` (they win over entry
#: points).
ENGINES: dict[str, EngineFactory] = {}


def register_engine(name: str, factory: EngineFactory) -> None:
    """Register an engine factory under ``name`` in this process."""
    ENGINES[name] = factory


def _entry_points(name: str | None = None) -> list[metadata.EntryPoint]:
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in eps if name is None or ep.name == name]


def available_engines() -> list[str]:
    """Every engine name that can be configured: registered, declared or built in."""
    return sorted(set(ENGINES) | {ep.name for ep in _entry_points()} | set(BUILTIN_ENGINES))


def _load_reference(reference: str) -> Any:
    """``module:attr.attr`` (entry-point object reference syntax) → the object."""
    module, _, attrs = reference.partition(":")
    obj: Any = import_module(module)
    for attr in attrs.split(".") if attrs else ():
        obj = getattr(obj, attr)
    return obj


def load_engine_factory(name: str) -> EngineFactory:
    """The factory of engine ``name``: registered in-process, else the entry point of that
    name, else the built-in declaration. Raises :class:`EngineError` (``config``) for an
    unknown name, a name two packages declare differently, or one that does not load."""
    if name in ENGINES:
        return ENGINES[name]
    eps = _entry_points(name)
    values = {ep.value for ep in eps}
    if len(values) > 1:
        raise EngineError(
            f"ledger engine {name!r} is declared by several packages ({sorted(values)})",
            code="config",
        )
    try:
        if eps:
            factory = eps[0].load()
        elif name in BUILTIN_ENGINES:
            factory = _load_reference(BUILTIN_ENGINES[name])
        else:
            raise EngineError(
                f"unknown ledger engine {name!r}; available: {', '.join(available_engines())}",
                code="config",
            )
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not look like a node error
        log.error("ledger engine %r does not load: %s", name, type(exc).__name__)
        raise EngineError(f"ledger engine {name!r} does not load", code="config") from None
    if not callable(factory):
        raise EngineError(f"ledger engine {name!r} is not a factory", code="config")
    result: EngineFactory = factory
    return result


def create_engine(settings: LedgerSettings, origin: str) -> LedgerEngine | None:
    """The configured external engine, or None for the embedded log alone."""
    engine = load_engine_factory(settings.engine)(settings, origin)
    if engine is None and settings.engine != EMBEDDED:
        raise EngineError(f"ledger engine {settings.engine!r} made no engine", code="config")
    if engine is not None and not isinstance(engine, LedgerEngine):
        raise EngineError(
            f"ledger engine {settings.engine!r} does not implement LedgerEngine", code="config"
        )
    return engine
