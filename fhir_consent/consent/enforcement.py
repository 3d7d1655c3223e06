"""Consent enforcement on every path (consent.md §1, §3, §4): the :class:`ConsentEnforcement`
behind ``FHIRContext.consent``.

For each request, inside the request's own transaction (so a Consent revoked a moment ago is
already in force, consent.md §2.3), :meth:`ConsentEnforcement.filter_for`:

1. resolves the **requester set** (consent.md §1): the token's ``fhirUser``, the Organizations
   of that Practitioner's *active* PractitionerRoles (``active`` not false, ``period``
   containing the time of the request), and the Organization the client is registered to;
2. resolves the patients whose data the requester sees **as that patient** or as their **legal
   representative** (a RelatedPerson with GUARD, POWATT, DPOWATT or HPOWATT);
3. loads the applicable Consents of the *candidate* patients from the consent index
   (:mod:`fhir_consent.consent.tables`): patients with an active Consent that can permit anyone
   or names a member of the requester set. Nobody else's Consents can change the outcome;
4. compiles the decision into SQL (:mod:`fhir_consent.consent.sql`), which the FHIR layer ANDs
   into every search, include, count, history and ``$everything`` query, and checks single rows
   with (reads, vreads, instance history, updates and deletes).

Action: reads and searches are ``access``; a request in a write transaction (update, patch,
delete of an existing row) is ``correct`` (consent.md §3.3). Purpose of use: the token's,
replaced by an ``X-Purpose-Of-Use`` header (:class:`PurposeOfUse`). **Break-glass**
(consent.md §3): ETREAT from a clinician (``fhirUser`` Practitioner or PractitionerRole) where
:attr:`ConsentSettings.break_glass` is on; it never overrides an explicit deny naming the
requester, and :class:`~fhir_consent.consent.auditing.ConsentAuditSink` writes its AuditEvent
at once.

A denied direct read answers **404 Not Found**, exactly like a record that does not exist
(consent.md §4: do not confirm existence); the refusal is audited for the patient.

Compiled Consents are cached per (id, version): the set of Consents that apply is read anew
for every request, and a new version is never served from the cache.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from starlette.requests import Request

from fhir_consent.auth import AccessContext, Authenticator, Fetch, raw_header
from fhir_consent.consent._compile import CompiledConsent, _ref_of, compile_consent
from fhir_consent.consent._fhirtime import parse_fhir_time, us_to_datetime
from fhir_consent.consent._types import BREAK_GLASS_PURPOSE, AccessRequest, Decision, Ref
from fhir_consent.consent.config import ConsentSettings
from fhir_consent.consent.index import _walk, inquirers_of
from fhir_consent.consent.rules import decide, is_legal_representative, normalize_reference
from fhir_consent.consent.sql import (
    FACT_SOURCES,
    PATIENT_DATA_TYPES,
    Predicate,
    RequestConstants,
    SQLDecision,
    indexed_facts,
)
from fhir_consent.consent.tables import PARTY_ACTOR, consent_index, consent_party
from fhir_consent.errors import BadRequest
from fhir_consent.fhir import searchparams
from fhir_consent.store.repository import CurrentRow, Repository, VersionRow
from fhir_consent.store.tables import idx_reference, resources
from smart_on_fhir.scopes import Interaction

__all__ = [
    "ConsentBinaryAccess",
    "ConsentEnforcement",
    "Explanation",
    "PurposeOfUse",
    "RequestFilter",
    "current_filter",
    "search_patients",
]

_CLINICIANS: Final = ("Practitioner/", "PractitionerRole/")
_PURPOSE_RE: Final = re.compile(r"[A-Z][A-Z0-9]{1,31}")
_MAX_PURPOSES: Final = 8
_PARTIES_CACHE: Final = 4096


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why one row was (or was not) visible: for the audit trail (consent.md §6).

    ``reason`` is a :class:`~fhir_consent.consent.Reason` value, or ``inquirer`` (a clinic sees
    its own inquiry, consent.md §2); ``deciding`` are ``Consent/id/_history/v`` references.
    """

    permitted: bool
    reason: str
    deciding: tuple[str, ...] = ()
    patient: Ref | None = None


# ---------------------------------------------------------------------------------------------
# Per-request state shared with the audit sink
# ---------------------------------------------------------------------------------------------


class _RequestState:
    __slots__ = ("filter", "search_patients")

    def __init__(self) -> None:
        self.filter: RequestFilter | None = None
        self.search_patients: frozenset[Ref] = frozenset()


_state: ContextVar[_RequestState | None] = ContextVar("consent_request_state", default=None)


def current_filter() -> RequestFilter | None:
    """The consent filter of the current request, once the FHIR layer has computed it."""
    state = _state.get()
    return state.filter if state is not None else None


def search_patients() -> frozenset[Ref]:
    """Patients a search of the current request names (``patient=``/``subject=``), so that the
    patient sees the search in their log even when nothing of theirs was disclosed."""
    state = _state.get()
    return state.search_patients if state is not None else frozenset()


def _named_patients(request: Request) -> frozenset[Ref]:
    if not request.scope.get("query_string"):  # reads and creates: no parameters to parse
        return frozenset()
    out: set[Ref] = set()
    for key, raw in request.query_params.multi_items():
        name = key.split(":", 1)[0]
        if name not in ("patient", "subject"):
            continue
        for value in raw.split(","):
            value = value.strip()
            ref = normalize_reference(value) if "/" in value else f"Patient/{value}"
            if ref is not None and ref.startswith("Patient/") and len(ref) <= 80:
                out.add(ref)
    return frozenset(sorted(out)[:20])


class PurposeOfUse:
    """Wraps the FHIR layer's authenticator: an ``X-Purpose-Of-Use`` header (comma-separated
    v3-ActReason codes, e.g. ``ETREAT``) replaces the token's purpose of use (consent.md §3,
    break-glass), and the request gets the state the audit sink reads."""

    def __init__(self, inner: Authenticator) -> None:
        self.inner = inner

    async def __call__(self, request: Request) -> AccessContext:
        access = await self.inner(request)
        state = _RequestState()
        state.search_patients = _named_patients(request)
        _state.set(state)
        header = raw_header(request.scope, b"x-purpose-of-use")
        if header is None or access.is_open:
            return access
        raw = header.decode("latin-1")  # as request.headers decodes it
        codes = [c.strip() for c in raw.split(",") if c.strip()]
        if (
            not codes
            or len(codes) > _MAX_PURPOSES
            or not all(_PURPOSE_RE.fullmatch(c) for c in codes)
        ):
            raise BadRequest("X-Purpose-Of-Use must list v3-ActReason codes, e.g. ETREAT")
        return replace(access, purpose_of_use=frozenset(codes))


# ---------------------------------------------------------------------------------------------
# Compiled Consent cache (keyed by id and version: never stale)
# ---------------------------------------------------------------------------------------------


class _Compiled:
    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, int], CompiledConsent] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> CompiledConsent | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[str, int], value: CompiledConsent) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


# ---------------------------------------------------------------------------------------------
# The filter of one request
# ---------------------------------------------------------------------------------------------


class RequestFilter:
    """``fhir_consent.fhir.visibility.ConsentFilter`` for one request: SQL predicates per type,
    single-row checks with the same predicate, and :meth:`explain` for the audit trail.

    A filter made with ``build`` (``filter_for(..., lazy=True)``) loads and compiles the
    Consents only when something needs them: a row of the requester's own patient (the patient
    themself or one they legally represent) is visible whatever the Consents say (consent.md
    §3), so :meth:`permits` answers it from the requester set alone and remembers the decision
    for :meth:`explain`. Anything else builds the full filter on the request's connection,
    inside its transaction.
    """

    def __init__(
        self,
        sql: SQLDecision | None,
        *,
        fhir_user: Ref | None,
        break_glass_enabled: bool,
        build: Callable[[], SQLDecision] | None = None,
        requesters: frozenset[Ref] | None = None,
        own_patients: frozenset[Ref] | None = None,
    ) -> None:
        if sql is not None:
            requesters = sql.rc.requesters if requesters is None else requesters
            own_patients = sql.rc.own_patients if own_patients is None else own_patients
        if requesters is None or own_patients is None or (sql is None and build is None):
            raise ValueError("a lazy RequestFilter needs build, requesters and own_patients")
        self._sql = sql
        self._build = build
        self._requesters: frozenset[Ref] = requesters
        self._own: frozenset[Ref] = own_patients
        self.fhir_user = fhir_user
        self.break_glass_enabled = break_glass_enabled
        #: decisions taken without the Consents (own patient), by (type, id, version)
        self._decided: dict[tuple[str, str, int], Explanation] = {}

    @property
    def built(self) -> bool:
        """Whether the Consents have been loaded and compiled for this request."""
        return self._sql is not None

    @property
    def sql(self) -> SQLDecision:
        """The compiled decision (built on first use for a lazy filter)."""
        if self._sql is None:
            assert self._build is not None
            self._sql = self._build()
            self._build = None
        return self._sql

    @property
    def constants(self) -> RequestConstants:
        return self.sql.rc

    def with_dependents(self, dependents: Mapping[Ref, frozenset[Ref]]) -> RequestFilter:
        """The same filter with the ``dependents`` data references resolved elsewhere (a
        gateway resolves them against the upstream server, where those resources live); it
        replaces this one as the current request's filter (the audit trail explains with it)."""
        rc = replace(self.constants, dependents=dict(dependents))
        sql = SQLDecision(rc, self.sql.consents, self.sql.dialect)
        out = RequestFilter(
            sql, fhir_user=self.fhir_user, break_glass_enabled=self.break_glass_enabled
        )
        state = _state.get()
        if state is not None and state.filter is self:
            state.filter = out
        return out

    @property
    def consents(self) -> Mapping[Ref, Sequence[CompiledConsent]]:
        """The applicable Consents this filter decides with, per ``Patient/…``."""
        return self.sql.consents

    @property
    def requesters(self) -> frozenset[Ref]:
        """The requester set of consent.md §1."""
        return self._requesters

    @property
    def own_patients(self) -> frozenset[Ref]:
        """The patients the requester is, or legally represents (consent.md §3)."""
        return self._own

    def _own_patient(self, conn: Connection, row: CurrentRow) -> Ref | None:
        """The row's patient when it is one of the requester's own patients, else None.

        The same patient the SQL and :meth:`explain` judge by: the resource itself for
        Patient, otherwise the first patient reference among the type's patient parameters
        (in index order, which is extraction order). A row whose first patient is someone
        else is left to the full filter."""
        src = FACT_SOURCES.get(row.res_type)
        if src is None or not self._own:
            return None
        if src.self_patient:
            ref = f"Patient/{row.res_id}"
            return ref if ref in self._own else None
        if not src.patient:
            return None
        first = conn.execute(_FIRST_PATIENT, {"pk": row.pk, "params": list(src.patient)}).scalar()
        if first is None:
            return None
        ref = f"Patient/{first}"
        return ref if ref in self._own else None

    def _self_reason(self, patient: Ref) -> str:
        return "patient-self" if patient in self._requesters else "representative"

    async def permits_async(self, fetch: Fetch, row: CurrentRow) -> bool | None:
        """:meth:`permits` where that needs no consent build: on an event-loop connection
        (``fetch``, PostgreSQL), for rows that are not patient data or are the requester's
        own patient's (the first-patient look-up is the same query as on the request path).
        None: only the full filter can decide (the caller takes the synchronous path)."""
        if row.res_type not in PATIENT_DATA_TYPES:
            return True
        src = FACT_SOURCES.get(row.res_type)
        if src is None or row.deleted or not self._own:
            return None
        if src.self_patient:
            patient: Ref | None = f"Patient/{row.res_id}"
        elif src.patient:
            first = await fetch(_FIRST_PATIENT_PG_SQL, (row.pk, list(src.patient)))
            patient = f"Patient/{first[0]}" if first is not None else None
        else:
            return None
        if patient is None or patient not in self._own:
            return None
        key = (row.res_type, row.res_id, row.version_id)
        self._decided[key] = Explanation(True, self._self_reason(patient), patient=patient)
        return True

    def predicate(self, resource_type: str) -> Predicate | None:
        """SQL selecting the rows of ``resource_type`` the request may see (None: the type is
        not patient data and only scopes apply)."""
        return self.sql.predicate(resource_type)

    def permits(self, conn: Connection, row: CurrentRow) -> bool:
        """Whether one stored row is visible: the same SQL as searches (consent.md §4), with
        the requester's own patients decided first, without the Consents (consent.md §3)."""
        if row.res_type not in PATIENT_DATA_TYPES:
            return True
        if row.res_type in FACT_SOURCES and not row.deleted:
            patient = self._own_patient(conn, row)
            if patient is not None:
                key = (row.res_type, row.res_id, row.version_id)
                self._decided[key] = Explanation(True, self._self_reason(patient), patient=patient)
                return True
        predicate = self.predicate(row.res_type)
        if predicate is None:
            return True
        found = conn.execute(
            sa.select(resources.c.pk).where(resources.c.pk == row.pk, predicate(resources))
        ).first()
        return found is not None

    def explain(self, row: CurrentRow | VersionRow) -> Explanation | None:
        """The decision of consent.md §3 for one returned or refused row, in Python (the SQL
        and this agree; see the property tests). None: not patient data, or not decidable
        without the database (Binary)."""
        rtype = row.res_type
        if rtype not in PATIENT_DATA_TYPES or rtype == "Binary" or row.content is None:
            return None
        known = self._decided.get((rtype, row.res_id, row.version_id))
        if known is not None:
            return known  # decided on the request path (own patient): no re-parse
        resource = orjson.loads(row.content)
        rows = searchparams.extract(resource)
        if rtype != "AuditEvent" and self._sql is None:
            # a lazy filter that never needed the Consents: an older version of an own
            # patient's resource (vread, history), or a row the compartment refused before
            # consent was asked (nothing the Consents decided to explain)
            own = indexed_facts(rtype, row.res_id, rows).patient
            if own is not None and own in self._own:
                return Explanation(True, self._self_reason(own), patient=own)
            return None
        if rtype == "AuditEvent":
            mine = {
                f"Patient/{r.target_id}"
                for r in rows.references
                if r.param == "patient" and r.target_type == "Patient" and r.target_id
            } & self._own
            if not mine:
                return Explanation(False, "default-deny")
            patient = min(mine)
            return Explanation(True, self._self_reason(patient), patient=patient)
        rc = self.constants
        ref = f"{rtype}/{row.res_id}"
        referenced_by = frozenset(x for x, targets in rc.dependents.items() if ref in targets)
        facts = indexed_facts(rtype, row.res_id, rows, referenced_by)
        representatives = (
            frozenset({self.fhir_user})
            if self.fhir_user and facts.patient in rc.own_patients
            else frozenset()
        )
        consents = self.sql.consents.get(facts.patient or "", ())
        decision = decide(
            list(consents),
            AccessRequest(rc.requesters, rc.action, rc.purposes, at=us_to_datetime(rc.at)),
            facts,
            representatives=representatives,
            break_glass_enabled=self.break_glass_enabled,
        )
        deciding = tuple(
            f"Consent/{r.consent_id}"
            + (f"/_history/{r.consent_version}" if r.consent_version else "")
            for r in decision.deciding
            if r.consent_id
        )
        permitted = decision.decision is Decision.PERMIT
        if not permitted and rtype == "Consent" and inquirers_of(resource) & rc.requesters:
            return Explanation(True, "inquirer", patient=facts.patient)
        return Explanation(permitted, decision.reason.value, deciding, facts.patient)


#: The first patient reference of row ``pk`` among ``params`` (index order = extraction order).
_FIRST_PATIENT = (
    sa.select(idx_reference.c.target_id)
    .where(
        idx_reference.c.resource_pk == sa.bindparam("pk"),
        idx_reference.c.param.in_(sa.bindparam("params", expanding=True)),
        idx_reference.c.target_type == "Patient",
        idx_reference.c.target_id.is_not(None),
    )
    .order_by(idx_reference.c.id)
    .limit(1)
)


#: :data:`_FIRST_PATIENT` as driver SQL for an event-loop connection: ``(pk, [params])``.
_FIRST_PATIENT_PG_SQL: Final = (
    "SELECT target_id FROM idx_reference WHERE resource_pk = %s AND param = ANY(%s) "
    "AND target_type = 'Patient' AND target_id IS NOT NULL ORDER BY id LIMIT 1"
)


def _needs_database() -> SQLDecision:
    raise RuntimeError("a token-only consent filter cannot load Consents")


# ---------------------------------------------------------------------------------------------
# The enforcer
# ---------------------------------------------------------------------------------------------


def _content(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    data = value if isinstance(value, dict) else orjson.loads(value)
    return data if isinstance(data, dict) else None


def _in_period(period: object, now: int) -> bool:
    """Whether ``now`` lies in a FHIR Period (open ends allowed; malformed → False)."""
    if period is None:
        return True
    if not isinstance(period, Mapping):
        return False
    try:
        if period.get("start") is not None and parse_fhir_time(period["start"])[0] > now:
            return False
        if period.get("end") is not None and parse_fhir_time(period["end"])[1] < now:
            return False
    except ValueError:
        return False
    return True


class ConsentEnforcement:
    """``fhir_consent.fhir.visibility.ConsentEnforcer``: the consent filter of each request
    (consent.md §4), plus the helpers the workflow and the document store use."""

    def __init__(self, settings: ConsentSettings | None = None) -> None:
        self.settings = settings if settings is not None else ConsentSettings()
        self._compiled = _Compiled(self.settings.compiled_cache_size)
        #: how many times the Consents were loaded and compiled for a request (tests, metrics)
        self.builds = 0
        #: (fhirUser, client Organization) -> (requester set, own patients, user) for the
        #: requesters whose parties need no database (Patient users): pure functions of the
        #: token's claims, so never stale
        self._parties: OrderedDict[
            tuple[str | None, str | None], tuple[frozenset[Ref], frozenset[Ref], Ref | None]
        ] = OrderedDict()
        self._parties_lock = threading.Lock()

    def _token_parties(
        self, access: AccessContext
    ) -> tuple[frozenset[Ref], frozenset[Ref], Ref | None] | None:
        """Requester set, own patients and normalized ``fhirUser`` when the token alone
        decides them (a Patient user: consent.md §1 adds no PractitionerRole Organizations,
        §3 the patient themself), else None. Cached per claim values."""
        key = (access.fhir_user, access.client_organization)
        with self._parties_lock:
            hit = self._parties.get(key)
        if hit is not None:
            return hit
        user = normalize_reference(access.fhir_user)
        if user is None or not user.startswith("Patient/"):
            return None
        org = (
            normalize_reference(access.client_organization) if access.client_organization else None
        )
        requesters = frozenset({user} if org is None else {user, org})
        found = (requesters, frozenset({user}), user)
        with self._parties_lock:
            self._parties[key] = found
            while len(self._parties) > _PARTIES_CACHE:
                self._parties.popitem(last=False)
        return found

    def filter_from_token(self, access: AccessContext, now: int) -> RequestFilter | None:
        """A lazy consent filter made from the token alone, without a connection, when its
        parties need no database (see :meth:`_token_parties`): it decides the requester's own
        patients' rows (:meth:`RequestFilter.permits_async`) and explains them for the
        audit trail; anything else needs :meth:`filter_for` on a connection. Becomes the
        request's current filter. None when the token does not decide the parties."""
        if access.is_open:
            return None
        parties = self._token_parties(access)
        if parties is None:
            return None
        requesters, own, user = parties
        flt = RequestFilter(
            None,
            fhir_user=user,
            break_glass_enabled=False,  # a Patient user is no clinician (consent.md §3)
            build=_needs_database,
            requesters=requesters,
            own_patients=own,
        )
        state = _state.get()
        if state is not None:
            state.filter = flt
        return flt

    # -- parties (consent.md §1) ------------------------------------------------------------

    def requester_set(self, conn: Connection, access: AccessContext, now: int) -> frozenset[Ref]:
        """The token's ``fhirUser``, the Organizations of that Practitioner's active
        PractitionerRoles, and the client's Organization (consent.md §1)."""
        out: set[Ref] = set()
        user = normalize_reference(access.fhir_user)
        if user is not None:
            out.add(user)
        org = (
            normalize_reference(access.client_organization) if access.client_organization else None
        )
        if org is not None:
            out.add(org)
        if user is None:
            return frozenset(out)
        kind, _, uid = user.partition("/")
        if kind == "Practitioner":
            r = idx_reference.c
            roles = sa.select(r.resource_pk).where(
                r.res_type == "PractitionerRole",
                r.param == "practitioner",
                r.target_type == "Practitioner",
                r.target_id == uid,
            )
            contents: list[Any] = list(
                conn.execute(
                    sa.select(resources.c.content).where(
                        resources.c.pk.in_(roles), resources.c.deleted.is_(False)
                    )
                ).scalars()
            )
        elif kind == "PractitionerRole":
            row = Repository(conn).current("PractitionerRole", uid)
            contents = [row.content] if row is not None and not row.deleted else []
        else:
            return frozenset(out)
        for raw in contents:
            role = _content(raw)
            if role is None or role.get("active", True) is not True:
                continue
            if not _in_period(role.get("period"), now):
                continue
            ref = _ref_of(role.get("organization"))
            if ref is not None:
                out.add(ref)
        return frozenset(out)

    def own_patients(self, conn: Connection, access: AccessContext) -> frozenset[Ref]:
        """Patients whose data the requester sees as the patient or their legal representative
        (consent.md §3: "the patient and their representatives always see the patient's own
        data")."""
        user = normalize_reference(access.fhir_user)
        if user is None:
            return frozenset()
        kind, _, uid = user.partition("/")
        if kind == "Patient":
            return frozenset({user})
        if kind != "RelatedPerson":
            return frozenset()
        row = Repository(conn).current("RelatedPerson", uid)
        person = _content(row.content) if row is not None and not row.deleted else None
        if person is None:
            return frozenset()
        patient = _ref_of(person.get("patient"))
        if patient is None or not patient.startswith("Patient/"):
            return frozenset()
        return frozenset({patient}) if is_legal_representative(person, patient) else frozenset()

    # -- Consents -----------------------------------------------------------------------------

    def candidate_consents(
        self, conn: Connection, requesters: frozenset[Ref]
    ) -> dict[Ref, list[CompiledConsent]]:
        """The applicable Consents of every patient with an applicable Consent that can permit
        anyone or names a member of the requester set (:mod:`fhir_consent.consent.tables`)."""
        ci, cp = consent_index.c, consent_party.c
        named = sa.select(cp.resource_pk).where(
            cp.kind == PARTY_ACTOR, cp.ref.in_(sorted(requesters))
        )
        hit = sa.select(ci.patient_id).where(
            ci.applicable.is_(True),
            ci.patient_id.is_not(None),
            sa.or_(ci.reach_all.is_(True), ci.resource_pk.in_(named)),
        )
        return self._load(conn, ci.patient_id.in_(hit))

    def patient_consents(self, conn: Connection, patient: Ref) -> list[CompiledConsent]:
        """Every applicable Consent of one patient (``Patient/id``), in id order: what
        ``Consent/$decide`` decides over, so that implicit results name their Consents too
        (:mod:`fhir_consent.consent.decider`)."""
        kind, _, pid = patient.partition("/")
        if kind != "Patient" or not pid:
            return []
        return self._load(conn, consent_index.c.patient_id == pid).get(patient, [])

    def _load(
        self, conn: Connection, which: sa.ColumnElement[bool]
    ) -> dict[Ref, list[CompiledConsent]]:
        """The applicable Consents of the patients ``which`` selects, compiled once per
        (id, version) through the cache."""
        ci = consent_index.c
        rows = conn.execute(
            sa.select(ci.resource_pk, ci.consent_id, ci.version_id, ci.patient_id)
            .where(ci.applicable.is_(True), which)
            .order_by(ci.patient_id, ci.consent_id)
        ).all()
        found: dict[int, CompiledConsent] = {}
        missing: list[int] = []
        for pk, cid, version, _patient in rows:
            compiled = self._compiled.get((cid, version))
            if compiled is None:
                missing.append(pk)
            else:
                found[pk] = compiled
        if missing:
            for pk, rid, version, raw in conn.execute(
                sa.select(
                    resources.c.pk, resources.c.res_id, resources.c.version_id, resources.c.content
                ).where(resources.c.pk.in_(missing))
            ):
                compiled = compile_consent(_content(raw) or {})
                self._compiled.put((rid, version), compiled)
                found[pk] = compiled
        out: dict[Ref, list[CompiledConsent]] = {}
        for pk, _cid, _version, patient in rows:
            compiled = found.get(pk)
            if compiled is not None and compiled.applicable:
                out.setdefault(f"Patient/{patient}", []).append(compiled)
        return out

    @staticmethod
    def dependent_refs(consents: Mapping[Ref, Sequence[CompiledConsent]]) -> frozenset[Ref]:
        """Every ``data`` reference with meaning ``dependents`` in these Consents."""
        wanted: set[Ref] = set()
        for consents_of in consents.values():
            for c in consents_of:
                if c._root is None:
                    continue
                for n in _walk(c._root):
                    if n.data is not None:
                        wanted |= n.data.dependents
        return frozenset(wanted)

    @staticmethod
    def dependents(
        conn: Connection, consents: Mapping[Ref, Sequence[CompiledConsent]]
    ) -> dict[Ref, frozenset[Ref]]:
        """For each ``data`` reference with meaning ``dependents``: what it references (its
        searchable references), i.e. the resources that are its dependents (consent.md §3.3)."""
        wanted = set(ConsentEnforcement.dependent_refs(consents))
        if not wanted:
            return {}
        by_type: dict[str, set[str]] = {}
        for ref in wanted:
            t, _, i = ref.partition("/")
            by_type.setdefault(t, set()).add(i)
        r = idx_reference.c
        src = resources.c
        rows = conn.execute(
            sa.select(src.res_type, src.res_id, r.target_type, r.target_id)
            .select_from(idx_reference.join(resources, r.resource_pk == src.pk))
            .where(
                sa.or_(
                    *(
                        sa.and_(src.res_type == t, src.res_id.in_(sorted(ids)))
                        for t, ids in sorted(by_type.items())
                    )
                ),
                src.deleted.is_(False),
                r.target_type.is_not(None),
                r.target_id.is_not(None),
            )
        )
        out: dict[Ref, set[Ref]] = {ref: set() for ref in wanted}
        for stype, sid, ttype, tid in rows:
            out[f"{stype}/{sid}"].add(f"{ttype}/{tid}")
        return {k: frozenset(v) for k, v in out.items()}

    # -- the ConsentEnforcer seam -------------------------------------------------------------

    def filter_for(
        self, conn: Connection, access: AccessContext, now: int, *, lazy: bool = False
    ) -> RequestFilter | None:
        """The consent filter of one request, computed in its transaction (consent.md §4).

        ``lazy``: load and compile the Consents only when a row or a predicate needs them
        (the requester's own patients never do). Only for callers that use the filter while
        ``conn`` is still open (the FHIR layer's handlers): :meth:`RequestFilter.explain`
        afterwards answers from what was decided, never from the database."""
        if access.is_open:
            return None
        parties = self._token_parties(access)
        if parties is not None:
            requesters, own, user = parties
        else:
            requesters = self.requester_set(conn, access, now)
            own = self.own_patients(conn, access)
            user = normalize_reference(access.fhir_user)
        clinician = user is not None and user.startswith(_CLINICIANS)
        enabled = self.settings.break_glass and clinician

        def build() -> SQLDecision:
            self.builds += 1
            consents = self.candidate_consents(conn, requesters)
            purposes = frozenset(access.purpose_of_use) or frozenset({"TREAT"})
            write = bool(conn.get_execution_options().get("fhir_write", False))
            constants = RequestConstants(
                requesters=requesters,
                at=now,
                action="correct" if write else "access",
                purposes=purposes,
                own_patients=own,
                break_glass=enabled and BREAK_GLASS_PURPOSE in purposes,
                dependents=self.dependents(conn, consents),
            )
            return SQLDecision(constants, consents, conn.dialect.name)

        if lazy and own:
            flt = RequestFilter(
                None,
                fhir_user=user,
                break_glass_enabled=enabled,
                build=build,
                requesters=requesters,
                own_patients=own,
            )
        else:
            flt = RequestFilter(build(), fhir_user=user, break_glass_enabled=enabled)
        state = _state.get()
        if state is not None:
            state.filter = flt
        return flt


class ConsentBinaryAccess:
    """The document store's ``BinaryAccess`` with consents: the default scope/compartment check
    (``inner``) and then the Binary row's consent predicate — a Binary is visible with a
    permitted DocumentReference that points at it (consent.md §4, Binary content)."""

    def __init__(
        self,
        enforcement: ConsentEnforcement,
        clock: Callable[[], int],
        inner: Callable[[Connection, AccessContext, str, Interaction], bool] | None = None,
    ) -> None:
        self.enforcement = enforcement
        self.clock = clock
        self.inner = inner

    def __call__(
        self, conn: Connection, access: AccessContext, binary_id: str, interaction: Interaction
    ) -> bool:
        if self.inner is not None and not self.inner(conn, access, binary_id, interaction):
            return False
        flt = self.enforcement.filter_for(conn, access, self.clock())
        if flt is None:
            return True
        row = Repository(conn).current("Binary", binary_id)
        return row is not None and flt.permits(conn, row)
