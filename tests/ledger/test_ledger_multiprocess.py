"""Gap-free ``seq`` under several server processes (issue 5 scope 2, ledger.md §2 "Atomic with
the change").

Two real ``fhir-consent serve --workers 2`` processes (four uvicorn worker processes) share
one database and write consent changes concurrently: creates, updates of the same Consents
through different processes (row-lock contention), and transaction Bundles carrying several
Consents. Every worker also runs the in-process relay to one Waves fake, so four relays
compete for the lease. Afterwards the ledger's sequence numbers are exactly 0..n-1 (no gap, no
duplicate), every committed version has exactly one entry and every entry its version, each
entry is on the external ledger exactly once, and ``fhir-consent ledger verify --scan-chain``
passes. SQLite (serialised by ``BEGIN IMMEDIATE`` across processes) and PostgreSQL (the
``ledger_head`` row lock) both.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import free_port
from ledger_testkit import ThreadedServer, consent_resource, wait_for, wait_port
from waves_fake import API_KEY, SENDER, WavesFake

from fhir_consent.ledger import outbox
from fhir_consent.ledger.tables import ledger_entry
from fhir_consent.store.db import Database
from fhir_consent.store.tables import resource_versions

ORIGIN = "multi.example/ledger"
PROCESSES = 2
WORKERS = 2
CLIENTS = 6
OPS_PER_CLIENT = 30

pytestmark = pytest.mark.slow


class ServeProcess:
    """``python -m fhir_consent.cli serve --workers N`` on a free port."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "serve.log"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fhir_consent.cli",
                "serve",
                "--port",
                str(self.port),
                "--workers",
                str(WORKERS),
            ],
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def wait_ready(self) -> None:
        wait_port(self.port, self.proc, timeout=90)
        # every worker must be up before the stream starts (each opens the listening socket
        # only after its app is built, so poll the metadata until it answers consistently)
        with httpx.Client(timeout=10) as c:
            for _ in range(3 * WORKERS):
                assert c.get(f"{self.base}/metadata").status_code == 200

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Stream:
    """Clients spreading creates, updates and transaction Bundles over every process."""

    bases: list[str]
    committed: list[tuple[str, int]] = field(default_factory=list)  # (id, versionId)
    shared: list[str] = field(default_factory=list)  # Consent ids every client updates
    conflicts: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, body: dict[str, Any]) -> None:
        with self.lock:
            self.committed.append((body["id"], int(body["meta"]["versionId"])))

    def run_client(self, n: int, seed: int) -> None:
        rng = random.Random(seed)
        statuses = ["active", "inactive", "rejected", "proposed"]
        with httpx.Client(timeout=30, headers={"content-type": "application/fhir+json"}) as c:
            for i in range(n):
                base = self.bases[(seed + i) % len(self.bases)]
                choice = rng.random()
                try:
                    if choice < 0.4 or not self.shared:
                        r = c.post(f"{base}/Consent", json=consent_resource())
                        if r.status_code == 201:
                            self.record(r.json())
                            with self.lock:
                                if len(self.shared) < 8:
                                    self.shared.append(r.json()["id"])
                    elif choice < 0.85:
                        rid = rng.choice(self.shared)
                        doc = {**consent_resource(), "id": rid, "status": rng.choice(statuses)}
                        r = c.put(f"{base}/Consent/{rid}", json=doc)
                        if r.status_code == 200:
                            self.record(r.json())
                    else:
                        bundle = {
                            "resourceType": "Bundle",
                            "type": "transaction",
                            "entry": [
                                {
                                    "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                                    "resource": consent_resource(f"Patient/p{k}"),
                                    "request": {"method": "POST", "url": "Consent"},
                                }
                                for k in range(3)
                            ],
                        }
                        r = c.post(base, json=bundle)
                        if r.status_code == 200:
                            for item in r.json()["entry"]:
                                loc = item["response"]["location"].split("/")
                                self.record({"id": loc[-3], "meta": {"versionId": loc[-1]}})
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.errors.append(f"{type(exc).__name__} on {base}")
                    continue
                if r.status_code == 409:
                    with self.lock:
                        self.conflicts += 1
                elif r.status_code not in (200, 201):
                    with self.lock:
                        self.errors.append(f"{r.status_code}: {r.text[:300]}")


@pytest.fixture
def waves() -> Iterator[tuple[WavesFake, str]]:
    fake = WavesFake(block_interval=0.05)
    with ThreadedServer(fake.app, free_port()) as node:
        yield fake, node.url


def test_several_server_processes_keep_seq_gap_free(
    db_url: str, tmp_path: Path, waves: tuple[WavesFake, str]
) -> None:
    fake, node_url = waves
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")}
    env.update(
        {
            "FHIR_CONSENT_DATABASE_URL": db_url,
            "FHIR_CONSENT_AUTO_MIGRATE": "false",
            "FHIR_CONSENT_OPEN_ACCESS": "true",
            "FHIR_CONSENT_LOG_LEVEL": "warning",
            "FHIR_CONSENT_LEDGER_KEYS_DIR": str(tmp_path / "keys"),
            "FHIR_CONSENT_LEDGER_ORIGIN": ORIGIN,
            "FHIR_CONSENT_LEDGER_ENGINE": "waves",
            "FHIR_CONSENT_LEDGER_WAVES_URL": node_url,
            "FHIR_CONSENT_LEDGER_WAVES_SENDER": SENDER,
            "FHIR_CONSENT_LEDGER_WAVES_API_KEY": API_KEY,
            "FHIR_CONSENT_LEDGER_CONFIRMATIONS": "1",
            "FHIR_CONSENT_LEDGER_POLL_INTERVAL": "0.05",
            "FHIR_CONSENT_LEDGER_BACKOFF_INITIAL": "0.05",
            "FHIR_CONSENT_LEDGER_BACKOFF_MAX": "0.5",
            "FHIR_CONSENT_LEDGER_LEASE_TTL": "2",
        }
    )
    init = subprocess.run(
        [sys.executable, "-m", "fhir_consent.cli", "keys", "init", "--ledger"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    servers = [ServeProcess(tmp_path / f"serve{i}", env) for i in range(PROCESSES)]
    db = Database(db_url, pool_size=2)
    try:
        for s in servers:
            s.wait_ready()
        stream = Stream([s.base for s in servers])
        threads = [
            threading.Thread(target=stream.run_client, args=(OPS_PER_CLIENT, n))
            for n in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert not any(t.is_alive() for t in threads)
        assert stream.errors == []
        assert len(stream.committed) >= CLIENTS * OPS_PER_CLIENT * 0.9

        def drained() -> bool:
            with db.read() as conn:
                return set(outbox.status_counts(conn)) == {"confirmed"}

        wait_for(drained, timeout=90, interval=0.2)
        for s in servers:
            s.stop()

        with db.read() as conn:
            rows = conn.execute(
                sa.select(ledger_entry.c.seq, ledger_entry.c.ref).order_by(ledger_entry.c.seq)
            ).all()
            v = resource_versions.c
            versions = {
                f"Consent/{r.res_id}/_history/{r.version_id}"
                for r in conn.execute(
                    sa.select(v.res_id, v.version_id).where(v.res_type == "Consent")
                )
            }
        seqs = [int(r.seq) for r in rows]
        refs = [str(r.ref) for r in rows]
        assert seqs == list(range(len(seqs)))  # no gap, no duplicate
        assert len(set(refs)) == len(refs)  # one entry per version
        assert set(refs) == versions  # and one version per entry
        assert {f"Consent/{rid}/_history/{vid}" for rid, vid in stream.committed} <= versions
        assert len(versions) == len(stream.committed)  # nothing committed behind our back
        keys = fake.anchored_keys()
        assert keys == {f"fc/{ORIGIN}/{s}": 1 for s in seqs}  # each entry on chain once

        verify = subprocess.run(
            [sys.executable, "-m", "fhir_consent.cli", "ledger", "verify", "--scan-chain"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert f"log size {len(seqs)}" in verify.stdout
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.stop()
        db.dispose()
