"""Graceful shutdown of ``fhir-consent serve`` (one worker on SQLite, two on PostgreSQL):
SIGTERM while a slow upload is in flight and read AuditEvents are still queued. The upload
completes, the server exits cleanly, and every queued AuditEvent is in the database afterwards."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import sqlalchemy as sa
from opskit import Server, clean_env, cli, fresh_database, patient

from fhir_consent.audit import access_count
from fhir_consent.store.db import Database
from fhir_consent.store.tables import resources
from smart_on_fhir.client_auth import ASSERTION_TYPE, sign_client_assertion
from smart_on_fhir.keys import generate_signing_key

READS = 5
CLINIC = "Organization/clinic-1"


def _clinic(cwd: Path, env: dict[str, str]) -> tuple[str, object]:
    """A backend-services client (client_credentials, private_key_jwt), registered with the
    console script; returns its id and private key."""
    key = generate_signing_key("RS384")
    jwks = json.dumps({"keys": [dict(key.as_dict(private=False))]})
    made = subprocess.run(
        [
            *cli(),
            "clients",
            "add",
            "--name",
            "Clinic system",
            "--type",
            "confidential-asymmetric",
            "--jwks",
            jwks,
            "--scope",
            "system/Patient.cruds system/Binary.cruds",
            "--organization",
            CLINIC,
            "--client-id",
            "clinic-system",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    return "clinic-system", key


def _token(origin: str, client_id: str, key: object) -> str:
    url = f"{origin}/auth/token"
    assertion = sign_client_assertion(key, client_id=client_id, token_url=url)  # type: ignore[arg-type]
    got = httpx.post(
        url,
        data={
            "grant_type": "client_credentials",
            "scope": "system/Patient.cruds system/Binary.cruds",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
        timeout=30,
    )
    assert got.status_code == 200, got.text
    token: str = got.json()["access_token"]
    return token


def _read_audits(url: str, pid: str) -> int:
    """The patient's reads the stored AuditEvents record (a coalesced one counts each)."""
    db = Database(url, pool_size=1)
    try:
        with db.read() as conn:
            rows = conn.execute(
                sa.select(resources.c.content).where(resources.c.res_type == "AuditEvent")
            ).scalars()
            n = 0
            for content in rows:
                event = orjson.loads(content)
                codes = {s.get("code") for s in event.get("subtype", [])}
                refs = {e.get("what", {}).get("reference") for e in event.get("entity", [])}
                if "read" in codes and f"Patient/{pid}" in refs:
                    n += access_count(event)
            return n
    finally:
        db.dispose()


@pytest.mark.parametrize(("backend", "workers"), [("sqlite", 1), ("postgresql", 2)])
def test_sigterm_finishes_requests_and_writes_queued_audit_events(
    backend: str, workers: int, tmp_path: Path
) -> None:
    with fresh_database(backend, tmp_path) as url:
        env = clean_env(
            FHIR_CONSENT_DATABASE_URL=url,
            FHIR_CONSENT_AUDIT_FLUSH_INTERVAL="30",  # queued reads wait for the shutdown
            FHIR_CONSENT_SHUTDOWN_TIMEOUT="30",
            FHIR_CONSENT_LOG_FORMAT="text",
        )
        client_id, key = _clinic(tmp_path, env)
        server = Server(tmp_path, env, args=("--workers", str(workers)))
        with server:
            token = _token(server.origin, client_id, key)
            auth = {"authorization": f"Bearer {token}", "accept": "application/fhir+json"}
            record = {**patient("Shutdown"), "managingOrganization": {"reference": CLINIC}}
            made = httpx.post(f"{server.base}/Patient", json=record, headers=auth)
            assert made.status_code == 201, made.text
            pid = made.json()["id"]
            for _ in range(READS):
                with httpx.Client(timeout=30) as fresh:  # any worker may take it
                    read = fresh.get(f"{server.base}/Patient/{pid}", headers=auth)
                    assert read.status_code in (200, 404)  # permitted or refused: audited
            time.sleep(0.5)
            stored_before = _read_audits(url, pid)
            assert stored_before < READS, "the reads' AuditEvents should still be queued"

            started = threading.Event()
            chunks = [bytes([n]) * 65536 for n in range(12)]

            def slow_body() -> Iterator[bytes]:
                for n, chunk in enumerate(chunks):
                    if n == 1:
                        started.set()
                    time.sleep(0.25)
                    yield chunk

            outcome: dict[str, httpx.Response] = {}

            def upload() -> None:
                outcome["upload"] = httpx.post(
                    f"{server.base}/Binary",
                    content=slow_body(),
                    headers={**auth, "content-type": "application/pdf"},
                    timeout=60,
                )

            thread = threading.Thread(target=upload)
            thread.start()
            assert started.wait(30)
            server.proc.send_signal(signal.SIGTERM)  # mid-upload
            thread.join(60)
            # uvicorn re-raises the signal once it has shut down cleanly: "killed by SIGTERM"
            # is the conventional clean exit of a service (systemd counts it as success).
            assert server.proc.wait(60) in (0, -signal.SIGTERM), server.output()

        uploaded = outcome["upload"]
        assert uploaded.status_code == 201, uploaded.text
        assert _read_audits(url, pid) == READS, server.output()
        log = server.output()
        assert "Shutting down" in log or "Finished server process" in log
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.origin}/healthz", timeout=2)
