"""Search as SQL: a parsed :class:`SearchSpec` becomes one query over the index tables.

Every condition is a semi-join (``pk IN (SELECT resource_pk FROM idx_… WHERE …)``) on an
indexed table; values OR within a parameter and AND across parameters (R4 search.html §2.1.1.3).
Paging is keyset-based on the sort key plus the resource's surrogate ``pk``, so pages stay
stable while other requests insert (no skipped or repeated entries), and ``restrict`` — a SQL
predicate supplied by the caller (e.g. the consent engine) — is applied *inside* the query, so
``total`` and paging never count a row the requester may not see.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from fhir_consent.fhir.searchparams import DateQuery, ReferenceQuery, TokenQuery
from fhir_consent.store.repository import CurrentRow
from fhir_consent.store.tables import idx_date, idx_reference, idx_string, idx_token, resources

__all__ = [
    "Cursor",
    "CursorError",
    "DateCond",
    "IdCond",
    "LastUpdatedCond",
    "MissingCond",
    "ReferenceCond",
    "SearchPage",
    "SearchSpec",
    "SortKey",
    "StringCond",
    "TokenCond",
    "conditions_predicate",
    "count_only",
    "date_predicate",
    "run_search",
]

MIN_TIME = -(2**62)
MAX_TIME = 2**62


@dataclass(frozen=True, slots=True)
class TokenCond:
    param: str
    queries: tuple[TokenQuery, ...]
    negate: bool = False  # :not
    text: tuple[str, ...] = ()  # :text (normalized prefixes)


@dataclass(frozen=True, slots=True)
class StringCond:
    param: str
    values: tuple[str, ...]  # normalized for prefix/contains, as written for exact
    mode: str = "prefix"  # prefix | exact | contains


@dataclass(frozen=True, slots=True)
class ReferenceCond:
    param: str
    queries: tuple[ReferenceQuery, ...]


@dataclass(frozen=True, slots=True)
class DateCond:
    param: str
    queries: tuple[DateQuery, ...]


@dataclass(frozen=True, slots=True)
class MissingCond:
    param: str
    table: str  # token | string | reference | date
    missing: bool


@dataclass(frozen=True, slots=True)
class IdCond:
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LastUpdatedCond:
    queries: tuple[DateQuery, ...]


Condition = (
    TokenCond | StringCond | ReferenceCond | DateCond | MissingCond | IdCond | LastUpdatedCond
)


@dataclass(frozen=True, slots=True)
class SortKey:
    """``key`` is ``_id``, ``_lastUpdated`` or ``date:<param>`` / ``string:<param>`` /
    ``token:<param>``."""

    key: str
    descending: bool = False


@dataclass(frozen=True, slots=True)
class Cursor:
    """Position after (``forward``) or before (backward) the row with these sort values."""

    values: tuple[Any, ...]
    forward: bool = True

    def encode(self) -> str:
        raw = orjson.dumps({"v": list(self.values), "f": self.forward})
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str, arity: int) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            data = orjson.loads(raw)
            values = tuple(data["v"])
            forward = bool(data["f"])
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            raise CursorError() from None
        if len(values) != arity or not all(
            isinstance(v, int | str) and not isinstance(v, bool) for v in values
        ):
            raise CursorError()
        return cls(values, forward)


class CursorError(ValueError):
    """A paging cursor that this query did not produce."""


@dataclass(slots=True)
class SearchSpec:
    resource_type: str
    conditions: list[Condition] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    count: int = 20
    cursor: str | None = None
    want_total: bool = True
    now: int = 0  # for the ``ap`` prefix
    restrict: Callable[[Any], ColumnElement[bool]] | None = None


@dataclass(slots=True)
class SearchPage:
    rows: list[CurrentRow]
    total: int | None
    next_cursor: str | None
    prev_cursor: str | None


R = resources.c


def date_predicate(
    q: DateQuery, low: ColumnElement[int], high: ColumnElement[int], now: int = 0
) -> ColumnElement[bool]:
    """R4 search.html §2.1.1.4 prefixes over a stored inclusive range [low, high]."""
    contained = sa.and_(low >= q.low, high <= q.high)
    match q.prefix:
        case "eq":
            return contained
        case "ne":
            return sa.or_(low < q.low, high > q.high)
        case "gt":
            return high > q.high
        case "lt":
            return low < q.low
        case "ge":
            return sa.or_(high > q.high, contained)
        case "le":
            return sa.or_(low < q.low, contained)
        case "sa":
            return low > q.high
        case "eb":
            return high < q.low
        case "ap":
            # "approximately": overlap with the value widened by 10% of its distance from now
            # (at least one day), as the R4 text suggests.
            gap = max(abs(now - q.low) // 10, 86_400_000_000)
            return sa.and_(low <= q.high + gap, high >= q.low - gap)
    raise ValueError(q.prefix)


def _in_index(
    table: sa.Table, param: str, res_type: str, *where: Any, correlated: bool = False
) -> ColumnElement[bool]:
    """``pk IN (SELECT resource_pk FROM idx_… WHERE …)``, or with ``correlated`` the
    equivalent ``EXISTS (… WHERE resource_pk = resources.pk …)``, which SQLite checks per
    candidate row through the ``(resource_pk, param)`` index instead of materialising every
    index row of the parameter (PostgreSQL plans both as the same semi-join)."""
    if correlated:
        return sa.exists().where(
            table.c.resource_pk == R.pk, table.c.param == param, *where
        )
    sub = sa.select(table.c.resource_pk).where(
        table.c.res_type == res_type, table.c.param == param, *where
    )
    return R.pk.in_(sub)


def _token_match(q: TokenQuery) -> ColumnElement[bool]:
    t = idx_token.c
    parts: list[ColumnElement[bool]] = []
    if q.code is not None:
        parts.append(t.code == q.code)
    if q.system_must_be_absent:
        parts.append(t.system.is_(None))
    elif q.system is not None:
        parts.append(t.system == q.system)
    return sa.and_(*parts) if parts else sa.true()


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _condition(
    cond: Condition, res_type: str, now: int, correlated: bool = False
) -> ColumnElement[bool]:
    c = correlated
    match cond:
        case IdCond(ids):
            return R.res_id.in_(list(ids))
        case LastUpdatedCond(queries):
            return sa.or_(
                *(date_predicate(q, R.last_updated, R.last_updated, now) for q in queries)
            )
        case TokenCond(param, queries, negate, text):
            t = idx_token.c
            ors: list[ColumnElement[bool]]
            if text:
                ors = [t.text.like(_like_escape(v) + "%", escape="\\") for v in text]
            else:
                ors = [_token_match(q) for q in queries]
            inner = _in_index(idx_token, param, res_type, sa.or_(*ors), correlated=c)
            return sa.not_(inner) if negate else inner
        case StringCond(param, values, mode):
            s = idx_string.c
            sors: list[ColumnElement[bool]]
            if mode == "exact":
                sors = [s.exact == v for v in values]
            elif mode == "contains":
                sors = [s.value.like("%" + _like_escape(v) + "%", escape="\\") for v in values]
            else:
                sors = [s.value.like(_like_escape(v) + "%", escape="\\") for v in values]
            return _in_index(idx_string, param, res_type, sa.or_(*sors), correlated=c)
        case ReferenceCond(param, queries):
            r = idx_reference.c
            rors: list[ColumnElement[bool]] = []
            for q in queries:
                if q.target_id is not None:
                    part: list[ColumnElement[bool]] = [r.target_id == q.target_id]
                    if q.target_type is not None:
                        part.append(r.target_type == q.target_type)
                    rors.append(sa.and_(*part))
                elif q.url is not None:
                    rors.append(r.url == q.url)
            return _in_index(
                idx_reference, param, res_type, sa.or_(*rors) if rors else sa.false(), correlated=c
            )
        case DateCond(param, queries):
            d = idx_date.c
            return _in_index(
                idx_date,
                param,
                res_type,
                sa.or_(*(date_predicate(q, d.low, d.high, now) for q in queries)),
                correlated=c,
            )
        case MissingCond(param, table, missing):
            tbl = {
                "token": idx_token,
                "string": idx_string,
                "reference": idx_reference,
                "date": idx_date,
            }[table]
            present = _in_index(tbl, param, res_type, correlated=c)
            return sa.not_(present) if missing else present
    raise TypeError(type(cond).__name__)


def _sort_expr(key: SortKey, res_type: str) -> ColumnElement[Any]:
    if key.key == "_id":
        return R.res_id
    if key.key == "_lastUpdated":
        return R.last_updated
    kind, _, param = key.key.partition(":")
    default: int | str
    if kind == "date":
        col = idx_date.c.high if key.descending else idx_date.c.low
        agg = sa.func.max(col) if key.descending else sa.func.min(col)
        table, default = idx_date, (MIN_TIME if key.descending else MAX_TIME)
    elif kind == "string":
        agg, table, default = sa.func.min(idx_string.c.value), idx_string, ""
    else:
        agg, table, default = sa.func.min(idx_token.c.code), idx_token, ""
    sub = (
        sa.select(agg).where(table.c.resource_pk == R.pk, table.c.param == param).scalar_subquery()
    )
    return sa.func.coalesce(sub, default)


def _after(
    exprs: Sequence[ColumnElement[Any]], desc: Sequence[bool], values: Sequence[Any], forward: bool
) -> ColumnElement[bool]:
    """Rows strictly after (or before) ``values`` in the (mixed-direction) sort order."""
    ors = []
    for i, (expr, d) in enumerate(zip(exprs, desc, strict=True)):
        later = (expr < values[i]) if (d == forward) else (expr > values[i])
        eqs = [exprs[j] == values[j] for j in range(i)]
        ors.append(sa.and_(*eqs, later))
    return sa.or_(*ors)


def conditions_predicate(
    conditions: Sequence[Condition], res_type: str, now: int = 0
) -> ColumnElement[bool]:
    """All ``conditions`` (ANDed) as one predicate over ``resources``."""
    return sa.and_(sa.true(), *(_condition(c, res_type, now) for c in conditions))


#: Which kind of condition should drive a SQLite query (lower first): ids and references
#: select a handful of rows, dates and absent parameters whole swathes of an index.
_DRIVE_ORDER: dict[type, int] = {
    IdCond: 0,
    ReferenceCond: 1,
    TokenCond: 2,
    StringCond: 3,
    LastUpdatedCond: 4,
    DateCond: 5,
    MissingCond: 6,
}


def _where(spec: SearchSpec, dialect: str = "") -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [R.res_type == spec.resource_type, R.deleted.is_(False)]
    conditions = list(spec.conditions)
    if dialect == "sqlite" and conditions:
        # SQLite materialises every uncorrelated IN subquery: let the most selective
        # condition select the candidates and check the others per candidate (EXISTS).
        conditions.sort(key=lambda c: _DRIVE_ORDER.get(type(c), 9))
        first = conditions[0]
        drives = not isinstance(first, MissingCond) and not (
            isinstance(first, TokenCond) and first.negate
        )
        where += [
            _condition(c, spec.resource_type, spec.now, correlated=(i > 0 or not drives))
            for i, c in enumerate(conditions)
        ]
    else:
        where += [_condition(c, spec.resource_type, spec.now) for c in conditions]
    if spec.restrict is not None:
        where.append(spec.restrict(resources))
    return where


def _count(conn: Connection, where: Sequence[ColumnElement[bool]]) -> int:
    stmt = sa.select(sa.func.count()).select_from(resources).where(*where)
    return int(conn.execute(stmt).scalar_one())


def run_search(conn: Connection, spec: SearchSpec) -> SearchPage:
    """Run ``spec`` and return one page plus the cursors for its neighbours.

    The first page carries its ``total`` in the same query (``count(*) OVER ()`` over the
    narrow page keys, before the limit): one statement per search. A cursor page counts
    separately, since its own rows are only those after the cursor."""
    where = _where(spec, conn.dialect.name)

    exprs = [_sort_expr(k, spec.resource_type) for k in spec.sort] + [R.pk]
    desc = [k.descending for k in spec.sort] + [False]
    labels = [f"k{i}" for i in range(len(exprs))]

    cursor = Cursor.decode(spec.cursor, len(exprs)) if spec.cursor else None
    forward = cursor.forward if cursor else True
    page_where = list(where)
    if cursor is not None:
        page_where.append(_after(exprs, desc, cursor.values, forward))
    fold_total = spec.want_total and cursor is None

    order = [e.desc() if d == forward else e.asc() for e, d in zip(exprs, desc, strict=True)]
    keys = sa.select(
        R.pk.label("match_pk"), *(e.label(lbl) for e, lbl in zip(exprs, labels, strict=True))
    )
    if fold_total:
        keys = keys.add_columns(sa.func.count().over().label("match_total"))
    page = keys.where(*page_where).order_by(*order).limit(spec.count + 1).subquery("page")
    outer_order = [
        page.c[lbl].desc() if d == forward else page.c[lbl].asc()
        for lbl, d in zip(labels, desc, strict=True)
    ]
    stmt = (
        sa.select(
            R.pk,
            R.res_type,
            R.res_id,
            R.version_id,
            R.last_updated,
            R.deleted,
            R.content,
            *(page.c[lbl] for lbl in labels),
            *([page.c.match_total] if fold_total else []),
        )
        .select_from(page.join(resources, R.pk == page.c.match_pk))
        .order_by(*outer_order)
    )
    fetched = list(conn.execute(stmt))
    width = 7 + len(labels)
    total: int | None = None
    if fold_total:
        total = int(fetched[0][width]) if fetched else 0
    more = len(fetched) > spec.count
    fetched = fetched[: spec.count]
    if not forward:
        fetched.reverse()
    rows = [CurrentRow(*r[:7]) for r in fetched]
    page_keys = [tuple(r[7:width]) for r in fetched]

    next_cursor = prev_cursor = None
    if rows:
        has_next = more if forward else True
        has_prev = (cursor is not None) if forward else more
        if has_next:
            next_cursor = Cursor(page_keys[-1], True).encode()
        if has_prev:
            prev_cursor = Cursor(page_keys[0], False).encode()

    if spec.want_total and not fold_total:
        total = _count(conn, where)
    return SearchPage(rows, total, next_cursor, prev_cursor)


def count_only(conn: Connection, spec: SearchSpec) -> int:
    """``_summary=count``: the total alone."""
    return _count(conn, _where(spec, conn.dialect.name))
