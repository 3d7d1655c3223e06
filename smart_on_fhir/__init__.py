"""fhir-consent's SMART App Launch 2.2 authorization server.

Pure foundations (re-exported here):

* :mod:`~smart_on_fhir.scopes`: the v1/v2 scope grammar, :class:`ScopeSet` decisions,
  narrowing and plain-language descriptions.
* :mod:`~smart_on_fhir.keys`: signing keys (joserfc), JWKS, rotation, fast verification.
* :mod:`~smart_on_fhir.tokens`: RFC 9068 access tokens and OpenID Connect id_tokens.
* :mod:`~smart_on_fhir.discovery`: ``.well-known`` documents and the CapabilityStatement
  security element.
* :mod:`~smart_on_fhir.errors`: the one exception tree, rooted at :class:`SmartError`.

The server (import the modules directly; they pull in authlib, SQLAlchemy and Starlette):

* :mod:`~smart_on_fhir.tables`: its own ``MetaData`` (users, clients, codes, tokens …).
* :mod:`~smart_on_fhir.users`, :mod:`~smart_on_fhir.clients`,
  :mod:`~smart_on_fhir.launches`: the services behind the admin CLI.
* :mod:`~smart_on_fhir.server`, :mod:`~smart_on_fhir.grants`,
  :mod:`~smart_on_fhir.client_auth`, :mod:`~smart_on_fhir.endpoints`,
  :mod:`~smart_on_fhir.records`: authlib's ``AuthorizationServer`` with SMART grants
  (RFC 6749, 7636, 7523, 7662, 7009, 7591, 9068).
* :mod:`~smart_on_fhir.requests`, :mod:`~smart_on_fhir.routes`,
  :mod:`~smart_on_fhir.login`, :mod:`~smart_on_fhir.manage`,
  :mod:`~smart_on_fhir.cors`: the Starlette adapter, the endpoints and the pages.
* :mod:`~smart_on_fhir.protect`: the resource server's bearer-token check.

This package never imports ``fhir_consent``: the host injects its database transactions,
URLs and FHIR-store callbacks (:class:`~smart_on_fhir.routes.SmartAuth`).
"""

from .discovery import (
    ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    DEFAULT_SCOPES_SUPPORTED,
    OAUTH_URIS_URL,
    RESTFUL_SECURITY_SERVICE_SYSTEM,
    capability_security,
    oauth_uris_extension,
    openid_configuration,
    smart_configuration,
)
from .errors import (
    TOKEN_ERROR_REASONS,
    ConfigurationError,
    InvalidToken,
    KeyStoreError,
    ScopeError,
    SmartError,
)
from .keys import (
    DEFAULT_ALGORITHMS,
    SIGNING_ALGORITHMS,
    KeySet,
    SigningKey,
    VerificationKeys,
    generate_signing_key,
)
from .scopes import (
    FHIR_INTERACTION_MAP,
    IDENTITY_SCOPES,
    NAMED_SCOPES,
    SMART_SCOPE_URI_PREFIX,
    Context,
    ExtensionScope,
    Interaction,
    LaunchScope,
    NamedScope,
    ResourceScope,
    Scope,
    ScopeDecision,
    ScopeSet,
    describe,
    describe_all,
    narrow,
    parse_scope,
    parse_scopes,
    scope_from_uri,
    scope_to_uri,
)
from .tokens import (
    ACCESS_TOKEN_TYP,
    AccessTokenClaims,
    KeySource,
    Timestamp,
    at_hash,
    issue_access_token,
    issue_id_token,
    verify_access_token,
    verify_id_token,
)

__all__ = [
    "ACCESS_TOKEN_TYP",
    "ALL_CAPABILITIES",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_CAPABILITIES",
    "DEFAULT_SCOPES_SUPPORTED",
    "FHIR_INTERACTION_MAP",
    "IDENTITY_SCOPES",
    "NAMED_SCOPES",
    "OAUTH_URIS_URL",
    "RESTFUL_SECURITY_SERVICE_SYSTEM",
    "SIGNING_ALGORITHMS",
    "SMART_SCOPE_URI_PREFIX",
    "TOKEN_ERROR_REASONS",
    "AccessTokenClaims",
    "ConfigurationError",
    "Context",
    "ExtensionScope",
    "Interaction",
    "InvalidToken",
    "KeySet",
    "KeySource",
    "KeyStoreError",
    "LaunchScope",
    "NamedScope",
    "ResourceScope",
    "Scope",
    "ScopeDecision",
    "ScopeError",
    "ScopeSet",
    "SigningKey",
    "SmartError",
    "Timestamp",
    "VerificationKeys",
    "at_hash",
    "capability_security",
    "describe",
    "describe_all",
    "generate_signing_key",
    "issue_access_token",
    "issue_id_token",
    "narrow",
    "oauth_uris_extension",
    "openid_configuration",
    "parse_scope",
    "parse_scopes",
    "scope_from_uri",
    "scope_to_uri",
    "smart_configuration",
    "verify_access_token",
    "verify_id_token",
]
