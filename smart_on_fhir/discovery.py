"""Discovery documents, as pure builders of JSON-ready dicts.

* :func:`smart_configuration`: ``{fhirBase}/.well-known/smart-configuration``, SMART App
  Launch 2.2 conformance.md §"Metadata" (every REQUIRED and RECOMMENDED field we can fill;
  Inferno ``well_known_capabilities_stu2`` and G10 ``g10_smart_well_known_capabilities``).
* :func:`openid_configuration`: ``{issuer}/.well-known/openid-configuration``, OpenID
  Connect Discovery 1.0 §3 (Inferno ``smart_openid_required_configuration_fields``).
* :func:`oauth_uris_extension` and :func:`capability_security`: the
  ``CapabilityStatement.rest[0].security`` element with the
  ``http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris`` extension, which
  fhirclient reads from ``/metadata`` (SMART App Launch 1.0 conformance; kept in 2.x).

Every endpoint must be an absolute ``http(s)`` URL (SMART 2.2: "All endpoint URLs in the
response document SHALL be absolute URLs"); the builders raise
:class:`~smart_on_fhir.errors.ConfigurationError` rather than publish a document that
breaks the spec.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from .errors import ConfigurationError, ScopeError
from .scopes import parse_scope

__all__ = [
    "ALL_CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "DEFAULT_SCOPES_SUPPORTED",
    "OAUTH_URIS_URL",
    "RESTFUL_SECURITY_SERVICE_SYSTEM",
    "capability_security",
    "oauth_uris_extension",
    "openid_configuration",
    "smart_configuration",
]

#: Every capability code SMART 2.2 defines (conformance.md §"Capabilities").
ALL_CAPABILITIES: Final = (
    "launch-ehr",
    "launch-standalone",
    "authorize-post",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "sso-openid-connect",
    "context-banner",
    "context-style",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "context-standalone-encounter",
    "permission-offline",
    "permission-online",
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
    "smart-app-state",
)

#: What this server advertises unless told otherwise: the G10 standalone patient app set
#: plus EHR launch, banner and style, online access and user-level permissions.
DEFAULT_CAPABILITIES: Final = (
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
)

#: Scopes advertised by default; SMART 2.2: every scope listed SHALL be supported.
DEFAULT_SCOPES_SUPPORTED: Final = (
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "offline_access",
    "online_access",
    "patient/*.cruds",
    "patient/*.rs",
    "user/*.cruds",
    "user/*.rs",
    "system/*.cruds",
    "system/*.rs",
    "patient/*.read",
    "patient/*.write",
    "patient/*.*",
    "user/*.read",
    "user/*.write",
    "user/*.*",
    "system/*.read",
    "system/*.*",
)

OAUTH_URIS_URL: Final = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
RESTFUL_SECURITY_SERVICE_SYSTEM: Final = (
    "http://terminology.hl7.org/CodeSystem/restful-security-service"
)


def _url(name: str, value: str | None, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise ConfigurationError(f"{name} is required")
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.fragment:
        raise ConfigurationError(f"{name} must be an absolute http(s) URL without fragment")
    return value


def _put(document: dict[str, Any], name: str, value: str | None, required: bool = False) -> None:
    url = _url(name, value, required=required)
    if url is not None:
        document[name] = url


def _check_capabilities(capabilities: Iterable[str]) -> list[str]:
    out: list[str] = []
    for capability in capabilities:
        if capability not in ALL_CAPABILITIES and "://" not in capability:
            raise ConfigurationError(
                f"unknown capability {capability!r}: non-SMART capabilities SHALL be full URIs"
            )
        if capability not in out:
            out.append(capability)
    return out


def _check_scopes(scopes: Iterable[str]) -> list[str]:
    out: list[str] = []
    for scope in scopes:
        try:
            parse_scope(scope)
        except ScopeError as error:
            raise ConfigurationError(f"scopes_supported: {error}") from None
        if scope not in out:
            out.append(scope)
    return out


def smart_configuration(
    issuer: str | None,
    *,
    token_endpoint: str,
    authorization_endpoint: str | None = None,
    jwks_uri: str | None = None,
    registration_endpoint: str | None = None,
    management_endpoint: str | None = None,
    introspection_endpoint: str | None = None,
    revocation_endpoint: str | None = None,
    capabilities: Iterable[str] = DEFAULT_CAPABILITIES,
    scopes_supported: Iterable[str] = DEFAULT_SCOPES_SUPPORTED,
    grant_types_supported: Iterable[str] = ("authorization_code", "client_credentials"),
    token_endpoint_auth_methods_supported: Iterable[str] = (
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    ),
    token_endpoint_auth_signing_alg_values_supported: Iterable[str] = ("RS384", "ES384"),
    user_access_brand_bundle: str | None = None,
    user_access_brand_identifier: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The SMART 2.2 ``.well-known/smart-configuration`` document (conformance.md).

    REQUIRED: ``token_endpoint``, ``grant_types_supported``, ``capabilities``,
    ``code_challenge_methods_supported`` (always exactly ``["S256"]``: SHALL include
    S256 and SHALL NOT include plain). CONDITIONAL: ``authorization_endpoint`` with
    ``launch-ehr`` or ``launch-standalone``; ``issuer`` and ``jwks_uri`` with
    ``sso-openid-connect`` (and ``issuer`` is omitted without it). RECOMMENDED, added
    when given: ``scopes_supported``, ``response_types_supported``,
    ``introspection_endpoint``, ``revocation_endpoint``, ``management_endpoint``,
    ``user_access_brand_bundle`` and ``user_access_brand_identifier``. OPTIONAL:
    ``registration_endpoint``, ``token_endpoint_auth_methods_supported`` and, with
    ``client-confidential-asymmetric``, ``token_endpoint_auth_signing_alg_values_supported``
    (client-confidential-asymmetric.md: RS384 and/or ES384).

    :raises ConfigurationError: for a missing conditional field, a relative URL, an
        unknown capability or an unparseable scope
    """
    caps = _check_capabilities(capabilities)
    grants = list(dict.fromkeys(grant_types_supported))
    if not grants:
        raise ConfigurationError("grant_types_supported must not be empty")
    document: dict[str, Any] = {}
    sso = "sso-openid-connect" in caps
    if sso:
        _put(document, "issuer", issuer, required=True)
        _put(document, "jwks_uri", jwks_uri, required=True)
    else:
        _put(document, "jwks_uri", jwks_uri)
    launches = {"launch-ehr", "launch-standalone"} & set(caps)
    _put(document, "authorization_endpoint", authorization_endpoint, required=bool(launches))
    if "authorization_code" in grants and "authorization_endpoint" not in document:
        raise ConfigurationError("authorization_code needs an authorization_endpoint")
    _put(document, "token_endpoint", token_endpoint, required=True)
    _put(document, "registration_endpoint", registration_endpoint)
    _put(document, "management_endpoint", management_endpoint)
    _put(document, "introspection_endpoint", introspection_endpoint)
    _put(document, "revocation_endpoint", revocation_endpoint)
    document["grant_types_supported"] = grants
    document["response_types_supported"] = ["code"]
    document["scopes_supported"] = _check_scopes(scopes_supported)
    document["code_challenge_methods_supported"] = ["S256"]
    methods = list(dict.fromkeys(token_endpoint_auth_methods_supported))
    document["token_endpoint_auth_methods_supported"] = methods
    if "client-confidential-asymmetric" in caps or "private_key_jwt" in methods:
        algs = list(dict.fromkeys(token_endpoint_auth_signing_alg_values_supported))
        if not {"RS384", "ES384"} & set(algs):
            raise ConfigurationError("asymmetric client auth must offer RS384 and/or ES384")
        document["token_endpoint_auth_signing_alg_values_supported"] = algs
    _put(document, "user_access_brand_bundle", user_access_brand_bundle)
    if user_access_brand_identifier is not None:
        document["user_access_brand_identifier"] = dict(user_access_brand_identifier)
    document["capabilities"] = caps
    return document


def openid_configuration(
    issuer: str,
    *,
    authorization_endpoint: str,
    token_endpoint: str,
    jwks_uri: str,
    userinfo_endpoint: str | None = None,
    registration_endpoint: str | None = None,
    scopes_supported: Iterable[str] = ("openid", "fhirUser", "profile", "offline_access"),
    token_endpoint_auth_methods_supported: Iterable[str] = (
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    ),
) -> dict[str, Any]:
    """The OpenID Provider Metadata of OpenID Connect Discovery 1.0 §3.

    Has every REQUIRED field (``issuer``, ``authorization_endpoint``, ``token_endpoint``,
    ``jwks_uri``, ``response_types_supported``, ``subject_types_supported``,
    ``id_token_signing_alg_values_supported`` with RS256 as SMART requires), and the
    RECOMMENDED ``scopes_supported`` and ``claims_supported`` (with ``fhirUser``).
    """
    document: dict[str, Any] = {}
    _put(document, "issuer", issuer, required=True)
    _put(document, "authorization_endpoint", authorization_endpoint, required=True)
    _put(document, "token_endpoint", token_endpoint, required=True)
    _put(document, "jwks_uri", jwks_uri, required=True)
    _put(document, "userinfo_endpoint", userinfo_endpoint)
    _put(document, "registration_endpoint", registration_endpoint)
    document.update(
        {
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": _check_scopes(scopes_supported),
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nonce", "at_hash"]
            + ["auth_time", "fhirUser"],
            "token_endpoint_auth_methods_supported": list(
                dict.fromkeys(token_endpoint_auth_methods_supported)
            ),
            "code_challenge_methods_supported": ["S256"],
            "claims_parameter_supported": False,
            "request_parameter_supported": False,
            "request_uri_parameter_supported": False,
        }
    )
    return document


def oauth_uris_extension(
    authorize: str,
    token: str,
    register: str | None = None,
    manage: str | None = None,
    introspect: str | None = None,
    revoke: str | None = None,
) -> dict[str, Any]:
    """The ``oauth-uris`` extension for ``CapabilityStatement.rest[0].security.extension``.

    Sub-extensions ``authorize``, ``token``, and when given ``register``, ``manage``,
    ``introspect`` and ``revoke``, each a ``valueUri`` (SMART App Launch 1.0
    conformance §"Declaring support for OAuth2 endpoints"; fhirclient reads
    ``authorize``, ``token`` and ``register``).
    """
    items = (
        ("authorize", authorize, True),
        ("token", token, True),
        ("register", register, False),
        ("manage", manage, False),
        ("introspect", introspect, False),
        ("revoke", revoke, False),
    )
    extension = []
    for name, value, required in items:
        url = _url(name, value, required=required)
        if url is not None:
            extension.append({"url": name, "valueUri": url})
    return {"url": OAUTH_URIS_URL, "extension": extension}


def capability_security(
    authorize: str,
    token: str,
    register: str | None = None,
    manage: str | None = None,
    introspect: str | None = None,
    revoke: str | None = None,
    *,
    cors: bool = True,
) -> dict[str, Any]:
    """The whole ``CapabilityStatement.rest[0].security`` element (FHIR R4 4.0.1):
    ``cors``, ``service`` coded ``SMART-on-FHIR`` in
    ``http://terminology.hl7.org/CodeSystem/restful-security-service``, and the
    :func:`oauth_uris_extension`. Only R4 elements, so fhirclient's strict models load it.
    """
    return {
        "extension": [oauth_uris_extension(authorize, token, register, manage, introspect, revoke)],
        "cors": cors,
        "service": [
            {
                "coding": [
                    {
                        "system": RESTFUL_SECURITY_SERVICE_SYSTEM,
                        "code": "SMART-on-FHIR",
                        "display": "SMART-on-FHIR",
                    }
                ],
                "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)",
            }
        ],
    }
