"""The inquiry workflow of consent.md §2, and :func:`install`, which puts the consent layer into a
``FHIRContext``.

Who may write a Consent (a PreWrite hook in the write's own transaction, so a refusal writes
nothing):

* the **patient** (``fhirUser`` = ``Consent.patient``) or their **legal representative**
  (consent.md §1) may create Consents in any status and move their Consents between any
  statuses — answer an inquiry (``active`` = grant, ``rejected`` = refuse), narrow it first,
  revoke (``inactive``), or author directly (§2.2-§2.4);
* **anyone else** (a clinic's system, a clinician) may only *ask*: create a Consent with
  ``status = proposed``, and *withdraw* one of its own proposals by setting ``entered-in-error``
  and changing nothing else (§2.1). Every other create, update or delete is refused with
  **403** and an OperationOutcome.

The server records who asked on the inquiry (§2.1): one extension
(:data:`~fhir_consent.consent.index.INQUIRER_EXTENSION`) per reference of the token — its
``fhirUser`` and the client's Organization — set by the server on the proposal and carried
over to every later version whoever writes it (a client cannot forge or drop it). The clinic
sees its own inquiries through it, whatever the patient answers.

A Consent the engine cannot interpret (``compile_consent(...).error``) is refused with **422**:
it could never apply. Open access (development mode) skips these rules.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from fhir_consent.auth import AccessContext
from fhir_consent.consent._compile import compile_consent
from fhir_consent.consent.config import ConsentSettings
from fhir_consent.consent.enforcement import (
    ConsentBinaryAccess,
    ConsentEnforcement,
    PurposeOfUse,
)
from fhir_consent.consent.index import INQUIRER_EXTENSION, ConsentIndexer, inquirers_of
from fhir_consent.consent.rules import normalize_reference
from fhir_consent.errors import Forbidden, Unprocessable
from fhir_consent.fhir.capability import declare_consent_enforcement
from fhir_consent.requestctx import current_access

if TYPE_CHECKING:  # the FHIR layer sits above this one: only its type is needed here
    from fhir_consent.fhir.routes import FHIRContext

__all__ = ["ConsentLayer", "InquiryWorkflow", "install"]

_ELEMENT = re.compile(r"[A-Za-z][A-Za-z.]*")
_OWNER_STATUSES = frozenset({"active", "rejected", "inactive"})


def _patient(resource: Mapping[str, Any] | None) -> str | None:
    if resource is None:
        return None
    value = resource.get("patient")
    ref = normalize_reference(value.get("reference")) if isinstance(value, Mapping) else None
    return ref if ref is not None and ref.startswith("Patient/") else None


def _with_inquirers(resource: dict[str, Any], refs: frozenset[str]) -> dict[str, Any]:
    """The resource with exactly the server's inquirer extensions (client-sent ones dropped)."""
    out = dict(resource)
    extensions = [
        e
        for e in out.get("extension") or []
        if not (isinstance(e, Mapping) and e.get("url") == INQUIRER_EXTENSION)
    ]
    extensions += [
        {"url": INQUIRER_EXTENSION, "valueReference": {"reference": ref}} for ref in sorted(refs)
    ]
    if extensions:
        out["extension"] = extensions
    else:
        out.pop("extension", None)
    return out


def _comparable(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A Consent without what a withdrawal may change: status, and the server's elements."""
    out = copy.deepcopy(dict(resource))
    for key in ("meta", "text", "id", "status"):
        out.pop(key, None)
    return _with_inquirers(out, frozenset())


def _malformed(error: str) -> Unprocessable:
    """422 naming the element at fault, never its value (no resource content in errors)."""
    m = _ELEMENT.match(error)
    element = m.group(0).rstrip(".") if m and "." in m.group(0) else "the Consent"
    return Unprocessable(
        f"This Consent cannot be enforced as written: {element} is not valid (consent.md §3)"
    )


class InquiryWorkflow:
    """consent.md §2 as a PreWrite hook (creates, updates, patches) and a WriteListener
    (deletes), both inside the write's transaction."""

    def __init__(self, enforcement: ConsentEnforcement, clock: Callable[[], int]) -> None:
        self.enforcement = enforcement
        self.clock = clock

    def _parties(self, conn: Any, access: AccessContext) -> tuple[frozenset[str], frozenset[str]]:
        now = self.clock()
        return (
            self.enforcement.requester_set(conn, access, now),
            self.enforcement.own_patients(conn, access),
        )

    @staticmethod
    def recorded(access: AccessContext) -> frozenset[str]:
        """Who asked, from the token (consent.md §2.1): ``fhirUser`` and client Organization."""
        refs = {
            normalize_reference(access.fhir_user),
            normalize_reference(access.client_organization),
        }
        return frozenset(r for r in refs if r is not None)

    def prewrite(
        self, service: Any, res_type: str, resource: dict[str, Any], previous: Any
    ) -> dict[str, Any]:
        """``fhir_consent.fhir.services.PreWrite``: the §2 transitions, or 403/422."""
        if res_type != "Consent":
            return resource
        access = current_access.get()
        if access.is_open:
            return resource
        compiled = compile_consent(resource)
        if compiled.error is not None:
            raise _malformed(compiled.error)
        prev: dict[str, Any] | None = None
        if previous is not None and not previous.deleted and previous.content is not None:
            prev = orjson.loads(previous.content)
        requesters, own = self._parties(service.conn, access)
        status = resource.get("status")
        patient = _patient(resource)
        earlier = inquirers_of(prev) if prev is not None else frozenset()
        if patient in own and (prev is None or _patient(prev) in own):
            return _with_inquirers(resource, earlier)  # the patient or representative (§2.2-2.4)
        if prev is None:
            if status != "proposed":
                raise Forbidden(
                    "Only the patient or their legal representative may create this Consent; "
                    "a clinic asks with status 'proposed' (consent.md §2)"
                )
            asked = self.recorded(access)
            if not asked:
                raise Forbidden("An inquiry needs a token that identifies who asks (consent.md §2)")
            return _with_inquirers(resource, asked)
        withdraw = (
            prev.get("status") == "proposed"
            and status == "entered-in-error"
            and bool(earlier & requesters)
            and _comparable(prev) == _comparable(resource)
        )
        if withdraw:
            return _with_inquirers(resource, earlier)
        if status in _OWNER_STATUSES:
            raise Forbidden(
                f"Only the patient or their legal representative may set a Consent to "
                f"'{status}' (consent.md §2)"
            )
        raise Forbidden(
            "A clinic may only withdraw its own proposal, by setting status "
            "'entered-in-error' and changing nothing else (consent.md §2)"
        )

    def guard_delete(self, conn: Any, event: Any) -> None:
        """WriteListener: only the patient or a representative deletes a Consent (§2)."""
        if event.method != "delete" or event.current.res_type != "Consent":
            return
        access = current_access.get()
        if access.is_open:
            return
        previous = event.previous
        prev = orjson.loads(previous.content) if previous is not None and previous.content else None
        _requesters, own = self._parties(conn, access)
        if _patient(prev) not in own:
            raise Forbidden(
                "Only the patient or their legal representative may delete a Consent; a clinic "
                "withdraws its proposal with status 'entered-in-error' (consent.md §2)"
            )


@dataclass(frozen=True, slots=True)
class ConsentLayer:
    """What :func:`install` put in place. ``binary_access`` is the document store's
    ``BinaryAccess`` with consents: ``app.state.documents.access = layer.binary_access(…)``."""

    enforcement: ConsentEnforcement
    workflow: InquiryWorkflow
    indexer: ConsentIndexer

    def binary_access(self, inner: Any = None) -> ConsentBinaryAccess:
        """Binary content follows its DocumentReferences (consent.md §4); ``inner`` is the
        document store's default check (scopes, patient compartment)."""
        clock: Callable[[], int] = self.workflow.clock
        return ConsentBinaryAccess(self.enforcement, clock, inner)


def install(ctx: FHIRContext, settings: ConsentSettings | None = None) -> ConsentLayer:
    """Wire the consent layer into a ``FHIRContext`` before it serves requests: the enforcer
    (``ctx.consent``), the §2 workflow hook, the consent index listener, the delete guard, and
    the ``X-Purpose-Of-Use`` handling around ``ctx.authenticate`` (set the authenticator
    first). Call it once per context."""
    enforcement = ConsentEnforcement(settings)
    workflow = InquiryWorkflow(enforcement, ctx.clock)
    indexer = ConsentIndexer()
    ctx.consent = enforcement
    ctx.prewrites.append(workflow.prewrite)
    ctx.listeners.append(indexer)
    ctx.listeners.append(workflow.guard_delete)
    if not isinstance(ctx.authenticate, PurposeOfUse):
        ctx.authenticate = PurposeOfUse(ctx.authenticate)
    if not ctx.settings.open_access:  # open access enforces nothing: do not claim it
        ctx.capability_extenders.append(declare_consent_enforcement)
    return ConsentLayer(enforcement, workflow, indexer)
