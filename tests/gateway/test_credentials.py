"""The gateway's credentials for a *secured* upstream (issue 9, scope 3: "a SMART
backend-services client of the upstream, or a static bearer token").

The upstream here is our own server with SMART on: nothing without a valid token. The gateway
is registered there as a backend-services client; it discovers the upstream's token endpoint
from its ``.well-known/smart-configuration``, signs an ES384 assertion, and reuses the token
for later calls. A static token file works too; a bad one is a 502, never a leak of the
upstream's answer."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from fhir_consent.app import create_app
from fhir_consent.config import Settings
from fhir_consent.store.db import Database
from fhir_consent.store.migrate import upgrade
from smart_on_fhir.client_auth import ASSERTION_TYPE, sign_client_assertion
from smart_on_fhir.clients import create_client, set_client_active
from smart_on_fhir.keys import KeySet, SigningKey, generate_signing_key

from .gwkit import (
    CLINIC_A,
    FHIR_JSON,
    Clinic,
    Server,
    agent_client,
    audit_events,
    bearer,
    empty_smart_tables,
    examples,
    serve,
    wait_for,
)

ORG = "Organization/hl7"  # an official example: not patient data, so scopes alone decide


@dataclass
class Secured:
    upstream: Server
    url: str  # the upstream's database
    gateway_client: str
    gateway_key: SigningKey
    keys: Path  # the upstream's SMART keys (the gateway has its own)


def _seed_upstream(url: str, keys: Path) -> None:
    app = create_app(
        Settings(database_url=url, auto_migrate=False, open_access=True, smart_keys_dir=str(keys))
    )
    with TestClient(app, base_url="https://seed.test") as c:
        for org in examples(["Organization"]):
            r = c.put(f"/fhir/Organization/{org['id']}", json=org, headers=FHIR_JSON)
            assert r.status_code in (200, 201), r.text


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """One secured upstream for the module (it only serves reads here)."""
    tmp_path = tmp_path_factory.mktemp("secured")
    url = f"sqlite:///{tmp_path / 'upstream.sqlite3'}"
    upgrade(url)
    keys = tmp_path / "upstream-keys"
    KeySet.generate().save(keys)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        _seed_upstream(url, keys)
    key = generate_signing_key("ES384")
    db = Database(url, pool_size=1)
    try:
        with db.write() as conn:
            client = create_client(
                conn,
                client_name="fhir-consent gateway",
                client_type="confidential-asymmetric",
                scope="system/*.rs",
                jwks={"keys": [dict(key.as_dict(private=False))]},
                now=int(time.time()),
            )
    finally:
        db.dispose()
    upstream = serve(
        [],
        {"FHIR_CONSENT_DATABASE_URL": url, "FHIR_CONSENT_SMART_KEYS_DIR": str(keys)},
        tmp_path / "upstream",
        name="upstream",
    )
    try:
        yield Secured(upstream, url, client.client.client_id, key, keys)
    finally:
        upstream.stop()


def _gateway(
    tmp_path: Path, store_url: str, secured: Secured, name: str, *args: str
) -> tuple[Server, Clinic]:
    """A gateway forwarding Organization (plus the defaults) and its clinic A system."""
    empty_smart_tables(store_url)
    keys = tmp_path / f"{name}-keys"
    KeySet.generate().save(keys)
    key = generate_signing_key("ES384")
    db = Database(store_url, pool_size=1)
    try:
        with db.write() as conn:
            created = create_client(
                conn,
                client_name="Clinic A",
                client_type="confidential-asymmetric",
                scope="system/*.rs",
                jwks={"keys": [dict(key.as_dict(private=False))]},
                organization=CLINIC_A,
                now=int(time.time()),
            )
    finally:
        db.dispose()
    server = serve(
        [
            "--upstream",
            secured.upstream.fhir,
            "--database-url",
            store_url,
            "--forward-types",
            "Organization,DocumentReference,Patient",
            *args,
        ],
        {"FHIR_CONSENT_SMART_KEYS_DIR": str(keys)},
        tmp_path / name,
        name=name,
    )
    return server, Clinic(created.client.client_id, key)


def _set_active(url: str, client_id: str, active: bool) -> None:
    db = Database(url, pool_size=1)
    try:
        with db.write() as conn:
            assert set_client_active(conn, client_id, active)
    finally:
        db.dispose()


def _revoke_all(url: str, client_id: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE smart_tokens SET revoked_at = :t WHERE client_id = :c"),
                {"t": int(time.time()), "c": client_id},
            )
    finally:
        engine.dispose()


def _tokens_of(url: str, client_id: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM smart_tokens WHERE client_id = :c"),
                    {"c": client_id},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_backend_services_credentials(secured: Secured, db_url: str, tmp_path: Path) -> None:
    key_file = tmp_path / "gateway-key.json"
    key_file.write_text(json.dumps(dict(secured.gateway_key.as_dict(private=True))))
    key_file.chmod(0o600)
    with httpx.Client(timeout=30) as http:
        # without a token the upstream refuses everything
        r = http.get(f"{secured.upstream.fhir}/{ORG}", headers=FHIR_JSON)
        assert r.status_code == 401
        issued = _tokens_of(secured.url, secured.gateway_client)
        gateway, clinic = _gateway(
            tmp_path,
            db_url,
            secured,
            "gw-backend",
            "--upstream-client-id",
            secured.gateway_client,
            "--upstream-key",
            str(key_file),
        )
        try:
            token = clinic.token(http, f"{gateway.origin}/auth/token")
            for _ in range(3):
                r = http.get(f"{gateway.fhir}/{ORG}", headers=bearer(token))
                assert r.status_code == 200, r.text
                assert r.json()["id"] == "hl7"
            r = http.get(
                f"{gateway.fhir}/Organization", headers=bearer(token), params={"_count": "5"}
            )
            assert r.status_code == 200, r.text
            assert len(r.json()["entry"]) == 5
            # one upstream token served all of those calls
            assert _tokens_of(secured.url, secured.gateway_client) == issued + 1
            # the upstream audited our client, we audited the clinic
            assert wait_for(
                lambda: [
                    e
                    for e in audit_events(secured.url)
                    if agent_client(e) == secured.gateway_client
                ]
            )
            assert wait_for(
                lambda: [
                    e
                    for e in audit_events(db_url)
                    if agent_client(e) == clinic.client_id and "Organization/hl7" in json.dumps(e)
                ]
            )
            # the upstream disables our client: its token stops working, the renewal is
            # refused, and the caller gets a 502 (the upstream's answer is not passed on)
            _set_active(secured.url, secured.gateway_client, False)
            r = http.get(f"{gateway.fhir}/{ORG}", headers=bearer(token))
            assert r.status_code == 502, r.text
            assert r.json()["resourceType"] == "OperationOutcome"
            assert "invalid_client" not in r.text
            _set_active(secured.url, secured.gateway_client, True)
            r = http.get(f"{gateway.fhir}/{ORG}", headers=bearer(token))
            assert r.status_code == 200, r.text  # a fresh token once re-enabled
            assert _tokens_of(secured.url, secured.gateway_client) == issued + 2
        finally:
            _set_active(secured.url, secured.gateway_client, True)
            gateway.stop()


def test_static_token_credentials(secured: Secured, db_url: str, tmp_path: Path) -> None:
    with httpx.Client(timeout=30) as http:
        token_url = http.get(f"{secured.upstream.fhir}/.well-known/smart-configuration").json()[
            "token_endpoint"
        ]
        r = http.post(
            token_url,
            data={
                "grant_type": "client_credentials",
                "scope": "system/*.rs",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": sign_client_assertion(
                    secured.gateway_key, client_id=secured.gateway_client, token_url=token_url
                ),
            },
        )
        assert r.status_code == 200, r.text
        good = tmp_path / "upstream-token"
        good.write_text(r.json()["access_token"] + "\n")
        gateway, clinic = _gateway(
            tmp_path, db_url, secured, "gw-static", "--upstream-token-file", str(good)
        )
        try:
            token = clinic.token(http, f"{gateway.origin}/auth/token")
            r = http.get(f"{gateway.fhir}/{ORG}", headers=bearer(token))
            assert r.status_code == 200, r.text
            # a static token is not renewed: once the upstream revokes it, 502
            _revoke_all(secured.url, secured.gateway_client)
            r = http.get(f"{gateway.fhir}/{ORG}", headers=bearer(token))
            assert r.status_code == 502, r.text
            assert r.json()["resourceType"] == "OperationOutcome"
        finally:
            gateway.stop()


def test_serve_refuses_bad_gateway_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Misconfiguration stops ``serve`` before any worker starts, with a clear message."""
    from unittest import mock

    from fhir_consent.cli import main

    for args, message in (
        (["--upstream", "ftp://ehr.example/fhir"], "upstream"),
        (["--upstream", "https://ehr.example/fhir", "--forward-types", "Consent"], "types"),
        (["--upstream", "https://ehr.example/fhir", "--upstream-client-id", "x"], "key_file"),
        (
            [
                "--upstream",
                "https://ehr.example/fhir",
                "--forward-writes",
                "Patient",
                "--forward-types",
                "DocumentReference",
            ],
            "write_types",
        ),
    ):
        with mock.patch.dict(os.environ, {}, clear=False):
            code = main(
                [
                    "serve",
                    "--port",
                    "1",
                    *args,
                    "--database-url",
                    f"sqlite:///{tmp_path / 'x.sqlite3'}",
                ]
            )
        assert code == 2, args
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.sqlite3").exists()  # refused before migrating anything
