"""RFC 7591 dynamic client registration, as SMART apps use it."""

from __future__ import annotations

from fastapi.testclient import TestClient
from pydantic import SecretStr

from fhir_consent.app import create_core_app
from fhir_consent.config import Settings
from smart_on_fhir.keys import generate_signing_key
from smart_on_fhir.users import User

from .kit import AUTH, REDIRECT, World


def test_register_a_public_app_and_use_it(world: World, peter: tuple[str, User]) -> None:
    pid, _ = peter
    r = world.http.post(
        f"{AUTH}/register",
        json={
            "client_name": "My PHR",
            "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "scope": "launch/patient openid fhirUser offline_access patient/*.rs system/*.*",
        },
    )
    assert r.status_code == 201, r.text
    info = r.json()
    assert "client_secret" not in info
    assert "system/*.*" not in info["scope"].split()  # never system scopes
    body = world.token(info["client_id"], username="peter")
    assert world.get(f"Patient/{pid}", body["access_token"]).status_code == 200


def test_register_symmetric_and_asymmetric(world: World) -> None:
    r = world.http.post(
        f"{AUTH}/register",
        json={"client_name": "Web app", "redirect_uris": [REDIRECT], "scope": "patient/*.rs"},
    )
    assert r.status_code == 201
    assert r.json()["token_endpoint_auth_method"] == "client_secret_basic"
    assert len(r.json()["client_secret"]) >= 32
    key = generate_signing_key("ES384")
    r = world.http.post(
        f"{AUTH}/register",
        json={
            "client_name": "Signed app",
            "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [dict(key.as_dict(private=False))]},
            "scope": "patient/*.rs",
        },
    )
    assert r.status_code == 201, r.text
    assert "client_secret" not in r.json()


def test_registration_refusals(world: World) -> None:
    bad = [
        {
            "redirect_uris": [REDIRECT],
            "grant_types": ["client_credentials"],
            "scope": "system/*.rs",
        },
        {
            "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks_uri": "https://attacker.example/jwks",
        },
        {"redirect_uris": ["http://plain.example/cb"]},
        {"redirect_uris": []},
        {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "client_secret_jwt"},
    ]
    for body in bad:
        r = world.http.post(f"{AUTH}/register", json=body)
        assert r.status_code == 400, body
        assert r.json()["error"] == "invalid_client_metadata", body
    r = world.http.post(
        f"{AUTH}/register", content=b"[1]", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400


def test_registration_with_an_initial_access_token(smart_settings: Settings) -> None:
    settings = smart_settings.model_copy(
        update={"registration_token": SecretStr("s3cret-initial-token")}
    )
    with TestClient(create_core_app(settings), base_url="https://testserver") as http:
        body = {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}
        assert http.post(f"{AUTH}/register", json=body).status_code == 401
        ok = http.post(
            f"{AUTH}/register",
            json=body,
            headers={"authorization": "Bearer s3cret-initial-token"},
        )
        assert ok.status_code == 201


def test_registration_can_be_turned_off(smart_settings: Settings) -> None:
    settings = smart_settings.model_copy(update={"dynamic_registration": False})
    with TestClient(create_core_app(settings), base_url="https://testserver") as http:
        assert http.post(f"{AUTH}/register", json={}).status_code in (404, 405)
        config = http.get("/fhir/.well-known/smart-configuration").json()
        assert "registration_endpoint" not in config
