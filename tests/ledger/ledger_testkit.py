"""Shared helpers for the ledger tests: format fixtures (entries, keys) and, for the service
tests, apps with the ledger installed, FHIR resources, a threaded uvicorn, and Anvil.

A plain module rather than a ``conftest.py``: other test folders import ``conftest`` by name,
which a second ``conftest.py`` outside a package would shadow.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from livekit import wait_for, wait_port

from fhir_consent.crypto import KeyRing
from fhir_consent.ledger.entry import LedgerEntry, build_entry

__all__ = [
    "ANVIL_REASON",
    "Anvil",
    "FHIR_JSON",
    "TS",
    "ThreadedServer",
    "anvil_binary",
    "consent_json",
    "consent_resource",
    "document_resource",
    "ledger_app",
    "ledger_settings",
    "make_entry",
    "require_anvil",
    "running_anvil",
    "wait_for",
    "wait_port",
]

TS = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


def consent_json(cid: str = "c1", vid: str = "1", status: str = "proposed") -> bytes:
    """A proposed Consent as a clinic would create it (consent.md §2.1)."""
    return orjson.dumps(
        {
            "resourceType": "Consent",
            "id": cid,
            "meta": {"versionId": vid, "lastUpdated": "2024-05-01T12:00:00Z"},
            "status": status,
            "scope": {"coding": [{"code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": "Patient/p1"},
            "policyRule": {"coding": [{"code": "OPTOUT"}]},
            "provision": {"period": {"start": "2024-05-01", "end": "2024-06-01"}},
        }
    )


def make_entry(
    keyring: KeyRing,
    seq: int = 0,
    *,
    status: str = "proposed",
    event: str = "proposed",
    cid: str = "c1",
    vid: str = "1",
) -> LedgerEntry:
    """A signed entry for Consent/<cid>/_history/<vid> of Patient/p1, by Organization/o2."""
    return build_entry(
        seq,
        TS,
        "Consent",
        f"Consent/{cid}/_history/{vid}",
        event,
        "Patient/p1",
        consent_json(cid, vid, status),
        "Organization/o2",
        keyring,
    )


# -- database / app helpers for the ledger service tests (issue 5) ---------------------------


FHIR_JSON = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}
ROOT = Path(__file__).resolve().parents[2]
ANVIL_REASON = (
    "anvil is not installed: run `npm install --prefix .tools @foundry-rs/anvil@1.7.1` "
    "(or set FHIR_CONSENT_ANVIL to its binary)"
)


def consent_resource(patient: str = "Patient/p1", status: str = "proposed") -> dict[str, Any]:
    """A clinic's inquiry (consent.md §2.1)."""
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
        "patient": {"reference": patient},
        "dateTime": "2024-05-01T12:00:00Z",
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}
            ]
        },
        "provision": {
            "period": {"start": "2024-05-01", "end": "2025-05-01"},
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "PRCP",
                            }
                        ]
                    },
                    "reference": {"reference": "Organization/o2"},
                }
            ],
            "action": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                            "code": "access",
                        }
                    ]
                }
            ],
        },
    }


def document_resource(patient: str = "Patient/p1") -> dict[str, Any]:
    """A minimal DocumentReference ("Document Set" metadata, ledger.md intro)."""
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": patient},
        "type": {"coding": [{"system": "http://loinc.org", "code": "34133-9"}]},
        "content": [{"attachment": {"contentType": "text/plain", "url": "Binary/b1"}}],
    }


def ledger_settings(tmp_path: Path, **overrides: Any) -> Any:
    from fhir_consent.ledger.config import LedgerSettings

    values: dict[str, Any] = {
        "keys_dir": str(tmp_path / "keys"),
        "auto_init_keys": True,
        "origin": "test.example/ledger",
        "poll_interval": 0.05,
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
        "lease_ttl": 5.0,
        "resend_after": 2.0,
        "confirmations": 0,
    }
    values.update(overrides)
    return LedgerSettings(_env_file=None, **values)  # type: ignore[call-arg]


def ledger_app(settings: Any, lsettings: Any) -> Any:
    """``create_core_app(settings)`` + ``install(app, app.state.fhir, lsettings)``."""
    from fhir_consent.app import create_core_app
    from fhir_consent.ledger.api import install

    app = create_core_app(settings)
    install(app, app.state.fhir, lsettings)
    return app


def anvil_binary() -> str | None:
    """The native anvil binary: $FHIR_CONSENT_ANVIL, .tools/ (npm), or PATH."""
    env = os.environ.get("FHIR_CONSENT_ANVIL")
    if env and Path(env).is_file():
        return env
    scoped = ROOT / ".tools" / "node_modules" / "@foundry-rs"
    for candidate in sorted(scoped.glob("anvil-*/bin/anvil")):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("anvil")


def require_anvil() -> str:
    """The anvil binary; skips the test without it, but FAILS under CI=true."""
    binary = anvil_binary()
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(ANVIL_REASON + " — CI must install it (.ci/run)")
        pytest.skip(ANVIL_REASON)
    return binary


class Anvil:
    """A real Anvil node on a free loopback port; ``stop()``/``start()`` keep its chain in a
    state file (``--state``), like a node restarted by its operator."""

    def __init__(self, binary: str, workdir: Path, port: int, block_time: float | None = None):
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.block_time = block_time
        self.state = workdir / "anvil-state.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        cmd = [
            self.binary,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--state",
            str(self.state),
            "--accounts",
            "2",
            "--silent",
        ]
        if self.block_time:
            cmd += ["--block-time", str(self.block_time)]
        log = (self.workdir / "anvil.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_port(self.port, self.proc)
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.post(
                    self.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber"}
                ).raise_for_status()
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Graceful stop (SIGTERM): anvil writes its state file on the way out."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextmanager
def running_anvil(tmp_path: Path, port: int) -> Iterator[Anvil]:
    node = Anvil(require_anvil(), tmp_path, port)
    node.start()
    try:
        yield node
    finally:
        node.stop()


class ThreadedServer:
    """An ASGI app served by uvicorn on a loopback port in a background thread."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        wait_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
