"""Helpers shared by the test kits that run the app for real or switch who is calling:
:class:`Caller` (an injected authenticator), :func:`wait_port` / :func:`wait_for` (poll until
something is up) and :class:`LiveServer` (the app under uvicorn on a loopback port, in this
process), :func:`smart_world` / :func:`backend_token` (the whole server with real SMART
tokens). ``free_port`` is conftest's."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from argon2 import PasswordHasher
from conftest import free_port
from fastapi import FastAPI
from fastapi.testclient import TestClient
from smart.kit import AUTH, BASE, World
from starlette.requests import Request

from fhir_consent.app import create_app
from fhir_consent.auth import AccessContext
from fhir_consent.config import Settings
from fhir_consent.documents import DocumentSettings
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.store.db import Database
from smart_on_fhir import users as users_module
from smart_on_fhir.client_auth import ASSERTION_TYPE, sign_client_assertion
from smart_on_fhir.keys import KeySet, SigningKey
from smart_on_fhir.scopes import parse_scopes

__all__ = [
    "Caller",
    "LiveServer",
    "backend_token",
    "free_port",
    "smart_world",
    "wait_for",
    "wait_port",
]


class Caller:
    """Switch who the app thinks is calling."""

    def __init__(self) -> None:
        self.access = AccessContext(scopes=None)

    async def __call__(self, _request: Request) -> AccessContext:
        return self.access

    def patient(self, pid: str, scopes: str = "patient/*.cruds") -> None:
        self.access = AccessContext(
            scopes=parse_scopes(scopes), patient=pid, fhir_user=f"Patient/{pid}", subject="u1"
        )

    def user(self, scopes: str) -> None:
        self.access = AccessContext(scopes=parse_scopes(scopes), fhir_user="Practitioner/x")

    def open(self) -> None:
        self.access = AccessContext(scopes=None)


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    """Wait until something listens on loopback ``port``; fail early when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}") from None
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def wait_for(check: Callable[[], Any], timeout: float = 30, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something true (returned), else TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


class LiveServer:
    """The app served by uvicorn on a loopback port, in this process (real HTTP, real
    concurrency; an injected authenticator still applies; the app's lifespan is not run:
    a TestClient the caller holds runs it)."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


# -- the whole server with real SMART tokens over real HTTP ---------------------------------


def every_layer(tmp_path: Path) -> dict[str, Any]:
    """``create_app`` keyword arguments for the ledger and the document store (db blobs),
    their keys under ``tmp_path``: the whole server, as deployed."""
    return {
        "ledger": LedgerSettings(_env_file=None, keys_dir=str(tmp_path / "ledger")),  # type: ignore[call-arg]
        "documents": DocumentSettings(
            _env_file=None,  # type: ignore[call-arg]
            master_key_file=tmp_path / "master-keys.json",
            blob_backend="db",
        ),
    }


@contextmanager
def smart_world(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **layers: Any
) -> Iterator[tuple[World, LiveServer, FastAPI]]:
    """The server's own application (``create_app`` with ``layers``) with SMART on, in a
    TestClient (``World.http``) and under uvicorn (the :class:`LiveServer`), plus an
    open-access twin on the same database for seeding (``World.seed``). Password hashing is
    made cheap for the logins."""
    cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    monkeypatch.setattr(users_module, "_hasher", lambda: cheap)
    keys = tmp_path / "keys"
    KeySet.generate().save(keys)
    settings = Settings(
        database_url=db_url,
        auto_migrate=False,
        db_pool_size=4,
        smart_keys_dir=str(keys),
        public_base_url=f"{BASE}/fhir",  # token audience, whichever host serves the request
    )
    app = create_app(settings, **layers)
    seed_app = create_app(settings.model_copy(update={"open_access": True}), **layers)
    db = Database(db_url, pool_size=2)
    try:
        with TestClient(app, base_url=BASE) as http, TestClient(seed_app, base_url=BASE) as seed:
            with LiveServer(app) as live:
                yield World(http=http, seed=seed, db=db), live, app
    finally:
        db.dispose()


def backend_token(world: World, key: SigningKey, organization: str, scope: str) -> str:
    """A SMART backend-services token for an Organization's system (client credentials)."""
    created = world.add_client(
        "confidential-asymmetric",
        scope=scope,
        redirect_uris=(),
        organization=organization,
        client_name=f"{organization} system",
        jwks={"keys": [dict(key.as_dict(private=False))]},
    )
    cid = created.client.client_id
    assertion = sign_client_assertion(key, client_id=cid, token_url=f"{AUTH}/token")
    r = world.http.post(
        f"{AUTH}/token",
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
    )
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token
