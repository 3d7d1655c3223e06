"""fhir-consent mounted inside a host FastAPI app (issue 9, scope 1; docs/mounting.md).

The host app is the documented example, ``docs/examples/host_app.py``, run by uvicorn in a
subprocess on loopback. Two layouts: mounted at ``/ehr`` (FHIR base ``/ehr/fhir``, auth
``/ehr/auth``) and mounted at ``/ehr/fhir`` itself (``fhir_path`` empty: auth at
``/ehr/fhir/auth``). Through the mount, a patient signs in on the real login and consent pages
(authorization code + PKCE) and a clinic system gets a backend-services token; both read and
search. Every URL in every response that points at this server must point under the mount.
Then ``X-Forwarded-*``: honoured from the trusted proxy (connections from 127.0.0.2), ignored
from anyone else.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from conftest import FHIR_JSON, free_port, load_example
from fastapi.testclient import TestClient
from smart.kit import drive_pages, pkce_pair

from fhir_consent import create_app
from fhir_consent.config import Settings
from fhir_consent.store.db import Database
from fhir_consent.store.tables import metadata as store_metadata
from smart_on_fhir import users as users_module
from smart_on_fhir.client_auth import ASSERTION_TYPE, sign_client_assertion
from smart_on_fhir.clients import create_client
from smart_on_fhir.keys import KeySet, SigningKey, generate_signing_key
from smart_on_fhir.tables import metadata as smart_metadata
from smart_on_fhir.users import create_user

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
PASSWORD = "correct horse battery"
REDIRECT = "https://app.example.org/callback"
PATIENT_SCOPES = "openid fhirUser launch/patient patient/*.cruds"
PROXY = "127.0.0.2"  # the trusted reverse proxy's address (any 127/8 address is loopback)
LOINC = "http://loinc.org"
ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

#: layout name → (mount point in the host app, fhir_path inside our app, auth base path)
LAYOUTS = {
    "mount-ehr": ("/ehr", "/fhir", "/ehr/auth"),
    "mount-ehr-fhir": ("/ehr/fhir", "", "/ehr/fhir/auth"),
}


@dataclass
class Mounted:
    origin: str  # http://127.0.0.1:PORT
    fhir: str  # the FHIR base through the mount
    auth: str  # the authorization server through the mount
    app: str  # the patient app through the mount
    mount: str
    client_id: str  # the public app
    backend_id: str  # the clinic system (backend services)
    backend_key: SigningKey


def empty_smart_tables(db_url: str) -> None:
    """The authorization server's tables are not the store's: the shared PostgreSQL schema
    keeps them between tests unless emptied (SQLite databases are fresh copies)."""
    if db_url.startswith("postgresql"):
        engine = sa.create_engine(db_url, poolclass=sa.NullPool)
        with engine.begin() as conn:
            for table in reversed(smart_metadata.sorted_tables):
                conn.execute(table.delete())
        engine.dispose()


def _wait(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.05)
    raise RuntimeError("the host app did not start")


def _grant(patient: str, organization: str) -> dict[str, Any]:
    """An active Consent: ``patient`` lets ``organization`` access their records."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "policyRule": {"coding": [{"system": ACTCODE, "code": "OPTOUT"}]},
        "provision": {
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
                    "reference": {"reference": organization},
                }
            ],
            "action": [{"coding": [{"system": ACTION, "code": "access"}]}],
        },
    }


def _seed(settings: Settings) -> None:
    """Data through the API of an open-access app on the same database (the consent index
    and the ledger see every write)."""
    app = create_app(settings.model_copy(update={"open_access": True}))
    with TestClient(app, base_url="https://seed.test") as c:

        def put(resource: dict[str, Any]) -> None:
            r = c.put(
                f"/fhir/{resource['resourceType']}/{resource['id']}",
                json=resource,
                headers=FHIR_JSON,
            )
            assert r.status_code in (200, 201), r.text

        put(load_example("Patient-example"))
        put({"resourceType": "Organization", "id": "clinic", "name": "Clinic One"})
        for i in range(3):
            put(
                {
                    "resourceType": "DocumentReference",
                    "id": f"doc-{i}",
                    "status": "current",
                    "subject": {"reference": "Patient/example"},
                    "date": f"2024-0{i + 1}-01T10:00:00Z",
                    "content": [{"attachment": {"contentType": "text/plain"}}],
                }
            )
        r = c.post(
            "/fhir/Consent",
            json=_grant("Patient/example", "Organization/clinic"),
            headers=FHIR_JSON,
        )
        assert r.status_code == 201, r.text


def _fresh_database(backend: str, tmp_path: Path, template: Path, pg_url: str | None) -> str:
    """A migrated, empty database of ``backend`` for one mounted server."""
    if backend == "sqlite":
        path = tmp_path / "db.sqlite3"
        shutil.copy(template, path)
        return f"sqlite:///{path}"
    if pg_url is None:
        pytest.skip("PostgreSQL not reachable")
    engine = sa.create_engine(pg_url, poolclass=sa.NullPool)
    names = ", ".join(f'"{t.name}"' for t in store_metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()
    empty_smart_tables(pg_url)
    return pg_url


#: one mounted server per layout and backend, shared by the module's tests (they only add)
SERVERS = [(layout, backend) for layout in sorted(LAYOUTS) for backend in ("sqlite", "postgresql")]


@pytest.fixture(scope="module", params=SERVERS, ids=[f"{a}-{b}" for a, b in SERVERS])
def mounted(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sqlite_template: Path,
    pg_url: str | None,
) -> Iterator[Mounted]:
    layout, backend = request.param
    mount, fhir_path, auth_path = LAYOUTS[layout]
    tmp_path = tmp_path_factory.mktemp(f"{layout}-{backend}")
    db_url = _fresh_database(backend, tmp_path, sqlite_template, pg_url)
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _serve_mounted(monkeypatch, tmp_path, db_url, mount, fhir_path, auth_path)


def _serve_mounted(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    db_url: str,
    mount: str,
    fhir_path: str,
    auth_path: str,
) -> Iterator[Mounted]:
    monkeypatch.chdir(tmp_path)  # default key files (ledger, documents) land here
    cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    monkeypatch.setattr(users_module, "_hasher", lambda: cheap)
    keys = tmp_path / "keys" / "smart"
    KeySet.generate().save(keys)
    settings = Settings(
        database_url=db_url, auto_migrate=False, db_pool_size=2, smart_keys_dir=str(keys)
    )
    _seed(settings)
    backend_key = generate_signing_key("ES384")
    now = int(time.time())
    db = Database(db_url, pool_size=1)
    try:
        with db.write() as conn:
            create_user(conn, "peter", PASSWORD, fhir_user="Patient/example", now=now)
            app_client = create_client(
                conn,
                client_name="Patient app",
                client_type="public",
                redirect_uris=[REDIRECT],
                scope=PATIENT_SCOPES,
                now=now,
            )
            backend = create_client(
                conn,
                client_name="Clinic system",
                client_type="confidential-asymmetric",
                scope="system/*.rs",
                jwks={"keys": [dict(backend_key.as_dict(private=False))]},
                organization="Organization/clinic",
                now=now,
            )
    finally:
        db.dispose()
    port = free_port()
    log = tmp_path / "host.log"
    env = {
        **os.environ,
        "FHIR_CONSENT_DATABASE_URL": db_url,
        "FHIR_CONSENT_AUTO_MIGRATE": "false",
        "FHIR_CONSENT_SMART_KEYS_DIR": str(keys),
        "FHIR_CONSENT_FHIR_PATH": fhir_path,
        "FHIR_CONSENT_TRUSTED_PROXIES": json.dumps([PROXY]),
        "FHIR_CONSENT_DB_POOL_SIZE": "4",
        "EHR_MOUNT": mount,
    }
    env.pop("FHIR_CONSENT_OPEN_ACCESS", None)
    env.pop("FHIR_CONSENT_PUBLIC_BASE_URL", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "host_app:build",
                "--factory",
                "--app-dir",
                str(EXAMPLES),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-proxy-headers",
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait(port, proc, log)
        origin = f"http://127.0.0.1:{port}"
        fhir = origin + mount + fhir_path
        yield Mounted(
            origin=origin,
            fhir=fhir,
            auth=origin + auth_path,
            app=origin + mount + "/app",
            mount=mount,
            client_id=app_client.client.client_id,
            backend_id=backend.client.client_id,
            backend_key=backend_key,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- helpers ----------------------------------------------------------------------------------


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def assert_under(body: Any, host: str, prefix: str) -> int:
    """Every string in ``body`` that names ``host`` is ``prefix`` (without its final slash)
    or starts with it; returns how many there were (so a caller can insist on some)."""
    ours = [s for s in _strings(body) if host in s]
    wrong = [s for s in ours if not (s.startswith(prefix) or s == prefix.rstrip("/"))]
    assert not wrong, wrong
    return len(ours)


def _claims(jwt: str) -> dict[str, Any]:
    part = jwt.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "accept": "application/fhir+json"}


def _backend_token(
    http: httpx.Client, m: Mounted, token_url: str, aud: str | None = None
) -> httpx.Response:
    assertion = sign_client_assertion(
        m.backend_key, client_id=m.backend_id, token_url=aud or token_url
    )
    return http.post(
        token_url,
        data={
            "grant_type": "client_credentials",
            "scope": "system/*.rs",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
    )


# -- the SMART flow and reads through the mount -----------------------------------------------


def test_smart_login_and_reads_through_the_mount(mounted: Mounted) -> None:
    m = mounted
    host = urlsplit(m.origin).netloc
    prefix = m.origin + m.mount + "/"
    with httpx.Client(timeout=20) as http:
        # discovery: every endpoint is under the mount
        smart = http.get(f"{m.fhir}/.well-known/smart-configuration").json()
        assert smart["authorization_endpoint"] == f"{m.auth}/authorize"
        assert smart["token_endpoint"] == f"{m.auth}/token"
        assert smart["issuer"] == m.fhir
        assert assert_under(smart, host, prefix) >= 6
        oidc = http.get(f"{m.fhir}/.well-known/openid-configuration").json()
        assert oidc["issuer"] == m.fhir
        assert oidc["jwks_uri"] == f"{m.auth}/jwks"
        assert_under(oidc, host, prefix)
        meta = http.get(f"{m.fhir}/metadata", headers={"accept": "application/fhir+json"})
        assert meta.status_code == 200
        statement = meta.json()
        assert statement["implementation"]["url"] == m.fhir
        uris = {
            e["url"]: e["valueUri"]
            for e in statement["rest"][0]["security"]["extension"][0]["extension"]
        }
        assert uris["authorize"] == f"{m.auth}/authorize"
        assert uris["token"] == f"{m.auth}/token"
        assert_under(statement, host, prefix)
        assert http.get(f"{m.auth}/jwks").json()["keys"]

        # the patient signs in on the real pages: authorization code + PKCE
        verifier, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": m.client_id,
            "redirect_uri": REDIRECT,
            "scope": PATIENT_SCOPES,
            "state": "st-1",
            "aud": m.fhir,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        first = http.get(f"{smart['authorization_endpoint']}?{urlencode(params)}")
        assert first.status_code == 303, first.text[:300]
        assert first.headers["location"].startswith(f"{m.auth}/interact?")
        cookie = first.headers["set-cookie"].lower()
        assert f"path={urlsplit(m.auth).path.lower()}" in cookie, cookie
        login = http.get(first.headers["location"])
        assert f'action="{m.auth}/interact"' in login.text
        last = drive_pages(http, first, username="peter", password=PASSWORD)
        assert last.headers["location"].startswith(REDIRECT)
        code = parse_qs(urlsplit(last.headers["location"]).query)["code"][0]
        r = http.post(
            smart["token_endpoint"],
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT,
                "code_verifier": verifier,
                "client_id": m.client_id,
            },
        )
        assert r.status_code == 200, r.text
        tokens = r.json()
        access = _claims(tokens["access_token"])
        assert access["aud"] == m.fhir
        assert access["iss"] == m.fhir
        assert access["fhirUser"] == f"{m.fhir}/Patient/example"
        assert _claims(tokens["id_token"])["iss"] == m.fhir
        token = tokens["access_token"]

        # reads, searches, history and a create through the mount
        r = http.get(f"{m.fhir}/Patient/example", headers=_bearer(token))
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "example"
        r = http.get(
            f"{m.fhir}/DocumentReference",
            params={"patient": "example", "_count": "2"},
            headers=_bearer(token),
        )
        assert r.status_code == 200, r.text
        page = r.json()
        assert {e["relation"] for e in page["link"]} >= {"self", "next"}
        assert [e["fullUrl"] for e in page["entry"]] == [
            f"{m.fhir}/DocumentReference/{e['resource']['id']}" for e in page["entry"]
        ]
        assert assert_under(page, host, m.fhir + "/") >= 4
        nxt = next(x["url"] for x in page["link"] if x["relation"] == "next")
        r = http.get(nxt, headers=_bearer(token))
        assert r.status_code == 200, r.text
        assert len(r.json()["entry"]) == 1
        assert_under(r.json(), host, m.fhir + "/")
        r = http.get(f"{m.fhir}/Patient/example/_history", headers=_bearer(token))
        assert r.status_code == 200, r.text
        assert assert_under(r.json(), host, m.fhir + "/") >= 2
        consent = _grant("Patient/example", "Organization/clinic")
        r = http.post(
            f"{m.fhir}/Consent",
            json=consent,
            headers={**_bearer(token), "content-type": "application/fhir+json"},
        )
        assert r.status_code == 201, r.text
        assert r.headers["location"].startswith(f"{m.fhir}/Consent/")

        # the patient app's links
        r = http.get(m.app)
        assert r.status_code == 308
        assert r.headers["location"] == urlsplit(m.app).path + "/"
        config = http.get(f"{m.app}/config.json").json()
        assert config["fhirBase"] == m.fhir
        assert http.get(f"{m.app}/").status_code == 200


def test_backend_services_through_the_mount(mounted: Mounted) -> None:
    m = mounted
    host = urlsplit(m.origin).netloc
    with httpx.Client(timeout=20) as http:
        token_url = http.get(f"{m.fhir}/.well-known/smart-configuration").json()["token_endpoint"]
        assert token_url == f"{m.auth}/token"
        # an assertion for the un-mounted token URL is for another server: refused
        wrong = _backend_token(http, m, token_url, aud=f"{m.origin}/auth/token")
        assert wrong.status_code in (400, 401), wrong.text
        assert wrong.json()["error"] == "invalid_client"
        r = _backend_token(http, m, token_url)
        assert r.status_code == 200, r.text
        token = r.json()["access_token"]
        assert _claims(token)["aud"] == m.fhir
        # the clinic reads what the patient granted it, through the mount
        r = http.get(
            f"{m.fhir}/DocumentReference", params={"patient": "example"}, headers=_bearer(token)
        )
        assert r.status_code == 200, r.text
        bundle = r.json()
        assert {e["resource"]["id"] for e in bundle["entry"]} == {"doc-0", "doc-1", "doc-2"}
        assert assert_under(bundle, host, m.fhir + "/") >= 4
        r = http.get(f"{m.fhir}/Organization/clinic", headers=_bearer(token))
        assert r.status_code == 200, r.text
        # the same path without the mount is not ours: the host app answers 404
        assert http.get(f"{m.origin}/fhir/metadata").status_code == 404


# -- X-Forwarded-* from the trusted proxy only ------------------------------------------------


FORWARDED = {
    "x-forwarded-proto": "https",
    "x-forwarded-host": "portal.hospital.example",
    "x-forwarded-prefix": "/records",
}


def test_forwarded_headers_only_from_trusted_proxies(mounted: Mounted) -> None:
    m = mounted
    public = "https://portal.hospital.example/records" + m.mount
    public_fhir = "https://portal.hospital.example/records" + urlsplit(m.fhir).path
    public_auth = "https://portal.hospital.example/records" + urlsplit(m.auth).path
    proxy = httpx.Client(transport=httpx.HTTPTransport(local_address=PROXY), timeout=20)
    with httpx.Client(timeout=20) as direct, proxy:
        # anyone else: the headers are ignored
        meta = direct.get(f"{m.fhir}/metadata", headers=FORWARDED).json()
        assert meta["implementation"]["url"] == m.fhir
        smart = direct.get(f"{m.fhir}/.well-known/smart-configuration", headers=FORWARDED).json()
        assert smart["token_endpoint"] == f"{m.auth}/token"
        assert "portal.hospital.example" not in json.dumps(smart)

        # the trusted proxy: its view of the public URL is everyone's
        meta = proxy.get(f"{m.fhir}/metadata", headers=FORWARDED).json()
        assert meta["implementation"]["url"] == public_fhir
        smart = proxy.get(f"{m.fhir}/.well-known/smart-configuration", headers=FORWARDED).json()
        assert smart["token_endpoint"] == f"{public_auth}/token"
        assert smart["issuer"] == public_fhir
        assert assert_under(smart, "portal.hospital.example", public + "/") >= 6
        assert m.origin not in json.dumps(smart)

        # a backend-services token through the proxy: its aud and iss are the public base
        r = proxy.post(
            f"{m.auth}/token",
            headers=FORWARDED,
            data={
                "grant_type": "client_credentials",
                "scope": "system/*.rs",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": sign_client_assertion(
                    m.backend_key, client_id=m.backend_id, token_url=f"{public_auth}/token"
                ),
            },
        )
        assert r.status_code == 200, r.text
        token = r.json()["access_token"]
        assert _claims(token)["aud"] == public_fhir
        assert _claims(token)["iss"] == public_fhir
        r = proxy.get(
            f"{m.fhir}/DocumentReference",
            params={"patient": "example", "_count": "2"},
            headers={**_bearer(token), **FORWARDED},
        )
        assert r.status_code == 200, r.text
        bundle = r.json()
        assert assert_under(bundle, "portal.hospital.example", public_fhir + "/") >= 4
        assert m.origin not in json.dumps(bundle)
        # the token is for the public base: presented directly (another base), it is refused
        r = direct.get(f"{m.fhir}/DocumentReference", headers=_bearer(token))
        assert r.status_code == 401
        # and a forged X-Forwarded-Host from a non-proxy cannot make it valid
        r = direct.get(f"{m.fhir}/DocumentReference", headers={**_bearer(token), **FORWARDED})
        assert r.status_code == 401

        # the patient app behind the proxy
        r = proxy.get(f"{m.app}", headers=FORWARDED)
        assert r.headers["location"] == "/records" + urlsplit(m.app).path + "/"
        assert proxy.get(f"{m.app}/config.json", headers=FORWARDED).json()["fhirBase"] == (
            public_fhir
        )

        # malformed values from the proxy are ignored, not echoed
        bad = {
            "x-forwarded-host": "evil.example/x?y",
            "x-forwarded-prefix": "/../admin",
            "x-forwarded-proto": "gopher",
        }
        meta = proxy.get(f"{m.fhir}/metadata", headers=bad).json()
        assert meta["implementation"]["url"] == m.fhir
