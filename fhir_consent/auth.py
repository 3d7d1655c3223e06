"""The FHIR API's view of who is calling: an :class:`AccessContext` per request.

The FHIR routes call ``ctx.authenticate(request)`` first (401 on a missing or bad token), then
:func:`require` for the interaction (403 when no scope allows it), and check that the token is
still active inside the request's own database transaction (revocation takes effect on the
next call). The SMART authorization server in :mod:`smart_on_fhir` issues the tokens; this
module adapts its verifier to the FHIR layer. Open access (no token needed) exists for local
development only and is off by default.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection
from starlette.requests import Request

from fhir_consent.errors import Forbidden
from smart_on_fhir.scopes import Context, Interaction, ScopeDecision, ScopeSet

__all__ = [
    "OPEN_ACCESS",
    "AccessContext",
    "Authenticator",
    "TokenCheck",
    "open_authenticator",
    "require",
]


@dataclass(frozen=True, slots=True)
class AccessContext:
    """Who is calling, as established from their access token.

    ``scopes is None`` means open access (development mode): every interaction is allowed
    and no consent filtering applies.
    """

    scopes: ScopeSet | None
    subject: str | None = None  # token ``sub`` (user or client)
    client_id: str | None = None
    patient: str | None = None  # launch context: the patient id
    fhir_user: str | None = None  # "Patient/1", "Practitioner/2", "RelatedPerson/3"
    client_organization: str | None = None  # "Organization/o" for clinic systems
    jti: str | None = None
    purpose_of_use: frozenset[str] = field(default_factory=lambda: frozenset({"TREAT"}))

    @property
    def is_open(self) -> bool:
        return self.scopes is None


OPEN_ACCESS = AccessContext(scopes=None)

Authenticator = Callable[[Request], Awaitable[AccessContext]]
#: Checks inside the request's transaction that the token is still active (not revoked, user
#: not deactivated); raises :class:`fhir_consent.errors.Unauthorized` otherwise.
TokenCheck = Callable[[Connection, AccessContext], None]

_OPEN_DECISION = ScopeDecision(True, Context.SYSTEM)


async def _open(_request: Request) -> AccessContext:
    return OPEN_ACCESS


def open_authenticator() -> Authenticator:
    """Development mode: everyone is allowed everything."""
    return _open


def require(access: AccessContext, resource_type: str, interaction: Interaction) -> ScopeDecision:
    """The scope decision for this interaction, or 403 (SMART App Launch 2.2, scopes)."""
    if access.scopes is None:
        return _OPEN_DECISION
    decision = access.scopes.decide(resource_type, interaction)
    if not decision.allowed:
        raise Forbidden(
            f"The access token's scopes do not allow {interaction.value} on {resource_type}"
        )
    return decision
