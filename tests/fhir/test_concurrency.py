"""Several uvicorn workers on one database: concurrent writers never lose or duplicate a
version, and If-Match lets exactly one of two racing updates win."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import free_port

HEADERS = {"content-type": "application/fhir+json"}


@pytest.fixture
def two_workers(db_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "FHIR_CONSENT_DATABASE_URL": db_url,
        "FHIR_CONSENT_AUTO_MIGRATE": "false",
        "FHIR_CONSENT_OPEN_ACCESS": "true",  # these tests are about storage, not tokens
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "fhir_consent.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=tmp_path,  # the server's default key files land there, not in the repo
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    time.sleep(1.0)  # let both workers finish starting
    try:
        yield f"http://127.0.0.1:{port}/fhir"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_concurrent_updates_keep_gap_free_versions(two_workers: str) -> None:
    base = two_workers
    with httpx.Client(timeout=30) as c:
        rid = c.post(f"{base}/Patient", json={"resourceType": "Patient"}, headers=HEADERS).json()[
            "id"
        ]

    def update(i: int) -> int:
        with httpx.Client(timeout=30) as c:
            body = {"resourceType": "Patient", "id": rid, "name": [{"text": f"n{i}"}]}
            return c.put(f"{base}/Patient/{rid}", json=body, headers=HEADERS).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(update, range(40)))
    ok = statuses.count(200)
    assert set(statuses) <= {200, 409}
    with httpx.Client(timeout=30) as c:
        current = c.get(f"{base}/Patient/{rid}").json()
        assert int(current["meta"]["versionId"]) == ok + 1
        hist = c.get(f"{base}/Patient/{rid}/_history?_count=100").json()
    versions = sorted(int(e["resource"]["meta"]["versionId"]) for e in hist["entry"])
    assert versions == list(range(1, ok + 2))


def test_if_match_race_has_one_winner(two_workers: str) -> None:
    base = two_workers
    with httpx.Client(timeout=30) as c:
        rid = c.post(f"{base}/Patient", json={"resourceType": "Patient"}, headers=HEADERS).json()[
            "id"
        ]

    def update(i: int) -> int:
        with httpx.Client(timeout=30) as c:
            body = {"resourceType": "Patient", "id": rid, "gender": "male" if i % 2 else "female"}
            return c.put(
                f"{base}/Patient/{rid}", json=body, headers={**HEADERS, "If-Match": 'W/"1"'}
            ).status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(update, range(12)))
    assert statuses.count(200) == 1
    assert set(statuses) <= {200, 409, 412}


def test_concurrent_creates_all_land(two_workers: str) -> None:
    base = two_workers

    def create(i: int) -> str:
        with httpx.Client(timeout=30) as c:
            r = c.post(
                f"{base}/Patient",
                json={"resourceType": "Patient", "name": [{"family": f"Conc{i}"}]},
                headers=HEADERS,
            )
            assert r.status_code == 201
            rid: str = r.json()["id"]
            return rid

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(create, range(60)))
    assert len(ids) == 60
    with httpx.Client(timeout=30) as c:
        assert c.get(f"{base}/Patient?family=conc&_summary=count").json()["total"] == 60
