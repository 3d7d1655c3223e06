"""Spec §2A (Inferno STU2.2 1.1.xx, G10 well-known capabilities) over HTTP, plus the
CapabilityStatement ``oauth-uris`` extension fhirclient reads and the OpenID documents."""

from __future__ import annotations

import pytest

from .kit import APP_ORIGIN, AUTH, FHIR, World

G10_STANDALONE = {
    "launch-standalone",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "sso-openid-connect",
    "context-standalone-patient",
    "permission-offline",
    "permission-patient",
    "authorize-post",
    "permission-v1",
    "permission-v2",
}
G10_EHR = {
    "launch-ehr",
    "context-banner",
    "context-style",
    "context-ehr-patient",
    "permission-user",
}


@pytest.mark.parametrize("accept", ["application/json", "text/html", "*/*"])
def test_1_1_01_well_known_endpoint_is_json(world: World, accept: str) -> None:
    """1.1.01 ``well_known_endpoint``: 200, valid JSON, ``application/json`` whatever Accept."""
    r = world.http.get(f"{FHIR}/.well-known/smart-configuration", headers={"accept": accept})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert isinstance(r.json(), dict)


def test_1_1_02_well_known_capabilities_stu2(world: World) -> None:
    """1.1.02 ``well_known_capabilities_stu2``."""
    doc = world.http.get(f"{FHIR}/.well-known/smart-configuration").json()
    for name in ("authorization_endpoint", "token_endpoint"):
        assert isinstance(doc[name], str) and doc[name].startswith("https://testserver/")
    for name in ("capabilities", "grant_types_supported", "code_challenge_methods_supported"):
        assert isinstance(doc[name], list) and doc[name]
    assert "authorization_code" in doc["grant_types_supported"]
    assert "client_credentials" in doc["grant_types_supported"]
    assert "S256" in doc["code_challenge_methods_supported"]
    assert "plain" not in doc["code_challenge_methods_supported"]
    assert "sso-openid-connect" in doc["capabilities"]
    assert isinstance(doc["issuer"], str) and isinstance(doc["jwks_uri"], str)
    assert all(isinstance(c, str) for c in doc["capabilities"])
    # recommended fields, each absolute
    for name in ("introspection_endpoint", "revocation_endpoint", "registration_endpoint"):
        assert doc[name].startswith("https://testserver/auth/")
    assert doc["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    ]
    assert set(doc["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}


def test_1_1_03_cors_on_well_known(world: World) -> None:
    """1.1.03: any origin may read the discovery document."""
    for origin in ("https://inferno.example", APP_ORIGIN):
        r = world.http.get(f"{FHIR}/.well-known/smart-configuration", headers={"origin": origin})
        assert r.headers["access-control-allow-origin"] in (origin, "*")


def test_1_1_04_cors_on_metadata(world: World) -> None:
    """1.1.04: any origin may read ``/metadata`` (public, no token)."""
    r = world.http.get(
        f"{FHIR}/metadata",
        headers={"origin": "https://inferno.example", "accept": "application/fhir+json"},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("https://inferno.example", "*")


def test_g10_smart_well_known_capabilities(world: World) -> None:
    """G10 ``g10_smart_well_known_capabilities``: standalone patient app and EHR
    practitioner app sets (without context-ehr-encounter, which needs US Core 5+)."""
    capabilities = set(
        world.http.get(f"{FHIR}/.well-known/smart-configuration").json()["capabilities"]
    )
    assert G10_STANDALONE <= capabilities
    assert G10_EHR <= capabilities
    assert {"permission-online", "launch-ehr"} <= capabilities


def test_capability_statement_oauth_uris(world: World) -> None:
    """The ``oauth-uris`` extension (fhirclient's only discovery source) and the
    SMART-on-FHIR security service; /metadata needs no token."""
    r = world.http.get(f"{FHIR}/metadata", headers={"accept": "application/fhir+json"})
    assert r.status_code == 200
    security = r.json()["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    (ext,) = security["extension"]
    uris = {e["url"]: e["valueUri"] for e in ext["extension"]}
    assert uris["authorize"] == f"{AUTH}/authorize"
    assert uris["token"] == f"{AUTH}/token"
    assert uris["register"] == f"{AUTH}/register"


def test_capability_statement_loads_in_fhirclient(world: World) -> None:
    """fhirclient's strict R4 models accept the statement and find the OAuth endpoints."""
    from fhirclient.auth import FHIRAuth
    from fhirclient.models.capabilitystatement import CapabilityStatement

    body = world.http.get(f"{FHIR}/metadata", headers={"accept": "application/fhir+json"}).json()
    statement = CapabilityStatement(body)
    state: dict[str, str] = {}
    auth = FHIRAuth.from_capability_security(statement.rest[0].security, state)
    assert auth.auth_type == "oauth2"
    assert state["authorize_uri"] == f"{AUTH}/authorize"


@pytest.mark.parametrize(
    "path", ["/.well-known/openid-configuration", "/fhir/.well-known/openid-configuration"]
)
def test_openid_configuration_everywhere(world: World, path: str) -> None:
    """1.3 ``smart_openid_retrieve_configuration``: ``{iss}/.well-known/openid-configuration``
    and the host root both answer."""
    doc = world.http.get(path).json()
    assert doc["issuer"] == FHIR
    assert "RS256" in doc["id_token_signing_alg_values_supported"]


def test_jwks_is_public_and_cacheable(world: World) -> None:
    r = world.http.get(f"{AUTH}/jwks", headers={"origin": "https://x.example"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    keys = r.json()["keys"]
    assert {k["kty"] for k in keys} == {"RSA", "EC"}
    assert not any("d" in k for k in keys)
