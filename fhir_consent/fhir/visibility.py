"""Which stored resources a request may see, as SQL predicates applied *inside* queries.

A :class:`Visibility` is built once per request from its :class:`AccessContext`. Searches
AND its predicate into the SQL (so ``total``, paging and includes never count a hidden row),
reads check the one row against the same predicate, and writes check that the new version
stays inside what the caller may touch. Today it enforces the patient compartment of
``patient/``-level tokens (SMART App Launch 2.2, "patient-specific scopes"); the consent
engine adds its own predicate through the same seam.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from fhir_consent.auth import AccessContext, Fetch
from fhir_consent.errors import FHIRError
from fhir_consent.fhir.query import parse_search
from fhir_consent.fhir.searchparams import IndexRows
from fhir_consent.store.repository import CurrentRow
from fhir_consent.store.search import conditions_predicate
from fhir_consent.store.tables import idx_reference, resources
from smart_on_fhir.scopes import Context, Interaction, ScopeDecision

__all__ = [
    "PATIENT_COMPARTMENT",
    "ConsentEnforcer",
    "ConsentFilter",
    "Visibility",
    "search_restrictions",
    "visibility_for",
]

#: R4 CompartmentDefinition "patient": the reference parameters that put a resource of each
#: type into a patient's compartment. Types absent here (Organization, Practitioner,
#: PractitionerRole) are not patient data. Binary is reached only through the documents
#: that point to it, so patient-level tokens get no direct Binary search.
PATIENT_COMPARTMENT: Mapping[str, tuple[str, ...]] = {
    "Patient": ("link",),
    "AuditEvent": ("patient",),
    "Consent": ("patient",),
    "DocumentReference": ("subject", "author"),
    "Encounter": ("patient",),
    "Provenance": ("patient",),
    "RelatedPerson": ("patient",),
    "Task": ("patient",),
    "Binary": (),
}

Predicate = Callable[[Any], ColumnElement[bool]]


class ConsentFilter(Protocol):
    """The consent engine's answer for one request, computed inside its transaction."""

    def predicate(self, resource_type: str) -> Predicate | None:
        """SQL predicate over ``resources`` selecting the rows the consents permit (None:
        the type is not patient data, or the requester sees everything of it)."""

    def permits(self, conn: Connection, row: CurrentRow) -> bool:
        """Whether one stored row is permitted (same rule as :meth:`predicate`)."""

    async def permits_async(self, fetch: Fetch, row: CurrentRow) -> bool | None:
        """:meth:`permits` through single-row queries on an event-loop connection, where
        that decides it; None: only :meth:`permits` on a connection can."""


class ConsentEnforcer(Protocol):
    def filter_for(
        self, conn: Connection, access: AccessContext, now: int, *, lazy: bool = False
    ) -> ConsentFilter | None:
        """The request's consent filter; ``lazy``: the caller uses it only while ``conn``
        is open, so the enforcer may defer database work until a row needs it."""
        ...

    def filter_from_token(self, access: AccessContext, now: int) -> ConsentFilter | None:
        """A filter made without a connection, when the token alone names the requester's
        parties (it then decides rows through :meth:`ConsentFilter.permits_async`); None
        when the request needs :meth:`filter_for`."""
        ...


@dataclass(frozen=True, slots=True)
class Visibility:
    """The visibility rules of one request."""

    patient: str | None  # patient-compartment restriction (patient/ scopes), else None
    filtered_type: str | None = None  # the type that granular scope filters apply to
    filters: Predicate | None = None  # SMART v2 granular scope filters, as SQL
    consent: ConsentFilter | None = None  # the consent engine's filter for this request

    def restrict_for(self, resource_type: str) -> Predicate | None:
        """The SQL predicate over ``resources`` for rows of ``resource_type``, or None."""
        extra = self.filters if resource_type == self.filtered_type else None
        by_consent = self.consent.predicate(resource_type) if self.consent else None
        return _both(_both(self._compartment(resource_type), extra), by_consent)

    def _compartment(self, resource_type: str) -> Predicate | None:
        if self.patient is None or resource_type not in PATIENT_COMPARTMENT:
            return None
        pid = self.patient
        params = PATIENT_COMPARTMENT[resource_type]

        def predicate(table: Any) -> ColumnElement[bool]:
            r = idx_reference.c
            parts: list[ColumnElement[bool]] = []
            if resource_type == "Patient":
                parts.append(table.c.res_id == pid)
            if params:
                parts.append(
                    table.c.pk.in_(
                        sa.select(r.resource_pk).where(
                            r.res_type == resource_type,
                            r.param.in_(params),
                            r.target_type == "Patient",
                            r.target_id == pid,
                        )
                    )
                )
            return sa.or_(*parts) if parts else sa.false()

        return predicate

    def can_see(self, conn: Connection, row: CurrentRow) -> bool:
        """Whether one stored row is visible (same rules as searches)."""
        if not self._in_compartment(conn, row):
            return False
        extra = self.filters if row.res_type == self.filtered_type else None
        if extra is not None:
            found = conn.execute(
                sa.select(resources.c.pk).where(resources.c.pk == row.pk, extra(resources))
            ).first()
            if found is None:
                return False
        return self.consent is None or self.consent.permits(conn, row)

    async def can_see_async(self, fetch: Fetch, row: CurrentRow) -> bool | None:
        """:meth:`can_see` on an event-loop PostgreSQL connection (``fetch``), with the same
        rules and the same queries, where single-row queries decide it: None when a granular
        scope filter or the full consent filter is needed (the caller then takes the
        synchronous path, which decides everything)."""
        if self.patient is not None and row.res_type in PATIENT_COMPARTMENT:
            own = row.res_type == "Patient" and row.res_id == self.patient
            if not own:
                params = PATIENT_COMPARTMENT[row.res_type]
                if not params:
                    return False
                found = await fetch(
                    _COMPARTMENT_REFERENCE_PG_SQL,
                    (row.pk, row.res_type, list(params), self.patient),
                )
                if found is None:
                    return False
        if self.filters is not None and row.res_type == self.filtered_type:
            return None
        if self.consent is None:
            return True
        return await self.consent.permits_async(fetch, row)

    def _in_compartment(self, conn: Connection, row: CurrentRow) -> bool:
        """The row-level form of :meth:`_compartment`: the patient's own record, or a
        reference from this row to the patient in one of the type's compartment params."""
        if self.patient is None or row.res_type not in PATIENT_COMPARTMENT:
            return True
        if row.res_type == "Patient" and row.res_id == self.patient:
            return True
        params = PATIENT_COMPARTMENT[row.res_type]
        if not params:
            return False
        found = conn.execute(
            _COMPARTMENT_REFERENCE,
            {"pk": row.pk, "t": row.res_type, "params": list(params), "pid": self.patient},
        ).first()
        return found is not None

    def can_write(self, resource_type: str, index: IndexRows, res_id: str) -> bool:
        """Whether a new version (given its index rows) stays inside the visible set."""
        if self.patient is None or resource_type not in PATIENT_COMPARTMENT:
            return True
        if resource_type == "Patient" and res_id == self.patient:
            return True
        params = PATIENT_COMPARTMENT[resource_type]
        return any(
            ref.param in params and ref.target_type == "Patient" and ref.target_id == self.patient
            for ref in index.references
        )


_EVERYTHING = Visibility(patient=None)

#: Does row ``pk`` reference Patient ``pid`` in one of ``params``? (the compartment of one row)
_COMPARTMENT_REFERENCE = (
    sa.select(idx_reference.c.resource_pk)
    .where(
        idx_reference.c.resource_pk == sa.bindparam("pk"),
        idx_reference.c.res_type == sa.bindparam("t"),
        idx_reference.c.param.in_(sa.bindparam("params", expanding=True)),
        idx_reference.c.target_type == "Patient",
        idx_reference.c.target_id == sa.bindparam("pid"),
    )
    .limit(1)
)


#: :data:`_COMPARTMENT_REFERENCE` as driver SQL for an event-loop connection:
#: ``(pk, res_type, [params], pid)``.
_COMPARTMENT_REFERENCE_PG_SQL = (
    "SELECT resource_pk FROM idx_reference WHERE resource_pk = %s AND res_type = %s "
    "AND param = ANY(%s) AND target_type = 'Patient' AND target_id = %s LIMIT 1"
)


def visibility_for(
    access: AccessContext,
    decision: ScopeDecision | None = None,
    resource_type: str | None = None,
    now: int = 0,
    consent: ConsentFilter | None = None,
) -> Visibility:
    """Visibility for a request: patient-level access is confined to the token's patient,
    granular scopes filter ``resource_type``, and the consent filter applies on top."""
    if access.is_open or decision is None:
        return _EVERYTHING
    filters = _granular(resource_type, decision, now) if resource_type else None
    patient = None
    if decision.context is Context.PATIENT:
        patient = access.patient or "\x00no-patient-context"  # no context: matches nothing
    if patient is None and filters is None and consent is None:
        return _EVERYTHING
    return Visibility(
        patient=patient, filtered_type=resource_type, filters=filters, consent=consent
    )


def _nothing(_table: Any) -> ColumnElement[bool]:
    return sa.false()


def _granular(resource_type: str, decision: ScopeDecision, now: int) -> Predicate | None:
    """SMART v2 granular scopes (``patient/Observation.rs?category=…``): the alternatives, each
    a FHIR query, as one SQL predicate. A filter this server cannot apply allows nothing."""
    if not decision.restricted:
        return None
    groups: list[ColumnElement[bool]] = []
    for restriction in decision.restrictions:
        items = [(k, v) for k, values in restriction.items() for v in values]
        try:
            parsed = parse_search(resource_type, items, strict=True, now=now)
        except FHIRError:
            continue
        groups.append(conditions_predicate(parsed.spec.conditions, resource_type, now))
    if not groups:
        return _nothing
    combined = sa.or_(*groups)
    return lambda _table: combined


def _both(a: Predicate | None, b: Predicate | None) -> Predicate | None:
    if a is None or b is None:
        return a or b
    return lambda table: sa.and_(a(table), b(table))


def search_restrictions(
    access: AccessContext, primary_type: str, now: int, consent: ConsentFilter | None = None
) -> Callable[[str], Predicate | None]:
    """Per resource type, what a search (and its ``_include``s) may return: the scope check
    (search for the searched type, read for included types), the patient compartment, and
    granular scope filters — all as SQL."""

    def restrict_for(resource_type: str) -> Predicate | None:
        if access.scopes is None:
            return None
        interaction = Interaction.SEARCH if resource_type == primary_type else Interaction.READ
        decision = access.scopes.decide(resource_type, interaction)
        if not decision.allowed:
            return _nothing
        vis = visibility_for(access, decision, resource_type, now, consent)
        return vis.restrict_for(resource_type)

    return restrict_for
