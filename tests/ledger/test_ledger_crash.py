"""Acceptance: the crash test of issue 5 (ledger.md §2 "Atomic with the change", "Exactly once
on the external ledger").

A real server (uvicorn subprocess, the ledger installed, its in-process relay publishing to a
real ledger node subprocess — Anvil, or the Waves fake) receives 1,000 consent changes from
four concurrent clients. Mid-stream the ledger node is stopped, then the server is killed with
SIGKILL while writes and relay work are in flight; the node and the server are restarted and
the stream completes. Afterwards every committed change has exactly one entry, every entry is
on the external ledger exactly once, and ``ledger verify --scan-chain`` passes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import free_port
from ledger_testkit import Anvil, consent_resource, require_anvil, wait_for, wait_port

from fhir_consent.ledger import outbox
from fhir_consent.ledger.engines.evm import EvmEngine
from fhir_consent.ledger.engines.waves import WavesEngine
from fhir_consent.ledger.tables import ledger_entry
from fhir_consent.store.db import Database
from fhir_consent.store.tables import metadata

HERE = Path(__file__).parent
ORIGIN = "crash.example/ledger"
CHANGES = 1_000
CLIENTS = 4
WAVES_KEY = "fake-node-api-key"
WAVES_SENDER = "3NotQaBygbSvYZW4ftJ2ZwLXex4rTHY1Qzn"

pytestmark = pytest.mark.slow


class WavesNode:
    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir, self.port = workdir, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.workdir / "waves.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "waves_fake.py"),
                "--port",
                str(self.port),
                "--state",
                str(self.workdir / "waves-state.json"),
                "--block-interval",
                "0.1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


class Server:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.workdir / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "fhir_consent.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env=self.env,
            cwd=self.workdir,  # the server's default key files land there
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_port(self.port, self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


@dataclass
class Stream:
    """Four clients, each owning its consents, making CHANGES changes in all."""

    server: Server
    committed: list[tuple[str, int]] = field(default_factory=list)  # (id, versionId)
    unknown: int = 0  # attempts whose outcome the client never learnt
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run_client(self, n: int) -> None:
        statuses = ["active", "inactive", "active", "rejected", "proposed"]
        mine: list[dict[str, Any]] = []
        with httpx.Client(timeout=10, headers={"content-type": "application/fhir+json"}) as c:
            i = 0
            while i < n:
                try:
                    if len(mine) < 10 or i % 7 == 0:
                        r = c.post(f"{self.server.base}/Consent", json=consent_resource())
                    else:
                        doc = mine[i % len(mine)]
                        doc["status"] = statuses[(i // len(mine)) % len(statuses)]
                        r = c.put(f"{self.server.base}/Consent/{doc['id']}", json=doc)
                except httpx.TransportError:
                    with self.lock:
                        self.unknown += 1  # in flight at the kill, or refused while down
                    time.sleep(0.1)
                    continue
                assert r.status_code in (200, 201), r.text
                body = r.json()
                if r.status_code == 201:
                    mine.append(body)
                else:
                    mine[[m["id"] for m in mine].index(body["id"])] = body
                with self.lock:
                    self.committed.append((body["id"], int(body["meta"]["versionId"])))
                    self.done += 1
                i += 1


#: Each engine once, each database once: the whole test stays around a minute on 2 cores.
CASES = [("sqlite", "evm"), ("postgresql", "waves")]


@pytest.fixture(params=CASES, ids=[f"{db}-{engine}" for db, engine in CASES])
def case(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    sqlite_template: Path,
    pg_url: str | None,
) -> Iterator[tuple[str, Any]]:
    """A migrated, empty database (as conftest's ``db_url``) and a running ledger node."""
    backend, engine = request.param
    if backend == "sqlite":
        path = tmp_path / "db.sqlite3"
        shutil.copy(sqlite_template, path)
        url = f"sqlite:///{path}"
    else:
        if pg_url is None:
            pytest.skip("PostgreSQL not reachable")
        pg = sa.create_engine(pg_url, poolclass=sa.NullPool)
        names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
        with pg.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        pg.dispose()
        url = pg_url
    node: Any
    if engine == "evm":
        node = Anvil(require_anvil(), tmp_path, free_port(), block_time=0.2)
    else:
        node = WavesNode(tmp_path, free_port())
    node.start()
    try:
        yield url, node
    finally:
        node.stop()


def _engine_env(node: Any) -> dict[str, str]:
    if isinstance(node, Anvil):
        return {"FHIR_CONSENT_LEDGER_ENGINE": "evm", "FHIR_CONSENT_LEDGER_EVM_URL": node.url}
    return {
        "FHIR_CONSENT_LEDGER_ENGINE": "waves",
        "FHIR_CONSENT_LEDGER_WAVES_URL": node.url,
        "FHIR_CONSENT_LEDGER_WAVES_SENDER": WAVES_SENDER,
        "FHIR_CONSENT_LEDGER_WAVES_API_KEY": WAVES_KEY,
    }


def _engine(node: Any) -> Any:
    if isinstance(node, Anvil):
        return EvmEngine(node.url, origin=ORIGIN)
    return WavesEngine(node.url, origin=ORIGIN, sender=WAVES_SENDER, api_key=WAVES_KEY)


def test_kill_server_mid_stream_with_node_outage(case: tuple[str, Any], tmp_path: Path) -> None:
    db_url, node = case
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")}
    env.update(
        {
            "FHIR_CONSENT_DATABASE_URL": db_url,
            "FHIR_CONSENT_AUTO_MIGRATE": "false",
            "FHIR_CONSENT_OPEN_ACCESS": "true",
            "FHIR_CONSENT_LEDGER_KEYS_DIR": str(tmp_path / "keys"),
            "FHIR_CONSENT_LEDGER_ORIGIN": ORIGIN,
            "FHIR_CONSENT_LEDGER_CONFIRMATIONS": "1",
            "FHIR_CONSENT_LEDGER_POLL_INTERVAL": "0.05",
            "FHIR_CONSENT_LEDGER_BACKOFF_INITIAL": "0.05",
            "FHIR_CONSENT_LEDGER_BACKOFF_MAX": "0.5",
            "FHIR_CONSENT_LEDGER_RESEND_AFTER": "1.5",
            "FHIR_CONSENT_LEDGER_LEASE_TTL": "2",
            **_engine_env(node),
        }
    )
    server = Server(tmp_path, env)
    server.start()
    stream = Stream(server)
    threads = [
        threading.Thread(target=stream.run_client, args=(CHANGES // CLIENTS,))
        for _ in range(CLIENTS)
    ]
    db = Database(db_url, pool_size=2)
    try:
        for t in threads:
            t.start()
        wait_for(lambda: stream.done >= 300, timeout=60)
        node.stop()  # the ledger node goes down; writes go on
        wait_for(lambda: stream.done >= 550, timeout=60)
        server.kill()  # kill -9 with writes and relay work in flight
        time.sleep(0.3)
        node.start()
        server.start()
        for t in threads:
            t.join(120)
        assert stream.done == len(stream.committed) == CHANGES
        assert stream.unknown > 0  # the kill did hit the stream

        def drained() -> bool:
            with db.read() as conn:
                counts = outbox.status_counts(conn)
            return set(counts) == {"confirmed"}

        wait_for(drained, timeout=60, interval=0.2)
        server.stop()

        with db.read() as conn:
            refs = list(conn.execute(sa.select(ledger_entry.c.ref)).scalars())
            seqs = sorted(conn.execute(sa.select(ledger_entry.c.seq)).scalars())
        assert seqs == list(range(len(seqs)))
        assert len(refs) == len(set(refs))
        entries = set(refs)
        for rid, vid in stream.committed:  # every committed change has its entry
            assert f"Consent/{rid}/_history/{vid}" in entries
        engine = _engine(node)
        on_chain: dict[int, int] = {}
        for _txid, anchored in engine.scan():
            for seq in anchored:
                on_chain[seq] = on_chain.get(seq, 0) + 1
        engine.close()
        assert on_chain == dict.fromkeys(seqs, 1)  # every entry exactly once

        verify = subprocess.run(
            [sys.executable, "-m", "fhir_consent.ledger.cli", "ledger", "verify", "--scan-chain"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert f"log size {len(seqs)}" in verify.stdout
    finally:
        server.stop()
        db.dispose()
