"""Search execution: a parsed search → a ``searchset`` Bundle with includes and paging links.

Bundles are assembled as bytes around the stored resource bytes (no re-serialisation of
matched resources unless ``_summary``/``_elements`` ask for a subset).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from fhir_consent.errors import BadRequest
from fhir_consent.fhir.query import Include, ParsedSearch
from fhir_consent.fhir.shaping import shape
from fhir_consent.fhir.visibility import PATIENT_COMPARTMENT
from fhir_consent.store.repository import CurrentRow, Repository
from fhir_consent.store.search import CursorError, count_only, run_search
from fhir_consent.store.tables import idx_reference, resources

__all__ = ["everything", "execute_search", "raw_bundle"]

_MAX_INCLUDED = 1000
_MAX_ITERATIONS = 3

Restrict = Callable[[Any], ColumnElement[bool]]


def raw_bundle(head: dict[str, Any], entries: Sequence[bytes]) -> bytes:
    """Serialize ``head`` (without ``entry``) and splice in pre-serialized entries."""
    body = orjson.dumps(head)
    if not entries:
        return body
    return body[:-1] + b',"entry":[' + b",".join(entries) + b"]}"


def _entry(
    base: str, row: CurrentRow, mode: str, summary: str | None, elements: tuple[str, ...] | None
) -> bytes:
    assert row.content is not None
    content = shape(row.content, summary, elements) if mode == "match" else row.content
    head = orjson.dumps(
        {"fullUrl": f"{base}/{row.res_type}/{row.res_id}", "search": {"mode": mode}}
    )
    return head[:-1] + b',"resource":' + content + b"}"


def _link(base: str, rtype: str, applied: list[tuple[str, str]], cursor: str | None) -> str:
    params = list(applied)
    if cursor:
        params.append(("_cursor", cursor))
    query = urlencode(params)
    return f"{base}/{rtype}" + (f"?{query}" if query else "")


def execute_search(
    conn: Connection,
    parsed: ParsedSearch,
    base: str,
    restrict_for: Callable[[str], Restrict | None] = lambda _t: None,
    seen: list[CurrentRow] | None = None,
) -> bytes:
    """Run the search and build the searchset Bundle (R4 search.html §3.1.1, bundle.html).
    Every returned row is appended to ``seen`` when given (for the audit trail).

    ``restrict_for(resource_type)`` supplies the SQL visibility predicate for matches and
    for every included type, so filtering happens before paging and counting."""
    spec = parsed.spec
    rtype = spec.resource_type
    spec.restrict = restrict_for(rtype)
    head: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if parsed.summary == "count" or spec.count == 0:
        head["total"] = count_only(conn, spec)
        head["link"] = [{"relation": "self", "url": _link(base, rtype, parsed.applied, None)}]
        return orjson.dumps(head)
    try:
        page = run_search(conn, spec)
    except CursorError:
        raise BadRequest("The paging cursor is not valid for this search") from None
    if page.total is not None:
        head["total"] = page.total
    links = [{"relation": "self", "url": _link(base, rtype, parsed.applied, spec.cursor)}]
    if spec.cursor:
        links.append({"relation": "first", "url": _link(base, rtype, parsed.applied, None)})
    if page.next_cursor:
        links.append(
            {"relation": "next", "url": _link(base, rtype, parsed.applied, page.next_cursor)}
        )
    if page.prev_cursor:
        links.append(
            {"relation": "previous", "url": _link(base, rtype, parsed.applied, page.prev_cursor)}
        )
    head["link"] = links
    entries = [_entry(base, r, "match", parsed.summary, parsed.elements) for r in page.rows]
    included = _includes(conn, page.rows, parsed, restrict_for)
    entries += [_entry(base, r, "include", None, None) for r in included]
    if seen is not None:
        seen += page.rows
        seen += included
    return raw_bundle(head, entries)


def _includes(
    conn: Connection,
    matches: list[CurrentRow],
    parsed: ParsedSearch,
    restrict_for: Callable[[str], Restrict | None],
) -> list[CurrentRow]:
    if not matches or not (parsed.includes or parsed.revincludes):
        return []
    seen = {(r.res_type, r.res_id) for r in matches}
    out: list[CurrentRow] = []
    frontier = list(matches)
    for iteration in range(_MAX_ITERATIONS):
        found: list[CurrentRow] = []
        for inc in parsed.includes:
            if iteration == 0 or inc.iterate:
                found += _forward(conn, frontier, inc, restrict_for)
        for inc in parsed.revincludes:
            if iteration == 0 or inc.iterate:
                found += _reverse(conn, frontier, inc, restrict_for)
        fresh = []
        for row in found:
            key = (row.res_type, row.res_id)
            if key not in seen and len(out) < _MAX_INCLUDED:
                seen.add(key)
                fresh.append(row)
                out.append(row)
        if not fresh or not any(i.iterate for i in (*parsed.includes, *parsed.revincludes)):
            break
        frontier = fresh
    return out


def _visible(
    conn: Connection, rows: list[CurrentRow], restrict: Restrict | None
) -> list[CurrentRow]:
    if restrict is None or not rows:
        return rows
    pks = [r.pk for r in rows]
    ok = set(
        conn.execute(
            sa.select(resources.c.pk).where(resources.c.pk.in_(pks), restrict(resources))
        ).scalars()
    )
    return [r for r in rows if r.pk in ok]


def _forward(
    conn: Connection,
    frontier: list[CurrentRow],
    inc: Include,
    restrict_for: Callable[[str], Restrict | None],
) -> list[CurrentRow]:
    sources = [r for r in frontier if r.res_type == inc.source_type]
    if not sources:
        return []
    r = idx_reference.c
    stmt = sa.select(r.target_type, r.target_id).where(
        r.resource_pk.in_([s.pk for s in sources]), r.target_id.is_not(None)
    )
    if inc.param != "*":
        stmt = stmt.where(r.param == inc.param)
    if inc.target_type:
        stmt = stmt.where(r.target_type == inc.target_type)
    by_type: dict[str, set[str]] = {}
    for ttype, tid in conn.execute(stmt):
        if ttype:
            by_type.setdefault(ttype, set()).add(tid)
    repo = Repository(conn)
    out: list[CurrentRow] = []
    for ttype, ids in sorted(by_type.items()):
        out += _visible(conn, repo.current_many(ttype, ids), restrict_for(ttype))
    return out


def _reverse(
    conn: Connection,
    frontier: list[CurrentRow],
    inc: Include,
    restrict_for: Callable[[str], Restrict | None],
) -> list[CurrentRow]:
    r = idx_reference.c
    ors = []
    for ttype in {f.res_type for f in frontier}:
        if inc.target_type and inc.target_type != ttype:
            continue
        ids = [f.res_id for f in frontier if f.res_type == ttype]
        ors.append(sa.and_(r.target_type == ttype, r.target_id.in_(ids)))
    if not ors:
        return []
    sub = sa.select(r.resource_pk).where(
        r.res_type == inc.source_type, r.param == inc.param, sa.or_(*ors)
    )
    where: list[ColumnElement[bool]] = [resources.c.pk.in_(sub), resources.c.deleted.is_(False)]
    restrict = restrict_for(inc.source_type)
    if restrict is not None:
        where.append(restrict(resources))
    rows = conn.execute(
        sa.select(*resources.c).where(*where).order_by(resources.c.pk).limit(_MAX_INCLUDED)
    )
    return [CurrentRow(*row) for row in rows]


_EVERYTHING_LIMIT = 10_000


def everything(
    conn: Connection,
    patient: CurrentRow,
    base: str,
    restrict_for: Callable[[str], Restrict | None],
    seen: list[CurrentRow] | None = None,
) -> bytes:
    """``Patient/{id}/$everything`` (R4 patient-operation-everything): the patient and every
    resource in their compartment that the caller may see, as a searchset Bundle. Each type's
    visibility predicate applies in SQL, exactly as for searches."""
    rows: list[CurrentRow] = [patient]
    r = idx_reference.c
    for rtype, params in sorted(PATIENT_COMPARTMENT.items()):
        if rtype == "Patient" or not params:
            continue
        sub = sa.select(r.resource_pk).where(
            r.res_type == rtype,
            r.param.in_(params),
            r.target_type == "Patient",
            r.target_id == patient.res_id,
        )
        where: list[ColumnElement[bool]] = [
            resources.c.res_type == rtype,
            resources.c.deleted.is_(False),
            resources.c.pk.in_(sub),
        ]
        restrict = restrict_for(rtype)
        if restrict is not None:
            where.append(restrict(resources))
        stmt = sa.select(*resources.c).where(*where).order_by(resources.c.pk)
        rows += [CurrentRow(*row) for row in conn.execute(stmt.limit(_EVERYTHING_LIMIT))]
    if seen is not None:
        seen += rows
    head: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(rows),
        "link": [{"relation": "self", "url": f"{base}/Patient/{patient.res_id}/$everything"}],
    }
    return raw_bundle(head, [_entry(base, row, "match", None, None) for row in rows])
