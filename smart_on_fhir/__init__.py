"""fhir-consent's SMART App Launch 2.2 authorization server: the pure foundations.

* :mod:`~smart_on_fhir.scopes`: the v1/v2 scope grammar, :class:`ScopeSet` decisions,
  narrowing and plain-language descriptions.
* :mod:`~smart_on_fhir.keys`: signing keys (joserfc), JWKS, rotation, fast verification.
* :mod:`~smart_on_fhir.tokens`: RFC 9068 access tokens and OpenID Connect id_tokens.
* :mod:`~smart_on_fhir.discovery`: ``.well-known`` documents and the CapabilityStatement
  security element.
* :mod:`~smart_on_fhir.errors`: the one exception tree, rooted at :class:`SmartError`.

This package never imports ``fhir_consent``.
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
