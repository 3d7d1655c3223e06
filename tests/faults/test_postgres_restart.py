"""Fault: PostgreSQL restarts under load (issue 8 §4).

A private PostgreSQL cluster (initdb/pg_ctl in a temporary directory, on a free port; never
the machine's shared server) backs ``fhir-consent serve --workers 2``. Four clients write
(conditional creates, consent status changes with If-Match) and one reads and searches while
the cluster is stopped for a few seconds and started again. While it is down, every answer is
a 503 OperationOutcome with Retry-After (never a 500) and the server says so in its log; once
it is back, the server recovers by itself (no restart, no operator); afterwards every
acknowledged write is stored, none twice, nothing half-written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from faults_kit import (
    PrivatePostgres,
    Server,
    Workload,
    base_env,
    integrity_problems,
    lost_or_duplicated,
    wait_for,
)

#: Slow by nature (~20 s): initdb of a private cluster, load, a 4 s outage and recovery.
pytestmark = pytest.mark.slow

DOWN_SECONDS = 4


@pytest.fixture
def cluster() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


def test_postgres_restart_during_load(cluster: PrivatePostgres, tmp_path: Path) -> None:
    env = base_env(
        FHIR_CONSENT_DATABASE_URL=cluster.url,
        FHIR_CONSENT_OPEN_ACCESS="true",
        FHIR_CONSENT_LEDGER_KEYS_DIR=str(tmp_path / "keys" / "ledger"),
        FHIR_CONSENT_DB_POOL_SIZE="4",
    )
    server = Server(tmp_path, env, workers=2)
    work = Workload(server.base)
    reads: dict[str, int] = {"ok": 0, "503": 0, "other": 0}
    outage_answers: list[httpx.Response] = []
    down = threading.Event()

    def reader() -> None:
        with httpx.Client(timeout=10) as c:
            while not work.stop.is_set():
                for url in (f"{server.base}/Patient?family=Fault0", f"{server.base}/Consent"):
                    try:
                        r = c.get(url, headers={"accept": "application/fhir+json"})
                    except httpx.TransportError:
                        reads["other"] += 1
                        continue
                    if r.status_code == 200:
                        reads["ok"] += 1
                    elif r.status_code == 503:
                        reads["503"] += 1
                        if down.is_set() and len(outage_answers) < 50:
                            outage_answers.append(r)
                    else:
                        reads["other"] += 1
                time.sleep(0.05)

    threads = [threading.Thread(target=reader, daemon=True)]
    try:
        server.start()
        work.start(clients=4)
        threads[0].start()
        wait_for(lambda: work.count() >= 60, timeout=90)
        cluster.stop("fast")  # the database goes away under the running server
        down.set()
        before = work.count()
        time.sleep(DOWN_SECONDS)
        assert work.count() - before <= 8  # only writes that raced the stop got through
        cluster.start()
        down.clear()
        back = time.monotonic()
        wait_for(lambda: work.count() >= before + 60, timeout=60)
        recovered_in = time.monotonic() - back
        work.finish()
        for t in threads:
            t.join(30)
    finally:
        work.stop.set()
        server.stop()

    assert work.unexpected == []
    assert work.statuses.get(500, 0) == 0, work.statuses
    assert work.statuses.get(503, 0) > 0, work.statuses  # the outage was seen by the writers
    assert outage_answers, reads
    for r in outage_answers:
        assert r.headers["content-type"].startswith("application/fhir+json")
        assert r.headers["retry-after"]
        body = r.json()
        assert body["resourceType"] == "OperationOutcome"
        assert body["issue"][0]["code"] == "transient"
    assert reads["other"] == 0, reads
    assert recovered_in < 30
    assert lost_or_duplicated(cluster.url, work) == []
    assert integrity_problems(cluster.url) == []
    log = server.log()
    assert "database unavailable" in log  # the server says what happened
    assert "internal error" not in log
    assert "Traceback" not in log
