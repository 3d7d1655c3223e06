"""Helpers of the operations tests: fresh databases of each backend, resources carrying
recognisable patient data, and ``fhir-consent`` as a real subprocess server."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import _pg_base_url, free_port

__all__ = [
    "PG_BASE",
    "Server",
    "cli",
    "consent",
    "document",
    "fresh_database",
    "patient",
    "pg_database",
]

PG_BASE = _pg_base_url()


def cli() -> list[str]:
    """The console script (from this worktree: ``python -m fhir_consent.cli``)."""
    return [sys.executable, "-m", "fhir_consent.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any FHIR_CONSENT_ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(extra)
    return env


@contextmanager
def pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database (dropped afterwards); yields its URL."""
    if PG_BASE is None:
        pytest.skip("PostgreSQL not reachable")
    name = f"ops_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_BASE, poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_BASE.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def drop_pg_database(url: str) -> None:
    """Drop the database of ``url`` now, terminating its connections (a database gone)."""
    assert PG_BASE is not None
    name = sa.make_url(url).database
    admin = sa.create_engine(PG_BASE, poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@contextmanager
def fresh_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """An empty database (no tables) of ``backend``; yields its URL."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / f'{uuid.uuid4().hex[:8]}.sqlite3'}"
        return
    with pg_database() as url:
        yield url


def patient(marker: str) -> dict[str, Any]:
    """A Patient whose every identifying element contains ``marker``."""
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": f"MRN{marker}"}],
        "name": [{"family": f"Family{marker}", "given": [f"Given{marker}"]}],
        "telecom": [{"system": "phone", "value": f"+1555{marker[:6]}"}],
        "gender": "female",
        "birthDate": "1974-12-25",
        "address": [{"line": [f"{marker} Lane"], "city": f"City{marker}"}],
    }


def consent(pid: str, status: str = "active") -> dict[str, Any]:
    """A patient-privacy Consent of Patient ``pid`` (OPTIN, no provisions)."""
    return {
        "resourceType": "Consent",
        "status": status,
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "dateTime": "2024-01-01",
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
    }


def document(pid: str, data: bytes, content_type: str = "application/pdf") -> dict[str, Any]:
    """A DocumentReference of Patient ``pid`` with ``data`` as inline attachment content."""
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "date": "2024-01-01T00:00:00Z",
        "content": [
            {
                "attachment": {
                    "contentType": content_type,
                    "data": base64.b64encode(data).decode("ascii"),
                }
            }
        ],
    }


class Server:
    """``fhir-consent serve`` in ``cwd`` on a free loopback port, output to ``log``."""

    def __init__(
        self,
        cwd: Path,
        env: Mapping[str, str],
        *,
        args: tuple[str, ...] = (),
        log_name: str = "server.log",
    ) -> None:
        self.cwd = cwd
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.base = f"{self.origin}/fhir"
        self.log_path = cwd / log_name
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*cli(), "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=cwd,
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.origin}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited:\n{self.output()}")
            assert time.monotonic() < deadline, f"server not ready:\n{self.output()}"
            time.sleep(0.2)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Server:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
