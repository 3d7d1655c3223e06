"""Helpers for the SMART tests: a driver for the real login and consent pages, provisioning
through the service functions the CLI uses, and a real uvicorn server."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from fastapi.testclient import TestClient

from fhir_consent.store.db import Database
from smart_on_fhir.clients import NewClient, create_client
from smart_on_fhir.launches import LaunchContext, create_launch
from smart_on_fhir.users import User, create_user


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


BASE = "https://testserver"
FHIR = f"{BASE}/fhir"
AUTH = f"{BASE}/auth"
REDIRECT = "https://app.example.org/callback"
APP_ORIGIN = "https://app.example.org"
PASSWORD = "correct horse battery"
FHIR_JSON = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}
PATIENT_SCOPES = "openid fhirUser launch/patient offline_access patient/*.rs"


def pkce_pair() -> tuple[str, str]:
    """A fresh ``(code_verifier, S256 code_challenge)`` (RFC 7636 §4.1-4.2)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass
class Flow:
    """The result of driving the authorization pages: the final redirect."""

    location: str
    verifier: str
    state: str

    @property
    def params(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.location).query).items()}

    @property
    def code(self) -> str:
        return self.params["code"]


_TXN = re.compile(r'name="txn" value="([^"]+)"')
_SCOPE = re.compile(r'name="scope" value="([^"]+)"')
_PATIENT = re.compile(r'name="patient" value="([^"]+)"')


def drive_pages(
    http: httpx.Client,
    response: httpx.Response,
    *,
    username: str,
    password: str = PASSWORD,
    patient: str | None = None,
    untick: Sequence[str] = (),
    deny: bool = False,
) -> httpx.Response:
    """Follow ``/authorize``'s redirect through login, picker and consent like a browser;
    returns the response that redirects back to the app (not followed)."""
    for _ in range(10):
        if response.status_code in (302, 303):
            location = response.headers["location"]
            if "/auth/interact" not in location:
                return response
            response = http.get(location, follow_redirects=False)
            continue
        assert response.status_code == 200, (response.status_code, response.text[:500])
        page = response.text
        txn = _TXN.search(page)
        assert txn is not None, page[:500]
        action = str(response.url).split("?")[0]
        if 'value="login"' in page:
            data: dict[str, Any] = {"step": "login", "username": username, "password": password}
        elif 'value="patient"' in page:
            choices = _PATIENT.findall(page)
            data = {"step": "patient", "patient": patient or choices[0]}
        else:
            scopes = [s for s in _SCOPE.findall(page) if s not in untick]
            data = {"step": "consent", "decision": "deny" if deny else "allow", "scope": scopes}
        data["txn"] = txn[1]
        response = http.post(action, data=data, follow_redirects=False)
    raise AssertionError("the authorization pages did not finish")


@dataclass
class World:
    """An app with SMART on, plus helpers to provision and to authorize."""

    http: TestClient
    seed: TestClient  # the same database, open access: for test data only
    db: Database
    fhir: str = FHIR
    auth: str = AUTH
    users: dict[str, User] = field(default_factory=dict)

    def now(self) -> int:
        return int(time.time())

    # -- provisioning ---------------------------------------------------------------------

    def add_patient(self, family: str = "Chalmers", given: str = "Peter", **extra: Any) -> str:
        body = {"resourceType": "Patient", "name": [{"family": family, "given": [given]}], **extra}
        r = self.seed.post("/fhir/Patient", json=body, headers=FHIR_JSON)
        assert r.status_code == 201, r.text
        rid: str = r.json()["id"]
        return rid

    def add_resource(self, body: dict[str, Any]) -> str:
        r = self.seed.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR_JSON)
        assert r.status_code == 201, r.text
        rid: str = r.json()["id"]
        return rid

    def add_user(self, username: str, fhir_user: str | None, password: str = PASSWORD) -> User:
        with self.db.write() as conn:
            user = create_user(conn, username, password, fhir_user=fhir_user, now=self.now())
        self.users[username] = user
        return user

    def add_client(
        self,
        client_type: str = "public",
        *,
        scope: str = PATIENT_SCOPES + " user/*.rs launch",
        redirect_uris: Sequence[str] = (REDIRECT,),
        **kwargs: Any,
    ) -> NewClient:
        with self.db.write() as conn:
            return create_client(
                conn,
                client_name=kwargs.pop("client_name", "Test app"),
                client_type=client_type,
                redirect_uris=redirect_uris,
                scope=scope,
                now=self.now(),
                **kwargs,
            )

    def add_launch(self, **kwargs: Any) -> LaunchContext:
        with self.db.write() as conn:
            return create_launch(conn, now=self.now(), **kwargs)

    # -- the authorization code flow ------------------------------------------------------

    def authorize_params(
        self, client_id: str, /, *, scope: str = PATIENT_SCOPES, **overrides: Any
    ) -> tuple[dict[str, str], str]:
        verifier, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "scope": scope,
            "state": secrets.token_hex(8),
            "aud": self.fhir,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        params.update({k: v for k, v in overrides.items() if v is not None})
        for k in [k for k, v in overrides.items() if v is None]:
            params.pop(k, None)
        return params, verifier

    def authorize(
        self,
        client_id: str,
        /,
        *,
        username: str,
        scope: str = PATIENT_SCOPES,
        post: bool = False,
        patient: str | None = None,
        untick: Sequence[str] = (),
        deny: bool = False,
        **overrides: Any,
    ) -> Flow:
        """``/authorize`` → login → (picker) → consent → the redirect back to the app."""
        params, verifier = self.authorize_params(client_id, scope=scope, **overrides)
        if post:
            first = self.http.post(f"{self.auth}/authorize", data=params, follow_redirects=False)
        else:
            first = self.http.get(
                f"{self.auth}/authorize?{urlencode(params)}", follow_redirects=False
            )
        last = drive_pages(
            self.http, first, username=username, patient=patient, untick=untick, deny=deny
        )
        assert last.status_code in (302, 303), last.text[:300]
        return Flow(last.headers["location"], verifier, params["state"])

    def exchange(
        self,
        client_id: str,
        flow: Flow,
        /,
        *,
        secret: str | None = None,
        **overrides: Any,
    ) -> httpx.Response:
        data = {
            "grant_type": "authorization_code",
            "code": flow.code,
            "redirect_uri": REDIRECT,
            "code_verifier": flow.verifier,
            "client_id": client_id,
        }
        data.update({k: v for k, v in overrides.items() if v is not None})
        for k in [k for k, v in overrides.items() if v is None]:
            data.pop(k, None)
        auth = (client_id, secret) if secret else None
        return self.http.post(f"{self.auth}/token", data=data, auth=auth)

    def token(self, client_id: str, *, username: str, **kwargs: Any) -> dict[str, Any]:
        """A complete standalone launch for a public client; the token response."""
        flow = self.authorize(client_id, username=username, **kwargs)
        r = self.exchange(client_id, flow)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def get(self, path: str, token: str | None, **kwargs: Any) -> httpx.Response:
        headers = {"accept": "application/fhir+json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        headers.update(kwargs.pop("headers", {}))
        return self.http.get(f"{self.fhir}/{path}", headers=headers, **kwargs)


def start_server(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A real uvicorn server on a loopback port; returns the process and its origin."""
    port = free_port()
    log = log_path.open("wb")
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
            "--log-level",
            "warning",
        ],
        env={**os.environ, **env},
        cwd=log_path.parent,  # the server's default key files land there, not in the repo
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log_path.read_text()) from None
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")
