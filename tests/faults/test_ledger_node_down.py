"""Fault: the ledger node is down for a while (issue 8 §4).

Extends the ledger tests (tests/ledger/test_ledger_waves.py answers 503 from an in-process
fake; test_ledger_crash.py stops the node around a server kill) with the plain outage an
operator sees: ``serve --workers 2`` — two relays competing for one lease — publishes to the
Waves fake node as a process, which is SIGKILLed (connection refused, not a polite 503) for
``FHIR_CONSENT_FAULT_OUTAGE_S`` seconds (12 by default; the relay's back-off is capped at 1 s
here, so a longer outage only repeats the same cycle — set it to 300 for "minutes"). While it
is down every consent change succeeds and the backlog grows; the log names the failing
batches; when the node returns (its chain intact, its pool of unconfirmed transactions lost,
as on a real restart) the backlog drains without operator action, every entry lands on the
chain exactly once, and ``ledger verify --scan-chain`` passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from faults_kit import (
    WAVES_KEY,
    WAVES_SENDER,
    Server,
    WavesNode,
    Workload,
    base_env,
    integrity_problems,
    lost_or_duplicated,
    wait_for,
)

from fhir_consent.ledger.engines.waves import WavesEngine

#: Slow by nature (~35 s per database): a 12 s outage spanning many relay back-off cycles,
#: then the drain of the backlog it built up.
pytestmark = pytest.mark.slow

OUTAGE_S = float(os.environ.get("FHIR_CONSENT_FAULT_OUTAGE_S", "12"))
ORIGIN = "faults.example/ledger"


def _outbox(db_url: str) -> dict[str, int]:
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT status, count(*) FROM ledger_outbox GROUP BY status")
            )
            return {str(s): int(n) for s, n in rows}
    finally:
        engine.dispose()


def test_ledger_node_down_then_back(db_url: str, tmp_path: Path) -> None:
    node = WavesNode(tmp_path)
    node.start()
    env = base_env(
        FHIR_CONSENT_DATABASE_URL=db_url,
        FHIR_CONSENT_AUTO_MIGRATE="false",
        FHIR_CONSENT_OPEN_ACCESS="true",
        FHIR_CONSENT_LEDGER_KEYS_DIR=str(tmp_path / "keys" / "ledger"),
        FHIR_CONSENT_LEDGER_ORIGIN=ORIGIN,
        FHIR_CONSENT_DB_POOL_SIZE="4",
        **node.env(),
    )
    server = Server(tmp_path, env, workers=2)
    work = Workload(server.base)
    try:
        server.start()
        work.start(clients=3)
        wait_for(lambda: work.count() >= 30, timeout=60)
        wait_for(lambda: _outbox(db_url).get("confirmed", 0) >= 10, timeout=60)
        node.kill()
        log_mark = len(server.log())
        writes_at_outage = work.count()
        time.sleep(1.5)  # a relay step that had its answer before the kill may still record it
        confirmed_at_outage = _outbox(db_url).get("confirmed", 0)
        time.sleep(OUTAGE_S)
        during = _outbox(db_url)
        writes_during = work.count() - writes_at_outage
        outage_log = server.log()[log_mark:]
        node.start()  # same chain state; its UTX pool is gone
        wait_for(lambda: work.count() >= writes_at_outage + writes_during + 20, timeout=60)
        work.finish()
        wait_for(lambda: set(_outbox(db_url)) == {"confirmed"}, timeout=120, interval=0.3)
    finally:
        work.stop.set()
        server.stop()
    try:
        engine = WavesEngine(node.url, origin=ORIGIN, sender=WAVES_SENDER, api_key=WAVES_KEY)
        on_chain: dict[int, int] = {}
        for _txid, anchored in engine.scan():
            for seq in anchored:
                on_chain[seq] = on_chain.get(seq, 0) + 1
        engine.close()
        verify = subprocess.run(
            [sys.executable, "-m", "fhir_consent.cli", "ledger", "verify", "--scan-chain"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        node.kill()

    # while the node was down: writes went on, the backlog grew, nothing was confirmed
    assert writes_during >= 10, writes_during
    assert during.get("confirmed", 0) == confirmed_at_outage  # no node, no confirmation
    assert during.get("pending", 0) + during.get("sent", 0) >= writes_during // 2, during
    assert "relay" in outage_log and ("not sent" in outage_log or "unavailable" in outage_log)
    assert work.unexpected == [] and work.statuses.get(500, 0) == 0, work.statuses
    # afterwards: nothing lost, nothing twice, on the chain exactly once
    assert lost_or_duplicated(db_url, work) == []
    assert integrity_problems(db_url) == []
    total = sum(_outbox(db_url).values())
    assert on_chain == dict.fromkeys(range(total), 1)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "internal error" not in server.log()
