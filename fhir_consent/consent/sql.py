"""The consent decision of one request, compiled into SQL over the search index (consent.md §3,
§4: "search results are filtered *before* paging and counting").

A request fixes the requester set, the time, the action and the purposes of use, so every
request-level criterion of every provision (``actor`` recipients, ``period``, ``action``,
``purpose``, and ``class`` against the searched type) is decided here, in Python, once. What is
left depends on the resource and becomes SQL over the index tables that the store writes for
every resource (:mod:`fhir_consent.fhir.searchparams`): custodian and author actors, ``code``,
MIME ``class``, ``securityLabel``, ``data`` and ``dataPeriod``. :data:`FACT_SOURCES` says, per
resource type, which index rows hold each fact; :func:`indexed_facts` reads the very same rows
into :class:`~fhir_consent.consent.ResourceFacts`, so the SQL and :func:`~fhir_consent.consent.
decide` judge one and the same resource (the property tests prove that they agree).

The rule of consent.md §3 becomes boolean algebra. For a provision *n* with match condition
*M*, decision *d* and children *c*::

    D(n) = M ∧ (∨ D(c) ∨ (d = deny ∧ ¬∨ P(c)))          the provision results in deny
    P(n) = M ∧ ¬∨ D(c) ∧ (∨ P(c) ∨ d = permit)           … in permit
    N(n) = M ∧ (∨ N(c) ∨ (d = deny ∧ h ∧ ¬∨ D(c) ∧ ¬∨ P(c)))   … in a deny that names a requester

(*h*: an actor of *n* or of a provision enclosing it is in the requester set). Over a patient's
Consents, with ``ED``/``EP`` the explicit deny/permit of each Consent and ``ID``/``IP`` the
implicit (unmatched root) ones::

    permit(patient) = ¬∨ED ∧ (∨EP ∨ (¬∨ID ∧ ∨IP))
    names(patient)  = ∨ N(root)

and a resource is visible when its patient is the requester (or one they legally represent),
or ``permit`` holds for its patient, or its custodian is in the requester set or break-glass
applies while ``names`` does not hold. Patients whose Consents reduce to the same residual
formula share one SQL term (``patient IN (…) AND residual``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, TypeAlias

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from fhir_consent.consent._compile import CompiledConsent, _mime, _Node
from fhir_consent.consent._fhirtime import (
    MAX_US,
    MIN_US,
    OPEN_END_US,
    OPEN_START_US,
    us_to_datetime,
)
from fhir_consent.consent._types import CONFIDENTIALITY_SYSTEM, Decision, Ref, ResourceFacts
from fhir_consent.consent.tables import PARTY_INQUIRER, consent_party
from fhir_consent.fhir.searchparams import IndexRows
from fhir_consent.store.tables import idx_date, idx_reference, idx_token, resources

__all__ = [
    "FACT_SOURCES",
    "PATIENT_DATA_TYPES",
    "Expr",
    "FactSource",
    "Predicate",
    "RequestConstants",
    "SQLDecision",
    "document_links",
    "indexed_facts",
]

Predicate: TypeAlias = Callable[[Any], ColumnElement[bool]]

# ---------------------------------------------------------------------------------------------
# Where each fact of consent.md §3.3 lives in the search index
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FactSource:
    """The search parameters whose index rows hold each fact of a resource (consent.md §3.3).

    ``patient``: reference parameters naming the patient (only ``Patient`` targets count);
    ``first_patient``: when several are possible, the first one written decides (Provenance
    ``target``, as :func:`~fhir_consent.consent.facts_from_resource` reads it); ``self_patient``:
    the resource *is* the patient. ``clinical``: date parameters, the first one present wins
    (DocumentReference: ``context.period``, else ``date``).
    """

    patient: tuple[str, ...] = ()
    first_patient: bool = False
    self_patient: bool = False
    custodian: tuple[str, ...] = ()
    authors: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()
    content_types: tuple[str, ...] = ()
    security: tuple[str, ...] = ("_security",)
    clinical: tuple[str, ...] = ()


#: Patient data decided by the Consents (consent.md §3), per resource type this server stores.
#: The columns mirror ``facts_from_resource``: ``custodian``; ``author``/``recorder``/
#: ``performer`` (Consent.performer, Provenance.agent.who); ``type``/``category``/``code``;
#: attachment content types; ``meta.security`` plus ``securityLabel``; the clinical date.
FACT_SOURCES: Final[Mapping[str, FactSource]] = MappingProxyType(
    {
        "DocumentReference": FactSource(
            patient=("patient",),
            custodian=("custodian",),
            authors=("author",),
            codes=("type", "category"),
            content_types=("contenttype",),
            security=("_security", "security-label"),
            clinical=("period", "date"),
        ),
        "Consent": FactSource(patient=("patient",), authors=("consentor",), codes=("category",)),
        "Encounter": FactSource(patient=("patient",), codes=("type",), clinical=("date",)),
        "Task": FactSource(
            patient=("patient",), codes=("code",), clinical=("period", "authored-on")
        ),
        "RelatedPerson": FactSource(patient=("patient",)),
        "Provenance": FactSource(
            patient=("patient",), first_patient=True, authors=("agent",), clinical=("recorded",)
        ),
        "Patient": FactSource(self_patient=True),
    }
)

#: Every type that holds a patient's data: :data:`FACT_SOURCES` plus the access log (visible to
#: the patient and their representatives, consent.md §6) and Binary content (visible with a
#: permitted DocumentReference that points at it, consent.md §4).
PATIENT_DATA_TYPES: Final = frozenset({*FACT_SOURCES, "AuditEvent", "Binary"})

#: The document store's DocumentReference → Binary links (``fhir_consent.documents.tables``),
#: named here without importing the document store.
document_links = sa.table(
    "document_links", sa.column("doc_id", sa.String), sa.column("binary_id", sa.String)
)

_DEFAULT_SECURITY: Final = frozenset({(CONFIDENTIALITY_SYSTEM, "N")})
_WHITESPACE: Final = " \t\n\r\f\v"


def _ref(target_type: str | None, target_id: str | None) -> Ref | None:
    return f"{target_type}/{target_id}" if target_type and target_id else None


def _clamp_dt(us: int) -> datetime:
    return us_to_datetime(min(max(us, OPEN_START_US), OPEN_END_US))


def indexed_facts(
    res_type: str, res_id: str, rows: IndexRows, referenced_by: frozenset[Ref] = frozenset()
) -> ResourceFacts:
    """The :class:`ResourceFacts` the SQL filter sees: read from the resource's index rows
    (``searchparams.extract``) through :data:`FACT_SOURCES`.

    It equals ``facts_from_resource`` except that references are the resource's *searchable*
    references (the ones ``_include``/``_revinclude`` follow) — ``data`` meanings ``related``
    and ``dependents`` follow those — and that an empty ``system`` counts as none (the index
    stores it so). Types outside :data:`FACT_SOURCES` get no patient and no facts.
    """
    src = FACT_SOURCES.get(res_type, FactSource(security=("_security",)))
    refs = [(r.param, _ref(r.target_type, r.target_id)) for r in rows.references]
    patient: Ref | None = None
    if src.self_patient:
        patient = f"Patient/{res_id}"
    else:
        for r in rows.references:
            if r.param in src.patient and r.target_type == "Patient" and r.target_id:
                patient = f"Patient/{r.target_id}"
                break
    custodian = next((ref for p, ref in refs if p in src.custodian and ref is not None), None)
    authors = frozenset(ref for p, ref in refs if p in src.authors and ref is not None)
    codes = frozenset(
        (t.system, t.code) for t in rows.tokens if t.param in src.codes and t.code is not None
    )
    ctypes = frozenset(
        _mime(t.code) for t in rows.tokens if t.param in src.content_types and t.code is not None
    )
    security = frozenset(
        (t.system, t.code) for t in rows.tokens if t.param in src.security and t.code is not None
    )
    clinical: tuple[datetime | None, datetime | None] | None = None
    for param in src.clinical:
        found = next((d for d in rows.dates if d.param == param), None)
        if found is not None:
            clinical = (_clamp_dt(found.low), _clamp_dt(found.high))
            break
    return ResourceFacts(
        ref=f"{res_type}/{res_id}",
        resource_type=res_type,
        patient=patient,
        custodian=custodian,
        authors=authors,
        codes=codes,
        content_types=ctypes,
        security_labels=security or _DEFAULT_SECURITY,
        clinical_period=clinical,
        references=frozenset(ref for _, ref in refs if ref is not None),
        referenced_by=referenced_by,
    )


# ---------------------------------------------------------------------------------------------
# Boolean expressions with constant folding
# ---------------------------------------------------------------------------------------------

Expr: TypeAlias = tuple[Any, ...]
"""``("T",)``, ``("F",)``, ``("atom", kind, *args)``, ``("and", frozenset)``, ``("or",
frozenset)`` or ``("not", expr)``: hashable, so equal residual formulas group patients."""

TRUE: Final[Expr] = ("T",)
FALSE: Final[Expr] = ("F",)


def _and(*items: Expr) -> Expr:
    out: set[Expr] = set()
    for e in items:
        if e == FALSE:
            return FALSE
        if e == TRUE:
            continue
        if e[0] == "and":
            out |= e[1]
        else:
            out.add(e)
    if not out:
        return TRUE
    if len(out) == 1:
        return next(iter(out))
    return ("and", frozenset(out))


def _or(*items: Expr) -> Expr:
    out: set[Expr] = set()
    for e in items:
        if e == TRUE:
            return TRUE
        if e == FALSE:
            continue
        if e[0] == "or":
            out |= e[1]
        else:
            out.add(e)
    if not out:
        return FALSE
    if len(out) == 1:
        return next(iter(out))
    return ("or", frozenset(out))


def _not(e: Expr) -> Expr:
    if e == TRUE:
        return FALSE
    if e == FALSE:
        return TRUE
    if e[0] == "not":
        inner: Expr = e[1]
        return inner
    return ("not", e)


def _const(value: bool) -> Expr:
    return TRUE if value else FALSE


def _size(e: Expr, memo: dict[Expr, int]) -> int:
    """Nodes of the expression once written out as SQL (shared parts count every time)."""
    found = memo.get(e)
    if found is not None:
        return found
    kind = e[0]
    if kind in ("and", "or"):
        n = 1 + sum(_size(x, memo) for x in e[1])
    elif kind == "not":
        n = 1 + _size(e[1], memo)
    else:
        n = 1
    memo[e] = n
    return n


#: Beyond this many SQL nodes for one patient, the patient's data is treated as not permitted
#: for the request and their Consents as naming the requester (the safe side): a provision
#: tree nested 16 deep can double the formula at every level.
MAX_FORMULA = 4_000


# ---------------------------------------------------------------------------------------------
# Compiling one patient's Consents for one request and resource type
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestConstants:
    """What a request fixes (consent.md §1 requester set, §3.3 action/purpose, time).

    ``own_patients``: the ``Patient/…`` references whose data the requester sees as that
    patient or their legal representative. ``dependents``: for each ``data`` reference with
    meaning ``dependents`` in the loaded Consents, the references that resource holds (a
    resource is a dependent of *X* when *X* references it).
    """

    requesters: frozenset[Ref]
    at: int
    action: str = "access"
    purposes: frozenset[str] = frozenset({"TREAT"})
    own_patients: frozenset[Ref] = frozenset()
    break_glass: bool = False
    dependents: Mapping[Ref, frozenset[Ref]] = field(default_factory=dict)


class _Compiler:
    """consent.md §3.3-3.5 for one resource type: provisions → (M, D, P, N) formulas."""

    def __init__(self, rtype: str, src: FactSource, rc: RequestConstants) -> None:
        self.rtype = rtype
        self.src = src
        self.rc = rc
        self.prefix = rtype + "/"

    def _ids(self, refs: Iterable[Ref]) -> frozenset[str]:
        n = len(self.prefix)
        return frozenset(r[n:] for r in refs if r.startswith(self.prefix))

    def match(self, n: _Node) -> Expr:
        """The provision's match condition; request-level criteria fold to constants."""
        rc, src = self.rc, self.src
        if n.recipients is not None and n.recipients.isdisjoint(rc.requesters):
            return FALSE
        if not n.lo <= rc.at <= n.hi:
            return FALSE
        if n.actions is not None and rc.action not in n.actions:
            return FALSE
        if n.purposes is not None and n.purposes.isdisjoint(rc.purposes):
            return FALSE
        parts: list[Expr] = []
        if n.has_class and self.rtype not in n.cls_types:
            if not n.cls_mimes or not src.content_types:
                return FALSE
            parts.append(("atom", "mime", n.cls_mimes))
        if n.extra:
            if n.custodians is not None:
                if not src.custodian:
                    return FALSE
                parts.append(("atom", "cust", n.custodians))
            if n.authors is not None:
                if not src.authors:
                    return FALSE
                parts.append(("atom", "auth", n.authors))
            if n.codes is not None:
                if not src.codes or not n.codes:
                    return FALSE
                parts.append(("atom", "code", n.codes))
            if n.security is not None:
                if not n.security:
                    return FALSE
                parts.append(("atom", "sec", n.security))
            if n.data is not None:
                parts.append(self._data(n))
            if n.dp_lo != MIN_US or n.dp_hi != MAX_US:
                if not src.clinical:
                    return FALSE
                parts.append(("atom", "dp", n.dp_lo, n.dp_hi))
        return _and(*parts)

    def _data(self, n: _Node) -> Expr:
        rule = n.data
        assert rule is not None
        parts: list[Expr] = []
        ids = self._ids(rule.instance | rule.related | rule.dependents)
        for x in rule.dependents:
            ids |= self._ids(self.rc.dependents.get(x, frozenset()))
        if ids:
            parts.append(("atom", "ids", ids))
        if rule.related:
            parts.append(("atom", "refto", rule.related))
        if rule.authored and self.src.authors:
            parts.append(("atom", "auth", rule.authored))
        return _or(*parts)

    def node(self, n: _Node, inherited: frozenset[Ref]) -> tuple[Expr, Expr, Expr, Expr]:
        """(M, D, P, N) of a provision; see the module docstring."""
        m = self.match(n)
        if m == FALSE:
            return FALSE, FALSE, FALSE, FALSE
        here = inherited | n.actor_refs
        kids = [self.node(c, here) for c in n.children]
        any_d = _or(*(k[1] for k in kids))
        any_p = _or(*(k[2] for k in kids))
        any_n = _or(*(k[3] for k in kids))
        deny = n.d is Decision.DENY
        d = _and(m, _or(any_d, _and(_const(deny), _not(any_p))))
        p = _and(m, _not(any_d), _or(any_p, _const(not deny)))
        names = deny and not here.isdisjoint(self.rc.requesters)
        nm = _and(m, _or(any_n, _and(_const(names), _not(any_d), _not(any_p))))
        return m, d, p, nm

    def patient(self, consents: Sequence[CompiledConsent]) -> tuple[Expr, Expr]:
        """(permit, names) over all of one patient's applicable Consents (consent.md §3)."""
        ed: list[Expr] = []
        ep: list[Expr] = []
        idn: list[Expr] = []
        ipm: list[Expr] = []
        nm: list[Expr] = []
        for c in consents:
            root = c._root
            implicit = idn if c.base is Decision.DENY else ipm
            if root is None:
                implicit.append(TRUE)
                continue
            m, d, p, n = self.node(root, frozenset())
            ed.append(d)
            ep.append(p)
            implicit.append(_not(m))
            nm.append(n)
        permit = _and(_not(_or(*ed)), _or(_or(*ep), _and(_not(_or(*idn)), _or(*ipm))))
        names = _or(*nm)
        memo: dict[Expr, int] = {}
        if _size(permit, memo) + _size(names, memo) > MAX_FORMULA:
            return FALSE, TRUE
        return permit, names


class SQLDecision:
    """The consent filter of one request as SQL predicates, one per resource type.

    ``consents`` maps ``Patient/…`` references to that patient's applicable Consents (the
    candidate patients of :mod:`fhir_consent.consent.enforcement`; other patients' Consents can
    neither permit nor name the requester). ``dialect`` is the database dialect name.
    """

    def __init__(
        self,
        rc: RequestConstants,
        consents: Mapping[Ref, Sequence[CompiledConsent]],
        dialect: str,
    ) -> None:
        self.rc = rc
        self.consents = consents
        self.dialect = dialect
        self._exprs: dict[str, Expr | None] = {}

    def expr(self, rtype: str) -> Expr | None:
        """The visibility formula for rows of ``rtype`` (None: not patient data)."""
        if rtype in self._exprs:
            return self._exprs[rtype]
        found = self._build(rtype)
        self._exprs[rtype] = found
        return found

    def _own(self) -> frozenset[str]:
        return frozenset(p[len("Patient/") :] for p in self.rc.own_patients)

    def _build(self, rtype: str) -> Expr | None:
        rc = self.rc
        if rtype == "AuditEvent":
            own = self._own()
            return ("atom", "aepat", own) if own else FALSE
        if rtype == "Binary":
            documents = self.expr("DocumentReference")
            return _or(_const(rc.break_glass), ("atom", "bin", documents or TRUE))
        src = FACT_SOURCES.get(rtype)
        if src is None:
            return None
        compiler = _Compiler(rtype, src, rc)
        custodian = ("atom", "cust", rc.requesters) if src.custodian and rc.requesters else FALSE
        exception = _or(custodian, _const(rc.break_glass))
        groups: dict[Expr, set[str]] = {}
        grouped: set[str] = set()
        for patient, consents in self.consents.items():
            if patient in rc.own_patients or not consents:
                continue
            permit, names = compiler.patient(consents)
            pid = patient[len("Patient/") :]
            grouped.add(pid)
            # this patient's resources: the Consents permit, or the custodian/break-glass
            # exception holds and no explicit deny names the requester (consent.md §3)
            visible = _or(permit, _and(exception, _not(names)))
            if visible != FALSE:
                groups.setdefault(visible, set()).add(pid)
        own = self._own()
        terms: list[Expr] = [("atom", "pat", own)] if own else []
        for visible, ids in groups.items():
            terms.append(_and(("atom", "pat", frozenset(ids)), visible))
        # everyone else's resources: no Consent can permit or name the requester
        others = _not(("atom", "pat", frozenset(grouped))) if grouped else TRUE
        terms.append(_and(exception, others))
        result = _or(*terms)
        if rtype == "Consent" and rc.requesters:
            result = _or(result, ("atom", "inq", rc.requesters))  # consent.md §2: own inquiries
        return result

    def predicate(self, rtype: str) -> Predicate | None:
        """The SQL predicate over ``resources`` (or an alias of it) for rows of ``rtype``."""
        e = self.expr(rtype)
        if e is None:
            return None
        src = FACT_SOURCES.get(rtype, FactSource())
        dialect = self.dialect

        def predicate(table: Any) -> ColumnElement[bool]:
            return _rendered(rtype, src, e, table, dialect)

        return predicate


# ---------------------------------------------------------------------------------------------
# Rendering formulas as SQL
# ---------------------------------------------------------------------------------------------

_R = idx_reference.c
_T = idx_token.c
_D = idx_date.c
#: ``target_type`` with any index on it disabled (``target_type || ''``): a correlated look-up
#: must probe ``(resource_pk, param)``; SQLite, which plans without statistics, would otherwise
#: walk every reference to a popular target (all of a patient's resources) for every row.
_TARGET_TYPE: Final = _R.target_type.concat("")
_DOC = resources.alias("consent_doc")  # the DocumentReferences a Binary hangs on
_RENDERED: OrderedDict[tuple[Any, ...], ColumnElement[bool]] = OrderedDict()
_RENDERED_LOCK = threading.Lock()
_RENDERED_MAX = 4_096


def _rendered(
    rtype: str, src: FactSource, e: Expr, table: Any, dialect: str
) -> ColumnElement[bool]:
    """The SQL of a formula, built once per (type, formula, table, dialect): SQLAlchemy
    expressions are immutable, so requests with the same decision share one (and so share
    SQLAlchemy's compiled-statement cache). Formulas hold no request state but their values."""
    key = (rtype, e, table.name, dialect)
    with _RENDERED_LOCK:
        found = _RENDERED.get(key)
        if found is not None:
            _RENDERED.move_to_end(key)
            return found
    built: ColumnElement[bool] = _Render(rtype, src, table, dialect).sql(e)
    if table is not resources and table is not _DOC:
        return built  # an alias we do not know: not cached
    with _RENDERED_LOCK:
        _RENDERED[key] = built
        while len(_RENDERED) > _RENDERED_MAX:
            _RENDERED.popitem(last=False)
    return built


class _Render:
    """One formula for one resource type over one ``resources`` table (or alias).

    Every resource-level criterion is a *correlated* ``EXISTS`` on the index table's
    ``(resource_pk, param)`` index: it costs one index probe per candidate row, whatever the
    size of the database (an uncorrelated ``IN`` would materialize, say, every PSY-labelled
    document of every patient for each query).
    """

    def __init__(self, rtype: str, src: FactSource, table: Any, dialect: str) -> None:
        self.rtype = rtype
        self.src = src
        self.dialect = dialect
        self.pk: ColumnElement[int] = table.c.pk
        self.res_id: ColumnElement[str] = table.c.res_id

    def sql(self, e: Expr) -> Any:
        kind = e[0]
        if kind == "T":
            return sa.true()
        if kind == "F":
            return sa.false()
        if kind == "and":
            return sa.and_(*(self.sql(x) for x in _ordered(e[1])))
        if kind == "or":
            return sa.or_(*(self.sql(x) for x in _ordered(e[1])))
        if kind == "not":
            return sa.not_(self.sql(e[1]))
        return self.atom(e[1], e[2:])

    # -- index look-ups ---------------------------------------------------------------------

    def _exists(self, table: sa.Table, *where: ColumnElement[bool]) -> ColumnElement[bool]:
        return sa.exists().where(table.c.resource_pk == self.pk, *where)

    def _refs(self, params: Sequence[str] | None, refs: Iterable[Ref]) -> ColumnElement[bool]:
        by_type: dict[str, set[str]] = {}
        for ref in refs:
            rtype, _, rid = ref.partition("/")
            by_type.setdefault(rtype, set()).add(rid)
        pairs = sa.or_(
            *(
                sa.and_(_TARGET_TYPE == t, _R.target_id.in_(sorted(ids)))
                for t, ids in sorted(by_type.items())
            )
        )
        if params is None:
            return self._exists(idx_reference, pairs)
        return self._exists(idx_reference, _R.param.in_(params), pairs)

    def _tokens(
        self, params: Sequence[str], pairs: Iterable[tuple[str | None, str]]
    ) -> ColumnElement[bool]:
        by_system: dict[str | None, set[str]] = {}
        for system, code in pairs:
            by_system.setdefault(system, set()).add(code)
        ors = [
            sa.and_(
                _T.system.is_(None) if system is None else _T.system == system,
                _T.code.in_(sorted(codes)),
            )
            for system, codes in sorted(by_system.items(), key=lambda kv: kv[0] or "")
        ]
        return self._exists(idx_token, _T.param.in_(params), sa.or_(*ors))

    def _patient_in(self, ids: frozenset[str]) -> ColumnElement[bool]:
        ordered = sorted(ids)
        if not ordered:
            return sa.false()
        if self.src.self_patient:
            return self.res_id.in_(ordered)
        if self.src.first_patient:
            first = (
                sa.select(_R.target_id)
                .where(
                    _R.resource_pk == self.pk,
                    _R.param.in_(self.src.patient),
                    _R.target_type == "Patient",
                )
                .order_by(_R.id)
                .limit(1)
                .scalar_subquery()
            )
            # a row with no patient has a NULL first patient: ``NULL IN (…)`` is NULL, and so
            # is its negation ("everyone else's resources"), which dropped such rows from
            # break-glass and custodian access; '' is no FHIR id, so it is in no list
            return sa.func.coalesce(first, "").in_(ordered)
        return self._exists(
            idx_reference,
            _R.param.in_(self.src.patient),
            _TARGET_TYPE == "Patient",
            _R.target_id.in_(ordered),
        )

    def _mime(self) -> ColumnElement[str]:
        """``_mime(code)`` in SQL: the part before ``;``, trimmed, lower-cased."""
        code = _T.code
        pos = (
            sa.func.strpos(code, ";") if self.dialect == "postgresql" else sa.func.instr(code, ";")
        )
        head = sa.case((pos > 0, sa.func.substr(code, 1, pos - 1)), else_=code)
        return sa.func.lower(sa.func.rtrim(sa.func.ltrim(head, _WHITESPACE), _WHITESPACE))

    def _clinical(self, lo: int, hi: int) -> ColumnElement[bool]:
        bounds: list[ColumnElement[bool]] = []
        if lo > OPEN_START_US:
            bounds.append(_D.low >= lo)
        if hi < OPEN_END_US:
            bounds.append(_D.high <= hi)
        ors: list[ColumnElement[bool]] = []
        earlier: list[ColumnElement[bool]] = []
        for param in self.src.clinical:  # the first parameter present decides
            ors.append(sa.and_(*earlier, self._exists(idx_date, _D.param == param, *bounds)))
            earlier.append(sa.not_(self._exists(idx_date, _D.param == param)))
        return sa.or_(*ors)

    def atom(self, kind: str, args: tuple[Any, ...]) -> ColumnElement[bool]:
        src = self.src
        if kind == "pat":
            return self._patient_in(args[0])
        if kind == "ids":
            return self.res_id.in_(sorted(args[0]))
        if kind == "cust":
            return self._refs(src.custodian, args[0])
        if kind == "auth":
            return self._refs(src.authors, args[0])
        if kind == "refto":
            return self._refs(None, args[0])
        if kind == "code":
            return self._tokens(src.codes, args[0])
        if kind == "sec":
            pairs: frozenset[tuple[str | None, str]] = args[0]
            hit = self._tokens(src.security, pairs)
            if not pairs & _DEFAULT_SECURITY:
                return hit
            labelled = self._exists(idx_token, _T.param.in_(src.security), _T.code.is_not(None))
            return sa.or_(hit, sa.not_(labelled))  # none at all counts as N (§3.3)
        if kind == "mime":
            return self._exists(
                idx_token, _T.param.in_(src.content_types), self._mime().in_(sorted(args[0]))
            )
        if kind == "dp":
            return self._clinical(args[0], args[1])
        if kind == "inq":
            p = consent_party.c
            return sa.exists().where(
                p.resource_pk == self.pk, p.kind == PARTY_INQUIRER, p.ref.in_(sorted(args[0]))
            )
        if kind == "aepat":
            return self._exists(
                idx_reference,
                _R.param == "patient",
                _TARGET_TYPE == "Patient",
                _R.target_id.in_(sorted(args[0])),
            )
        if kind == "bin":
            d = _DOC
            links = document_links.c
            documents = _rendered(
                "DocumentReference", FACT_SOURCES["DocumentReference"], args[0], d, self.dialect
            )
            return (
                sa.exists()
                .select_from(
                    document_links.join(
                        d,
                        sa.and_(d.c.res_type == "DocumentReference", d.c.res_id == links.doc_id),
                    )
                )
                .where(links.binary_id == self.res_id, d.c.deleted.is_(False), documents)
            )
        raise ValueError(kind)


def _ordered(items: frozenset[Expr]) -> list[Expr]:
    """A stable order for a formula's parts (the same SQL text for the same formula)."""
    return sorted(items, key=repr)
