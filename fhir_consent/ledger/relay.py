"""The relay: publishes outbox entries to the external engine, exactly once (ledger.md §2
"Exactly once on the external ledger").

One :meth:`Relay.step`, under the engine's lease (:func:`.outbox.acquire_lease`):

1. **Prepared batches** that are due are (re-)broadcast. A batch that was attempted before is
   first looked up on chain (:meth:`~.engines.base.LedgerEngine.find`), since the earlier
   attempt may have gone out just before a crash; a rejected broadcast is looked up too (the
   node refuses a duplicate of the same transaction).
2. **Sent batches** get their confirmation height; at ``height + k`` they are confirmed. A
   transaction the node has forgotten (e.g. its pool was lost in a restart) goes back to
   ``prepared`` after ``resend_after`` — the same parameters, hence the same transaction.
3. **New batches**: the oldest pending rows, as many as one transaction carries (≤ 100, within
   the engine's size limits), are claimed into a batch whose repeatable parameters are stored
   *before* the broadcast.

All state lives in the database, so the relay survives restarts and ``kill -9`` at any
instant; failures back off exponentially with jitter. Several relays (server workers, a
``fhir-consent ledger relay`` process) may run: the lease lets one publish at a time, its
fencing epoch stops a relay that lost the lease from recording anything, and a row can join
only one batch, so no entry is ever published twice.

Logs carry batch ids, seq ranges and error *codes* only — never entry contents or node
messages (ledger.md §1: no personal data in clear).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from fhir_consent.fhir.services import system_clock
from fhir_consent.ledger import outbox
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.ledger.engines.base import (
    AnchorItem,
    EngineError,
    EngineRejected,
    LedgerEngine,
    PrepareContext,
    StaleParameters,
)
from fhir_consent.store.db import Database

__all__ = ["Relay", "RelayThread", "StepResult"]

log = logging.getLogger("fhir_consent.ledger.relay")

_US = 1_000_000


@dataclass(slots=True)
class StepResult:
    """What one :meth:`Relay.step` did."""

    leased: bool = False
    sent: int = 0  # batches broadcast (or found on chain)
    confirmed: int = 0  # batches confirmed
    failed: int = 0  # broadcast attempts that failed
    more: bool = False  # more work is ready right now
    errors: list[str] = field(default_factory=list)


class Relay:
    """Publishes the outbox to one engine; call :meth:`step` repeatedly or :meth:`run`."""

    def __init__(
        self,
        db: Database,
        engine: LedgerEngine,
        settings: LedgerSettings,
        *,
        holder: str | None = None,
        clock: Callable[[], int] = system_clock,
        rng: Callable[[], float] = random.random,
        max_new_batches: int = 20,
    ) -> None:
        self.db = db
        self.engine = engine
        self.settings = settings
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.rng = rng
        self.max_new_batches = max_new_batches
        self._backfilled = False
        self._consecutive_failures = 0

    # -- timing ------------------------------------------------------------------------------

    def backoff(self, attempts: int) -> float:
        """Seconds before retry ``attempts`` (exponential, capped, with ±50 % jitter)."""
        s = self.settings
        base = min(s.backoff_max, s.backoff_initial * (2.0 ** min(attempts, 30)))
        return float(base * (0.5 + self.rng()))

    def next_delay(self) -> float:
        """How long :meth:`run` waits after an idle or failed step."""
        if self._consecutive_failures:
            return self.backoff(self._consecutive_failures - 1)
        return self.settings.poll_interval

    # -- one step ----------------------------------------------------------------------------

    def _lease(self) -> outbox.Lease | None:
        now = self.clock()
        with self.db.write() as conn:
            lease = outbox.acquire_lease(
                conn, self.engine.name, self.holder, now, int(self.settings.lease_ttl * _US)
            )
            if lease is not None and not self._backfilled:
                while outbox.backfill(conn):
                    pass
                self._backfilled = True
            return lease

    def step(self) -> StepResult:
        """One pass over prepared, sent and pending work (see the module docstring)."""
        result = StepResult()
        lease = self._lease()
        if lease is None:
            return result
        result.leased = True
        ok = True
        with self.db.read() as conn:
            prepared = outbox.load_batches(conn, self.engine.name, "prepared")
        now = self.clock()
        waiting = False
        for batch in prepared:
            if batch.next_attempt_at > now:
                waiting = True  # backing off: no new batches until it goes out
                continue
            ok = self._send(lease, batch.id, batch.params, batch.attempts, result)
            if not ok:
                break
        if ok:
            with self.db.read() as conn:
                sent = outbox.load_batches(conn, self.engine.name, "sent", limit=200)
            for batch in sent:
                if not self._confirm(lease, batch, result):
                    ok = False
                    break
        if ok and not waiting:
            for _ in range(self.max_new_batches):
                created = self._new_batch(lease)
                if created is None:
                    break
                batch_id, params = created
                if not self._send(lease, batch_id, params, 0, result):
                    ok = False
                    break
            else:
                result.more = True
        self._consecutive_failures = 0 if ok else self._consecutive_failures + 1
        return result

    def _record(self, lease: outbox.Lease, fn: Callable[..., None], *args: object) -> bool:
        """Apply a state change if we still hold the lease (fencing)."""
        now = self.clock()
        with self.db.write() as conn:
            if not outbox.holds_lease(conn, lease, now):
                log.warning("relay %s lost the %s lease", self.holder, lease.engine)
                return False
            fn(conn, *args)
            return True

    def _new_batch(self, lease: outbox.Lease) -> tuple[int, dict[str, object]] | None:
        limit = self.settings.batch_size
        with self.db.write() as conn:
            if not outbox.holds_lease(conn, lease, self.clock()):
                return None
            items = outbox.claim_pending(conn, limit)
            while items:
                n = self.engine.fit(items)
                if n > 0:
                    break
                log.error(
                    "ledger entry %d is too large for the %s engine; it stays in the embedded"
                    " log only",
                    items[0].seq,
                    self.engine.name,
                )
                outbox.skip(conn, items[0].seq, f"too large for {self.engine.name}")
                items = items[1:]
            if not items:
                return None
            batch = items[:n]
            context = PrepareContext(outbox.in_flight_params(conn, self.engine.name))
        # parameters may need the node (EVM nonce): ask outside the transaction
        try:
            params = self.engine.prepare(batch, context)
        except EngineError as exc:
            log.warning("relay: cannot prepare a batch (%s)", exc.code)
            return None
        with self.db.write() as conn:
            if not outbox.holds_lease(conn, lease, self.clock()):
                return None
            again = outbox.claim_pending(conn, len(batch))
            if [i.seq for i in again] != [i.seq for i in batch]:
                return None  # the outbox changed meanwhile; try again next step
            batch_id = outbox.create_batch(conn, self.engine.name, batch, params, self.clock())
        log.info("relay: batch %d prepared (seq %d..%d)", batch_id, batch[0].seq, batch[-1].seq)
        return batch_id, params

    def _send(
        self,
        lease: outbox.Lease,
        batch_id: int,
        params: dict[str, object],
        attempts: int,
        result: StepResult,
    ) -> bool:
        with self.db.read() as conn:
            items: list[AnchorItem] = outbox.batch_items(conn, batch_id)
        retry_at = self.clock() + int(self.backoff(attempts) * _US)
        if not self._record(lease, outbox.begin_attempt, batch_id, retry_at):
            return False
        try:
            txid = self.engine.find(items, params) if attempts > 0 else None
            if txid is None:
                try:
                    txid = self.engine.publish(items, params)
                except EngineRejected:
                    txid = self.engine.find(items, params)  # a duplicate of an earlier send?
                    if txid is None:
                        raise
        except StaleParameters as exc:
            log.warning("relay: batch %d needs new parameters (%s)", batch_id, exc.code)
            with self.db.read() as conn:
                others = outbox.in_flight_params(conn, self.engine.name, exclude=batch_id)
            try:
                fresh = self.engine.prepare(items, PrepareContext(others, replacing=params))
            except EngineError as exc2:
                return self._failed(lease, batch_id, exc2, retry_at, result)
            self._record(lease, outbox.reprepare, batch_id, fresh, self.clock())
            return True
        except EngineError as exc:
            return self._failed(lease, batch_id, exc, retry_at, result)
        if self._record(lease, outbox.mark_sent, batch_id, txid, self.clock()):
            result.sent += 1
            log.info("relay: batch %d sent", batch_id)
        return True

    def _failed(
        self,
        lease: outbox.Lease,
        batch_id: int,
        exc: EngineError,
        retry_at: int,
        result: StepResult,
    ) -> bool:
        result.failed += 1
        result.errors.append(exc.code)
        log.warning("relay: batch %d not sent (%s); will retry", batch_id, exc.code)
        self._record(lease, outbox.mark_failure, batch_id, exc.code, retry_at)
        return False

    def _confirm(self, lease: outbox.Lease, batch: outbox.Batch, result: StepResult) -> bool:
        assert batch.txid is not None
        try:
            st = self.engine.status(batch.txid)
        except EngineError as exc:
            result.errors.append(exc.code)
            log.warning("relay: status of batch %d unavailable (%s)", batch.id, exc.code)
            return False
        now = self.clock()
        if st.height is not None:
            if st.confirmations() >= self.settings.confirmations:
                if self._record(lease, outbox.mark_confirmed, batch.id, st.height, now):
                    result.confirmed += 1
            elif st.height != batch.height:
                self._record(lease, outbox.mark_height, batch.id, st.height)
        elif not st.known:
            sent_at = batch.sent_at or now
            if now - sent_at > int(self.settings.resend_after * _US):
                log.warning("relay: batch %d unknown to the node; sending it again", batch.id)
                self._record(lease, outbox.reprepare, batch.id, batch.params, now)
            elif batch.height is not None:
                self._record(lease, outbox.mark_height, batch.id, None)  # reorganised away
        return True

    # -- loops -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set; never raises (errors are logged by type and retried)."""
        while not stop.is_set():
            try:
                result = self.step()
            except Exception as exc:  # noqa: BLE001 - the relay must outlive any failure
                self._consecutive_failures += 1
                log.error("relay step failed: %s", type(exc).__name__)
                result = StepResult()
            if not result.more:
                stop.wait(self.next_delay())
        self.release()

    def release(self) -> None:
        """Give the lease up (on shutdown), so another relay can take over at once."""
        try:
            with self.db.write() as conn:
                outbox.release_lease(conn, self.engine.name, self.holder)
        except Exception as exc:  # noqa: BLE001
            log.warning("relay: could not release the lease: %s", type(exc).__name__)

    def drain(self, timeout: float) -> bool:
        """Step until nothing is pending, prepared or sent (tests, ``ledger relay --once``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.step()
            with self.db.read() as conn:
                counts = outbox.status_counts(conn)
            if not any(counts.get(s) for s in ("pending", "sent")):
                return True
            time.sleep(min(0.05, self.next_delay()))
        return False


class RelayThread:
    """The in-process relay: a daemon thread running :meth:`Relay.run`."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=relay.run, args=(self._stop,), daemon=True, name="ledger-relay"
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.relay.engine.close()
