"""Per-request context that deep layers may read without it being threaded through every call
(it is copied into the worker thread that runs the request's database work).

``current_access`` is who is calling (set by the FHIR routes once the token is verified): the
ledger records it as the actor of a change, the audit trail as the agent, and the consent
workflow uses it to decide who may move a Consent between states.
"""

from __future__ import annotations

from contextvars import ContextVar

from fhir_consent.auth import OPEN_ACCESS, AccessContext

__all__ = ["current_access"]

current_access: ContextVar[AccessContext] = ContextVar("current_access", default=OPEN_ACCESS)
