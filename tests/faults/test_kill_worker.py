"""Fault: kill -9 of server workers during writes (issue 8 §4).

``fhir-consent serve --workers 2`` on PostgreSQL (the session's own schema), the ledger
publishing to the Waves fake node (so every Consent version also has an outbox row). Four
clients write Patients and Consent changes. One worker is killed with SIGKILL three times
(uvicorn's supervisor starts a new one; the other worker keeps serving), then the whole
server — supervisor and workers — is killed with SIGKILL and started again as a single
process. Afterwards: every acknowledged write is stored exactly once, no resource lacks its
versions or index rows, no Consent version lacks its ledger entry and outbox row, the outbox
drains to the node, and ``fhir-consent ledger verify`` passes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from faults_kit import (
    Server,
    WavesNode,
    Workload,
    base_env,
    integrity_problems,
    lost_or_duplicated,
    wait_for,
)

from fhir_consent.store.tables import metadata

#: Slow by nature (~30 s): a real two-worker server, a ledger node and four clients through
#: four kills; the property is only worth checking under sustained concurrent writes.
pytestmark = pytest.mark.slow


@pytest.fixture
def pg_db(pg_url: str | None) -> Iterator[str]:
    if pg_url is None:
        pytest.skip("PostgreSQL not reachable")
    engine = sa.create_engine(pg_url, poolclass=sa.NullPool)
    names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()
    yield pg_url


def test_kill_9_workers_during_writes(pg_db: str, tmp_path: Path) -> None:
    node = WavesNode(tmp_path)
    node.start()
    env = base_env(
        FHIR_CONSENT_DATABASE_URL=pg_db,
        FHIR_CONSENT_OPEN_ACCESS="true",
        FHIR_CONSENT_LEDGER_KEYS_DIR=str(tmp_path / "keys" / "ledger"),
        FHIR_CONSENT_LEDGER_ORIGIN="faults.example/ledger",
        FHIR_CONSENT_DB_POOL_SIZE="4",
        **node.env(),
    )
    server = Server(tmp_path, env, workers=2)
    work = Workload(server.base)
    killed: list[int] = []
    try:
        server.start()
        wait_for(lambda: len(server.workers_pids()) == 2, timeout=30)
        work.start(clients=4)
        for round_ in range(3):
            wait_for(lambda r=round_: work.count() >= 40 * (r + 1), timeout=90)
            victim = server.workers_pids()[round_ % 2]
            os.kill(victim, signal.SIGKILL)  # mid-write: the clients never stop
            killed.append(victim)
            wait_for(
                lambda v=victim: len(server.workers_pids()) == 2 and v not in server.workers_pids(),
                timeout=30,
            )
        wait_for(lambda: work.count() >= 160, timeout=90)
        server.kill_all()  # kill -9 of the supervisor and both workers at once
        time.sleep(0.5)
        server.start(workers=1)
        before = work.count()
        wait_for(lambda: work.count() >= before + 40, timeout=90)
        work.finish()
        wait_for(lambda: _outbox_drained(pg_db), timeout=90, interval=0.3)
    finally:
        work.stop.set()
        server.stop()
    try:
        verify = subprocess.run(  # the embedded log, and every anchor on the node
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
    assert len(killed) == 3
    assert work.transport_errors > 0  # the kills did cut requests off
    assert work.unexpected == []
    assert work.statuses.get(500, 0) == 0, work.statuses
    assert lost_or_duplicated(pg_db, work) == []
    assert integrity_problems(pg_db) == []
    assert verify.returncode == 0, verify.stdout + verify.stderr
    log = server.log()
    for pid in killed:  # the supervisor says what happened, and replaced each one
        assert f"Child process [{pid}] died" in log
    assert "internal error" not in log and "Traceback" not in log


def _outbox_drained(db_url: str) -> bool:
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            states = {
                s for (s,) in conn.execute(sa.text("SELECT DISTINCT status FROM ledger_outbox"))
            }
    finally:
        engine.dispose()
    return states == {"confirmed"}
