"""The one exception tree of :mod:`smart_on_fhir`.

.. code-block:: text

    SmartError                      root: catch this to catch everything below
    ├── ScopeError (ValueError)     a scope string outside the SMART 2.2 grammar
    ├── KeyStoreError               keys could not be generated, loaded or saved
    ├── InvalidToken                a JWT failed verification (``reason`` says why)
    ├── ConfigurationError          a discovery document would break the spec
    ├── users.UserError             an account cannot be created (ValueError)
    ├── clients.ClientError         client metadata cannot be registered (ValueError)
    ├── launches.LaunchError        a launch context cannot be created (ValueError)
    └── protect.AuthenticationRequired  a FHIR request without a usable token (401)

OAuth protocol errors at the endpoints are authlib's ``OAuth2Error`` classes (RFC 6749
§5.2), rendered as RFC 6749 JSON or as an error redirect.

Messages never carry secrets: no key material, and no token text. ``InvalidToken.reason``
is a short machine-readable code from :data:`TOKEN_ERROR_REASONS`, suitable for logs and
for the RFC 6750 §3.1 ``error_description``.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "TOKEN_ERROR_REASONS",
    "ConfigurationError",
    "InvalidToken",
    "KeyStoreError",
    "ScopeError",
    "SmartError",
]


class SmartError(Exception):
    """Root of every error raised by :mod:`smart_on_fhir`."""


class ScopeError(SmartError, ValueError):
    """A scope token does not follow SMART App Launch 2.2 "Scopes and Launch Context".

    :param scope: the offending scope token, as received
    :param reason: a short English explanation, safe to show to a client developer
    """

    def __init__(self, scope: str, reason: str) -> None:
        self.scope = scope
        self.reason = reason
        super().__init__(f"invalid scope {scope!r}: {reason}")


class KeyStoreError(SmartError):
    """A signing key could not be generated, imported, loaded or saved.

    The message names the file or the variable, never the key material.
    """


#: Every value :attr:`InvalidToken.reason` can take.
TOKEN_ERROR_REASONS: Final = frozenset(
    {
        "malformed",  # not three base64url segments of JSON (RFC 7515 §7.1)
        "unsupported_alg",  # alg "none", an HMAC alg, or any alg we did not allow
        "unknown_kid",  # no verification key with this kid (RFC 7515 §4.1.4)
        "bad_signature",  # the signature does not verify (RFC 7515 §5.2)
        "wrong_typ",  # typ is not at+jwt (RFC 9068 §4)
        "expired",  # exp is in the past, beyond the leeway (RFC 7519 §4.1.4)
        "not_yet_valid",  # nbf or iat is in the future, beyond the leeway
        "wrong_issuer",  # iss differs from the expected issuer (RFC 9068 §4)
        "wrong_audience",  # aud does not name this resource server (RFC 9068 §4)
        "missing_claim",  # a claim RFC 9068 §2.2 requires is absent or mistyped
    }
)


class InvalidToken(SmartError):
    """A JWT failed verification; the resource server answers 401 ``invalid_token``.

    :param reason: one of :data:`TOKEN_ERROR_REASONS`
    """

    def __init__(self, reason: str) -> None:
        if reason not in TOKEN_ERROR_REASONS:  # pragma: no cover - programming error
            raise ValueError(f"unknown InvalidToken reason {reason!r}")
        self.reason = reason
        super().__init__(reason)


class ConfigurationError(SmartError, ValueError):
    """A discovery document was asked to say something SMART 2.2 forbids or lacks."""
