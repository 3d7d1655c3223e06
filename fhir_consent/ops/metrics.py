"""Prometheus metrics (prometheus-client), served at ``/metrics``.

Per process (counted where they happen):

``fhir_consent_http_requests_total{method,route,status}``
    Requests by route template (:mod:`fhir_consent.ops.routing`: never an id or a query value).
``fhir_consent_http_request_duration_seconds{method,route}``
    Latency histogram, from the first byte in to the last byte out.
``fhir_consent_access_decisions_total{outcome,reason}``
    Access decisions as the audit trail records them (one per AuditEvent: per patient and
    request): ``outcome`` is ``permit`` or ``deny``, ``reason`` the consent engine's
    (``consent-explicit``, ``default-deny``, ``patient-self``, ``break-glass``, …; ``none``
    when it gave none, ``other`` for a value outside the known vocabulary).
``fhir_consent_audit_queue_depth``
    Read/search AuditEvents queued and not yet written (summed over live workers).

From the database, computed when scraped (the same for every worker):

``fhir_consent_ledger_entries``, ``fhir_consent_ledger_outbox{status}``,
``fhir_consent_ledger_outbox_backlog`` (pending + sent: entries not yet confirmed on the
external ledger), ``fhir_consent_ledger_lag_seconds`` (age of the oldest of those; 0 when
none), and ``fhir_consent_db_up`` (0 when those could not be read).

With several workers (``fhir-consent serve --workers N``) prometheus-client's multiprocess
mode is used: the serve command sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start,
each worker writes its values there, and whichever worker answers a scrape merges them all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Final, TypeVar

import sqlalchemy as sa
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from fhir_consent.audit import AuditRecord
from fhir_consent.ledger.tables import ledger_entry, ledger_head, ledger_outbox
from fhir_consent.store.db import Database

__all__ = [
    "CONTENT_TYPE_LATEST",
    "KNOWN_METHODS",
    "KNOWN_REASONS",
    "LedgerCollector",
    "Metrics",
    "multiprocess_dir",
]

KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The consent engine's reasons (fhir_consent.consent.rules.Reason) and the FHIR layer's own.
KNOWN_REASONS: Final = frozenset(
    {
        "patient-self",
        "representative",
        "custodian",
        "author",
        "recipient",
        "consent-explicit",
        "consent-implicit",
        "break-glass",
        "default-deny",
        "scope",
        "not permitted",
    }
)
_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process runs in multiprocess mode."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return path if path and os.path.isdir(path) else None


#: The most labelled children a :class:`Metrics` remembers per metric.
_CHILDREN_MAX = 2048

_K = TypeVar("_K")
_V = TypeVar("_V")


def _child(cache: dict[_K, _V], key: _K, make: Callable[[], _V]) -> _V:
    """The labelled child(ren) of ``key``, made once (``labels()`` checks its values and takes
    a lock on every call, a few µs per request; the keys are bounded — methods, route
    templates, statuses, decision reasons — and the cache is capped all the same)."""
    found = cache.get(key)
    if found is None:
        found = make()
        if len(cache) < _CHILDREN_MAX:
            cache[key] = found
    return found


def _reason_label(reason: str | None) -> str:
    if not reason:
        return "none"
    parts = reason.split(",")
    return reason if all(p in KNOWN_REASONS for p in parts) and len(parts) <= 3 else "other"


class LedgerCollector(Collector):
    """The ledger and outbox gauges, read from the database at scrape time."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def _read(self) -> tuple[int, dict[str, int], int | None]:
        o, e = ledger_outbox.c, ledger_entry.c
        with self.db.read() as conn:
            size = conn.execute(sa.select(ledger_head.c.size)).scalar()
            counts = {
                str(s): int(n)
                for s, n in conn.execute(sa.select(o.status, sa.func.count()).group_by(o.status))
            }
            oldest = conn.execute(
                sa.select(sa.func.min(e.ts))
                .select_from(ledger_entry.join(ledger_outbox, o.seq == e.seq))
                .where(o.status.in_(("pending", "sent")))
            ).scalar()
        return int(size or 0), counts, int(oldest) if oldest is not None else None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "fhir_consent_db_up", "1 when the ledger statistics could be read from the database"
        )
        try:
            size, counts, oldest = self._read()
        except Exception:  # noqa: BLE001 - a scrape must answer even when the database is down
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            "fhir_consent_ledger_entries", "Entries in the permissions ledger", value=size
        )
        rows = GaugeMetricFamily(
            "fhir_consent_ledger_outbox",
            "Outbox rows by anchoring state (external ledger engines only)",
            labels=["status"],
        )
        for status in ("pending", "sent", "confirmed", "skipped"):
            rows.add_metric([status], counts.get(status, 0))
        yield rows
        yield GaugeMetricFamily(
            "fhir_consent_ledger_outbox_backlog",
            "Ledger entries not yet confirmed on the external ledger (pending + sent)",
            value=counts.get("pending", 0) + counts.get("sent", 0),
        )
        lag = max(0.0, self.clock() - oldest / 1e6) if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "fhir_consent_ledger_lag_seconds",
            "Age of the oldest ledger entry not yet confirmed on the external ledger",
            value=lag,
        )


class Metrics:
    """The metrics of one app in this process (its own registry, so tests can build many)."""

    def __init__(self, db: Database) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_dir() is not None
        self.requests = Counter(
            "fhir_consent_http_requests",
            "HTTP requests by route template, method and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fhir_consent_http_request_duration_seconds",
            "HTTP request latency by route template and method",
            ["method", "route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "fhir_consent_access_decisions",
            "Access decisions recorded in the audit trail, by outcome and reason",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self.audit_queue = Gauge(
            "fhir_consent_audit_queue_depth",
            "Read/search AuditEvents queued, not yet written",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.ledger = LedgerCollector(db)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._decision_children: dict[tuple[bool, str | None], Counter] = {}
        if not self.multiprocess:
            self.registry.register(self.ledger)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in KNOWN_METHODS else "other"
        requests, latency = _child(
            self._request_children,
            (method, route, status),
            lambda: (
                self.requests.labels(method, route, str(status)),
                self.latency.labels(method, route),
            ),
        )
        requests.inc()
        latency.observe(seconds)

    def observe_decision(self, record: AuditRecord) -> None:
        """An audit observer (:attr:`fhir_consent.audit.AuditSink.observers`)."""
        _child(
            self._decision_children,
            (record.permitted, record.reason),
            lambda: self.decisions.labels(
                "permit" if record.permitted else "deny", _reason_label(record.reason)
            ),
        ).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every worker's metrics plus the database gauges."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(self.ledger)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def process_exit(self) -> None:
        """Drop this process's live gauges (multiprocess mode) when the worker stops."""
        if self.multiprocess:
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
