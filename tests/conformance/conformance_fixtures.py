"""Fixtures for running ``python -m conformance`` against our whole server
(``fhir_consent.main:app`` = ``create_app``) on a loopback port, on SQLite and PostgreSQL:
open access for the REST section, SMART on (real clients, real tokens) for the consent and
SMART sections.

This directory has no ``__init__.py`` on purpose (a package named ``conformance`` here would
shadow the kit itself), and no ``conftest.py`` (its module name would clash with the suite's
``conftest``, which other test modules import): the test modules import these fixtures.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from smart.kit import PASSWORD, REDIRECT, drive_pages, free_port, pkce_pair

from fhir_consent.app import create_core_app
from fhir_consent.config import Settings
from fhir_consent.store.db import Database
from smart_on_fhir import users as users_module
from smart_on_fhir.clients import create_client
from smart_on_fhir.keys import KeySet, generate_signing_key
from smart_on_fhir.users import create_user

HERE = Path(__file__).parent
FHIR_JSON = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}
PATIENT_SCOPE = "openid fhirUser launch/patient patient/*.cruds"


@pytest.fixture(autouse=True, scope="session")
def cheap_argon2() -> Iterator[None]:
    """Test-sized argon2 costs for the users this process creates (the server verifies with
    the parameters stored in each hash)."""
    cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(users_module, "_hasher", lambda: cheap)
        yield


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conformance") / "smart-keys"
    KeySet.generate().save(path)
    return path


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def serve(
    env: dict[str, str], tmp_path: Path, module: str = "fhir_consent.main:app"
) -> tuple[subprocess.Popen[bytes], str]:
    """Our server in a subprocess (cwd ``tmp_path``: its key files land there)."""
    run = tmp_path / f"server-{uuid.uuid4().hex[:6]}"
    run.mkdir()
    extra = {"FHIR_CONSENT_AUTO_MIGRATE": "false"}
    if module != "fhir_consent.main:app":
        extra["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
        )
    return _start(module, {**extra, **env}, run / "server.log")


def _start(module: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """uvicorn ``module`` on a free loopback port; (process, origin) once it accepts."""
    port = free_port()
    out = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1", "--port", str(port)]
        + ["--log-level", "warning"],
        env={**os.environ, **env},
        cwd=log.parent,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture
def open_server(db_url: str, tmp_path: Path, keys_dir: Path) -> Iterator[str]:
    """The whole server with open access (development mode); yields the FHIR base."""
    proc, origin = serve(
        {
            "FHIR_CONSENT_DATABASE_URL": db_url,
            "FHIR_CONSENT_OPEN_ACCESS": "true",
            "FHIR_CONSENT_SMART_KEYS_DIR": str(keys_dir),
        },
        tmp_path,
    )
    try:
        yield f"{origin}/fhir"
    finally:
        stop(proc)


@dataclass
class Smart:
    """Our whole server with SMART on, and what a hospital's admin provisions for the kit."""

    origin: str
    db: Database
    seed: TestClient  # the same database with open access: test data only
    tmp: Path

    @property
    def base(self) -> str:
        return f"{self.origin}/fhir"

    def now(self) -> int:
        return int(time.time())

    def add(self, resource: dict[str, Any]) -> str:
        r = self.seed.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR_JSON)
        assert r.status_code == 201, r.text
        return f"{resource['resourceType']}/{r.json()['id']}"

    def user(self, fhir_user: str) -> str:
        name = f"u{secrets.token_hex(4)}"
        with self.db.write() as conn:
            create_user(conn, name, PASSWORD, fhir_user=fhir_user, now=self.now())
        return name

    def app_client(self, scope: str = PATIENT_SCOPE) -> str:
        with self.db.write() as conn:
            new = create_client(
                conn,
                client_name="conformance app",
                client_type="public",
                redirect_uris=(REDIRECT,),
                scope=scope,
                now=self.now(),
            )
        return new.client.client_id

    def backend_client(
        self, scope: str, organization: str | None = None, alg: str = "ES384"
    ) -> tuple[str, Path]:
        """A backend-services client that generated its own key; (client id, key file)."""
        key = generate_signing_key(alg)
        with self.db.write() as conn:
            new = create_client(
                conn,
                client_name="conformance backend",
                client_type="confidential-asymmetric",
                scope=scope,
                now=self.now(),
                jwks={"keys": [dict(key.as_dict(private=False))]},
                organization=organization,
            )
        path = self.tmp / f"{new.client.client_id[:12]}.jwk.json"
        path.write_text(json.dumps(dict(key.as_dict(private=True))))
        path.chmod(0o600)
        return new.client.client_id, path

    def patient_token(self, username: str, client_id: str, scope: str = PATIENT_SCOPE) -> str:
        """A standalone launch through the real login and consent pages, over HTTP."""
        verifier, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "scope": scope,
            "state": secrets.token_hex(8),
            "aud": self.base,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        with httpx.Client(timeout=20) as browser:
            first = browser.get(
                f"{self.origin}/auth/authorize?{urlencode(params)}", follow_redirects=False
            )
            last = drive_pages(browser, first, username=username)
            code = parse_qs(urlsplit(last.headers["location"]).query)["code"][0]
            r = browser.post(
                f"{self.origin}/auth/token",
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": REDIRECT,
                    "code_verifier": verifier,
                    "client_id": client_id,
                },
            )
        assert r.status_code == 200, r.text
        token: str = r.json()["access_token"]
        return token

    def consent_credentials(self) -> Path:
        """A patient with a login and a token, a clinic Organization with its backend
        client: the credentials file of the consent section."""
        patient = self.add({"resourceType": "Patient", "name": [{"family": "Conformance"}]})
        clinic = self.add({"resourceType": "Organization", "name": "Conformance clinic"})
        token = self.patient_token(self.user(patient), self.app_client())
        client_id, key = self.backend_client("system/*.cruds", organization=clinic)
        path = self.tmp / "credentials.json"
        path.write_text(
            json.dumps(
                {
                    "patient": {"token": token, "reference": patient},
                    "clinic": {
                        "client_id": client_id,
                        "key": key.name,
                        "organization": clinic,
                        "scope": "system/*.cruds",
                    },
                }
            )
        )
        return path


def smart_env(db_url: str, keys_dir: Path, open_access: bool = False) -> dict[str, str]:
    return {
        "FHIR_CONSENT_DATABASE_URL": db_url,
        "FHIR_CONSENT_OPEN_ACCESS": "true" if open_access else "false",
        "FHIR_CONSENT_SMART_KEYS_DIR": str(keys_dir),
    }


def smart_world(
    db_url: str, keys_dir: Path, tmp_path: Path, *, module: str = "fhir_consent.main:app",
    open_access: bool = False,
) -> Iterator[Smart]:  # fmt: skip
    settings = Settings(
        database_url=db_url,
        auto_migrate=False,
        db_pool_size=2,
        smart_keys_dir=str(keys_dir),
        open_access=True,
    )
    proc, origin = serve(smart_env(db_url, keys_dir, open_access), tmp_path, module)
    db = Database(db_url, pool_size=2)
    try:
        with TestClient(create_core_app(settings), base_url="https://testserver") as seed:
            yield Smart(origin, db, seed, tmp_path)
    finally:
        db.dispose()
        stop(proc)


@pytest.fixture
def smart(db_url: str, keys_dir: Path, tmp_path: Path) -> Iterator[Smart]:
    """The whole server with SMART on (the default)."""
    yield from smart_world(db_url, keys_dir, tmp_path)
