"""SMART 2.2 discovery, OpenID configuration and the CapabilityStatement security element."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from smart_on_fhir import (
    ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    OAUTH_URIS_URL,
    ConfigurationError,
    capability_security,
    oauth_uris_extension,
    openid_configuration,
    parse_scope,
    smart_configuration,
)

BASE = "https://fhir.example.org/r4"
AUTH = "https://fhir.example.org/auth"
ENDPOINTS: dict[str, Any] = {
    "authorization_endpoint": f"{AUTH}/authorize",
    "token_endpoint": f"{AUTH}/token",
    "jwks_uri": f"{AUTH}/jwks",
    "registration_endpoint": f"{AUTH}/register",
    "management_endpoint": f"{AUTH}/manage",
    "introspection_endpoint": f"{AUTH}/introspect",
    "revocation_endpoint": f"{AUTH}/revoke",
}

# SMART App Launch 2.2 conformance.md §"Metadata": REQUIRED fields, plus the conditional
# ones our capabilities trigger (launch-* → authorization_endpoint; sso-openid-connect →
# issuer, jwks_uri) and the RECOMMENDED ones this server can fill.
REQUIRED_FIELDS = [
    "token_endpoint",
    "grant_types_supported",
    "capabilities",
    "code_challenge_methods_supported",
    "authorization_endpoint",
    "issuer",
    "jwks_uri",
]
RECOMMENDED_FIELDS = [
    "scopes_supported",
    "response_types_supported",
    "introspection_endpoint",
    "revocation_endpoint",
    "management_endpoint",
]
# conformance.md §"Capabilities", as the brief lists them, which covers G10
# g10_smart_well_known_capabilities for the standalone patient app and the EHR practitioner
# app (less context-ehr-encounter, which only US Core 5+ adds).
CAPABILITIES_FROM_SPEC = [
    "launch-standalone",
    "launch-ehr",
    "authorize-post",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "sso-openid-connect",
    "context-standalone-patient",
    "context-ehr-patient",
    "context-banner",
    "context-style",
    "permission-offline",
    "permission-online",
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
]
URL_FIELDS = [
    "issuer",
    "jwks_uri",
    "authorization_endpoint",
    "token_endpoint",
    "registration_endpoint",
    "management_endpoint",
    "introspection_endpoint",
    "revocation_endpoint",
]


@pytest.fixture
def document() -> dict[str, Any]:
    return smart_configuration(AUTH, **ENDPOINTS)


@pytest.mark.parametrize("name", REQUIRED_FIELDS + RECOMMENDED_FIELDS)
def test_required_and_recommended_fields(document: dict[str, Any], name: str) -> None:
    assert document.get(name), name


@pytest.mark.parametrize("capability", CAPABILITIES_FROM_SPEC)
def test_every_capability_is_advertised(document: dict[str, Any], capability: str) -> None:
    assert capability in document["capabilities"]


def test_inferno_well_known_capabilities_stu2(document: dict[str, Any]) -> None:
    """Inferno 1.1.02 well_known_capabilities_stu2, reimplemented."""
    for name, kind in (
        ("authorization_endpoint", str),
        ("token_endpoint", str),
        ("capabilities", list),
        ("grant_types_supported", list),
        ("code_challenge_methods_supported", list),
    ):
        assert isinstance(document[name], kind) and document[name]
    assert "authorization_code" in document["grant_types_supported"]
    assert "S256" in document["code_challenge_methods_supported"]
    assert "plain" not in document["code_challenge_methods_supported"]
    assert all(isinstance(c, str) for c in document["capabilities"])
    assert isinstance(document["issuer"], str) and isinstance(document["jwks_uri"], str)


def test_pkce_and_client_auth(document: dict[str, Any]) -> None:
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["response_types_supported"] == ["code"]
    methods = document["token_endpoint_auth_methods_supported"]
    assert {"private_key_jwt", "client_secret_basic"} <= set(methods)
    algs = document["token_endpoint_auth_signing_alg_values_supported"]
    assert {"RS384", "ES384"} <= set(algs)
    assert document["grant_types_supported"] == ["authorization_code", "client_credentials"]


def test_every_url_is_absolute(document: dict[str, Any]) -> None:
    for name in URL_FIELDS:
        parts = urlsplit(document[name])
        assert parts.scheme == "https" and parts.netloc, name


def test_scopes_supported_all_parse(document: dict[str, Any]) -> None:
    for scope in document["scopes_supported"]:
        parse_scope(scope)
    assert {"openid", "fhirUser", "launch/patient", "patient/*.rs", "offline_access"} <= set(
        document["scopes_supported"]
    )


def test_document_is_json(document: dict[str, Any]) -> None:
    assert json.loads(json.dumps(document)) == document


def test_issuer_is_omitted_without_sso() -> None:
    caps = [c for c in DEFAULT_CAPABILITIES if c != "sso-openid-connect"]
    document = smart_configuration(AUTH, capabilities=caps, **ENDPOINTS)
    assert "issuer" not in document
    assert document["jwks_uri"] == ENDPOINTS["jwks_uri"]


def test_backend_services_only() -> None:
    document = smart_configuration(
        None,
        token_endpoint=ENDPOINTS["token_endpoint"],
        jwks_uri=ENDPOINTS["jwks_uri"],
        capabilities=["client-confidential-asymmetric", "permission-v2"],
        grant_types_supported=["client_credentials"],
        scopes_supported=["system/*.rs"],
    )
    assert "authorization_endpoint" not in document
    assert document["grant_types_supported"] == ["client_credentials"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"issuer": None}, "issuer is required"),
        ({"jwks_uri": None}, "jwks_uri is required"),
        ({"authorization_endpoint": None}, "authorization_endpoint is required"),
        ({"token_endpoint": "/token"}, "absolute"),
        ({"revocation_endpoint": "ftp://x.example/revoke"}, "absolute"),
        ({"capabilities": ["launch-standalone", "teleport"]}, "unknown capability"),
        ({"scopes_supported": ["patient/*.dus"]}, "scopes_supported"),
        ({"grant_types_supported": []}, "must not be empty"),
        ({"token_endpoint_auth_signing_alg_values_supported": ["RS256"]}, "RS384"),
    ],
)
def test_configuration_errors(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"issuer": AUTH, **ENDPOINTS, **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        smart_configuration(**args)


def test_full_uri_capabilities_are_allowed() -> None:
    capability = "https://fhir.example.org/capabilities/consent-ledger"
    document = smart_configuration(
        AUTH, capabilities=[*DEFAULT_CAPABILITIES, capability], **ENDPOINTS
    )
    assert capability in document["capabilities"]
    assert set(DEFAULT_CAPABILITIES) <= set(ALL_CAPABILITIES)


def test_openid_configuration_required_fields() -> None:
    """Inferno smart_openid_required_configuration_fields."""
    document = openid_configuration(
        AUTH,
        authorization_endpoint=ENDPOINTS["authorization_endpoint"],
        token_endpoint=ENDPOINTS["token_endpoint"],
        jwks_uri=ENDPOINTS["jwks_uri"],
    )
    for name in (
        "issuer",
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "response_types_supported",
        "subject_types_supported",
        "id_token_signing_alg_values_supported",
    ):
        assert document[name], name
    assert "RS256" in document["id_token_signing_alg_values_supported"]
    assert "fhirUser" in document["claims_supported"]
    assert "openid" in document["scopes_supported"]
    with pytest.raises(ConfigurationError):
        openid_configuration(
            "issuer-without-scheme",
            authorization_endpoint=ENDPOINTS["authorization_endpoint"],
            token_endpoint=ENDPOINTS["token_endpoint"],
            jwks_uri=ENDPOINTS["jwks_uri"],
        )


def test_oauth_uris_extension() -> None:
    extension = oauth_uris_extension(
        authorize=f"{AUTH}/authorize",
        token=f"{AUTH}/token",
        register=f"{AUTH}/register",
        manage=f"{AUTH}/manage",
        introspect=f"{AUTH}/introspect",
        revoke=f"{AUTH}/revoke",
    )
    assert extension["url"] == OAUTH_URIS_URL
    assert OAUTH_URIS_URL == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    values = {item["url"]: item["valueUri"] for item in extension["extension"]}
    assert values == {
        name: f"{AUTH}/{name}"
        for name in ("authorize", "token", "register", "manage", "introspect", "revoke")
    }
    minimal = oauth_uris_extension(f"{AUTH}/authorize", f"{AUTH}/token")
    assert [item["url"] for item in minimal["extension"]] == ["authorize", "token"]
    with pytest.raises(ConfigurationError):
        oauth_uris_extension("authorize", f"{AUTH}/token")


def test_capability_security_element() -> None:
    security = capability_security(f"{AUTH}/authorize", f"{AUTH}/token", f"{AUTH}/register")
    assert security["cors"] is True
    coding = security["service"][0]["coding"][0]
    assert coding["system"] == "http://terminology.hl7.org/CodeSystem/restful-security-service"
    assert coding["code"] == "SMART-on-FHIR"
    assert security["extension"][0]["url"] == OAUTH_URIS_URL


def test_fhirclient_reads_the_security_element() -> None:
    """fhirclient 4.x models are strict R4 and find the endpoints in /metadata."""
    capabilitystatement = pytest.importorskip("fhirclient.models.capabilitystatement")
    auth = pytest.importorskip("fhirclient.auth")
    security_json = capability_security(f"{AUTH}/authorize", f"{AUTH}/token", f"{AUTH}/register")
    security = capabilitystatement.CapabilityStatementRestSecurity(security_json)
    oauth = auth.FHIRAuth.from_capability_security(security, state={})
    assert oauth.auth_type == "oauth2"
    assert oauth._authorize_uri == f"{AUTH}/authorize"
    assert oauth._token_uri == f"{AUTH}/token"
    assert oauth._registration_uri == f"{AUTH}/register"
