"""Batch and transaction Bundles (R4 http.html §3.1.0.11).

A transaction is atomic: every entry runs in one database transaction, in the order the
specification requires (DELETE, POST, PUT/PATCH, GET). ``urn:uuid:``/``urn:oid:`` (and
absolute) full URLs of created resources are resolved to server-assigned ids — or, for a
conditional create that matches, to the existing resource — and every link to them is
rewritten first (references, uri/url elements, narrative links). Overlapping identities and
placeholders no entry resolves fail the transaction. Any failure rolls the whole transaction
back and answers with that entry's error, naming the entry. A batch runs each entry in its
own transaction and reports each entry's outcome.

Every entry is checked exactly like the request it stands for, through the
:class:`EntryGuard` of the request's token (SMART App Launch: batch and transaction entries
are authorized one by one): the scope for the entry's interaction, the token's revocation in
the entry's transaction, the patient compartment and the consent filter on reads, searches
(before paging and counting) and writes, and the audit trail. In a transaction, an entry that
may not run fails the whole transaction; in a batch, only that entry.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import orjson
from sqlalchemy.engine import Connection

from fhir_consent.errors import BadRequest, FHIRError, MethodNotAllowed, PreconditionFailed
from fhir_consent.fhir.http import etag, parse_if_match
from fhir_consent.fhir.query import parse_search
from fhir_consent.fhir.searching import execute_search
from fhir_consent.fhir.services import ResourceService, WriteResult, format_instant
from fhir_consent.fhir.validation import SUPPORTED_TYPES, validate_resource
from fhir_consent.store.repository import CurrentRow, Repository, VersionRow
from smart_on_fhir.scopes import Interaction

__all__ = ["BundleContext", "EntryGuard", "process_bundle"]

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}
_PLACEHOLDERS = ("urn:uuid:", "urn:oid:")
_PATCH_TYPE = "application/json-patch+json"
_QUOTED = re.compile(r"""(["'])([^"'<>]*)\1""")  # a quoted attribute value in a narrative div


class EntryGuard(Protocol):
    """The request's token applied to one entry at a time (implemented by the FHIR routes).

    A *gate* is what :meth:`gate` decided for an entry before it touches the database; a
    *visibility* is what :meth:`open` computed inside the entry's transaction."""

    def gate(self, rtype: str, interaction: Interaction, audit_name: str) -> Any:
        """The scope check (raises ``Forbidden``, audited) for ``interaction`` on ``rtype``."""

    def open(self, conn: Connection, gate: Any) -> Any:
        """In the entry's transaction: the token is still active (raises ``Unauthorized``),
        then the visibility (compartment, granular scopes, consent) to guard the entry with."""

    def restrict(self, gate: Any, visibility: Any) -> Callable[[str], Any]:
        """The SQL restriction of a search entry, per resource type (and included types)."""

    def written(self, conn: Connection, gate: Any, interaction: str, row: CurrentRow) -> None:
        """Audit a change in its own transaction."""

    def disclosed(self, gate: Any, rows: list[CurrentRow] | list[VersionRow]) -> None:
        """Audit what a read or search entry returned (after its transaction committed)."""

    def refused(self, gate: Any, hidden: Any) -> None:
        """Audit a refused attempt on an existing record (the patient sees it)."""


@dataclass(slots=True)
class BundleContext:
    """What bundle processing needs from the application."""

    base: str
    service: Callable[[Connection, Any], ResourceService]  # (conn, visibility guard)
    write: Callable[[], Any]  # context manager → Connection (a write transaction)
    read: Callable[[], Any]  # context manager → Connection (a read transaction)
    guard: EntryGuard
    default_count: int = 20
    max_count: int = 1000
    return_minimal: bool = False


@dataclass(slots=True)
class _Entry:
    index: int
    method: str
    url: str
    rtype: str
    rid: str | None
    vid: str | None
    query: list[tuple[str, str]]
    resource: dict[str, Any] | None
    full_url: str | None
    if_match: str | None
    if_none_exist: str | None
    rid_assigned: str | None = None
    aliases: list[str] = field(default_factory=list)  # links that name this entry's resource
    existing: CurrentRow | None = None  # a transaction's conditional create that matched
    gate: Any = None  # what the entry's token may do (EntryGuard.gate)
    disclosed: list[Any] = field(default_factory=list)  # rows a read or search returned


def _optional_str(request: dict[str, Any], key: str, i: int) -> str | None:
    value = request.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"Bundle.entry[{i}].request.{key} must be a string")
    return value


def _parse_entries(bundle: dict[str, Any], base: str) -> list[_Entry]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be an array")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
            raise BadRequest(f"Bundle.entry[{i}] has no request")
        req = entry["request"]
        method = req.get("method")
        method = method.upper() if isinstance(method, str) else ""
        url = req.get("url")
        if method not in _ORDER or not isinstance(url, str) or not url:
            raise BadRequest(f"Bundle.entry[{i}].request needs a method and a url")
        if url.startswith(base + "/"):
            url = url[len(base) + 1 :]
        parts = urlsplit(url)
        path = [p for p in parts.path.split("/") if p]
        if not path or path[0] not in SUPPORTED_TYPES:
            raise BadRequest(f"Bundle.entry[{i}].request.url names an unsupported type")
        rid = path[1] if len(path) > 1 else None
        vid = path[3] if len(path) == 4 and path[2] == "_history" else None
        if len(path) > 2 and vid is None:
            raise BadRequest(f"Bundle.entry[{i}].request.url is not supported")
        resource = entry.get("resource")
        if resource is not None and not isinstance(resource, dict):
            raise BadRequest(f"Bundle.entry[{i}].resource must be an object")
        if method in ("POST", "PUT", "PATCH") and resource is None:
            raise BadRequest(f"Bundle.entry[{i}] needs a resource")
        if method in ("PUT", "PATCH", "DELETE") and rid is None:
            raise BadRequest(f"Bundle.entry[{i}].request.url needs an id")
        full_url = entry.get("fullUrl")
        out.append(
            _Entry(
                i,
                method,
                url,
                path[0],
                rid,
                vid,
                parse_qsl(parts.query, keep_blank_values=True),
                resource,
                full_url if isinstance(full_url, str) and full_url else None,
                _optional_str(req, "ifMatch", i),
                _optional_str(req, "ifNoneExist", i),
            )
        )
    return out


def _criteria(if_none_exist: str) -> list[tuple[str, str]]:
    return parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True)


# -- link rewriting -----------------------------------------------------------------------


def _rewrite(value: Any, mapping: dict[str, str], key: str = "") -> Any:
    """Replace every link to a resolved entry (R4 http.html §3.1.0.11.2): any string equal
    to a mapped full URL (references, uri/url/canonical elements) — except ``value``, whose
    datatype is a plain string (Identifier.value, ContactPoint.value) — and quoted links in
    narrative ``div``s."""
    if isinstance(value, dict):
        return {k: _rewrite(v, mapping, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, mapping, key) for v in value]
    if isinstance(value, str):
        if key == "div":
            return _QUOTED.sub(lambda m: m[1] + mapping.get(m[2], m[2]) + m[1], value)
        if key != "value":
            return mapping.get(value, value)
    return value


def _unresolved(value: Any) -> bool:
    """Whether a reference still names a bundle-local placeholder (``urn:uuid:``/``urn:oid:``)."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref.startswith(_PLACEHOLDERS):
            return True
        return any(_unresolved(v) for v in value.values())
    if isinstance(value, list):
        return any(_unresolved(v) for v in value)
    return False


# -- entry execution ----------------------------------------------------------------------


def _status(code: int) -> str:
    return _STATUS_TEXT.get(code) or f"{code} {HTTPStatus(code).phrase}"


def _written(base: str, result: WriteResult, minimal: bool) -> dict[str, Any]:
    row = result.row
    status = 201 if result.created else 200
    response: dict[str, Any] = {
        "status": _status(status),
        "location": f"{row.res_type}/{row.res_id}/_history/{row.version_id}",
        "etag": etag(row.version_id),
        "lastModified": format_instant(row.last_updated),
    }
    out: dict[str, Any] = {"fullUrl": f"{base}/{row.res_type}/{row.res_id}", "response": response}
    if not minimal and row.content is not None:
        out["resource"] = orjson.loads(row.content)
    return out


def _deleted(row: CurrentRow | None) -> dict[str, Any]:
    response: dict[str, Any] = {"status": _status(204)}
    if row is not None:
        response["etag"] = etag(row.version_id)
    return {"response": response}


def _patch_ops(resource: dict[str, Any]) -> Any:
    ctype = resource.get("contentType")
    if (
        resource.get("resourceType") != "Binary"
        or not isinstance(ctype, str)
        or ctype.split(";")[0].strip().lower() != _PATCH_TYPE
    ):
        raise BadRequest(f"A PATCH entry must carry a Binary with {_PATCH_TYPE}")
    data = resource.get("data")
    if not isinstance(data, str):
        raise BadRequest("The PATCH entry's Binary.data is not a base64 JSON Patch")
    try:
        return orjson.loads(base64.b64decode(data, validate=True))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        raise BadRequest("The PATCH entry's Binary.data is not a base64 JSON Patch") from None


#: The SMART interaction each entry stands for, and its R4 restful-interaction code.
def _interaction(e: _Entry) -> tuple[Interaction, str]:
    if e.method in ("GET", "HEAD"):
        if e.rid is None:
            return Interaction.SEARCH, "search-type"
        return Interaction.READ, "vread" if e.vid else "read"
    return {
        "POST": (Interaction.CREATE, "create"),
        "PUT": (Interaction.UPDATE, "update"),
        "PATCH": (Interaction.UPDATE, "patch"),
        "DELETE": (Interaction.DELETE, "delete"),
    }[e.method]


def _gate(ctx: BundleContext, e: _Entry) -> None:
    interaction, name = _interaction(e)
    e.gate = ctx.guard.gate(e.rtype, interaction, name)


def _run_entry(conn: Connection, ctx: BundleContext, e: _Entry) -> dict[str, Any]:
    """Run one entry inside ``conn``'s transaction, guarded by its token's visibility."""
    visibility = ctx.guard.open(conn, e.gate)
    try:
        return _execute(conn, ctx, e, visibility)
    except FHIRError as exc:
        if exc.hidden is not None:
            ctx.guard.refused(e.gate, exc.hidden)
        raise


def _write(conn: Connection, ctx: BundleContext, e: _Entry, result: WriteResult) -> dict[str, Any]:
    name = "update" if e.method == "PUT" else "patch" if e.method == "PATCH" else "create"
    if result.created:
        name = "create"
    if result.existing:
        name = "read"  # a conditional create that matched discloses the match
    ctx.guard.written(conn, e.gate, name, result.row)
    return _written(ctx.base, result, ctx.return_minimal)


def _execute(
    conn: Connection, ctx: BundleContext, e: _Entry, visibility: Any
) -> dict[str, Any]:
    svc = ctx.service(conn, visibility)
    if e.method == "POST":
        assert e.resource is not None
        if e.rid is not None:
            raise MethodNotAllowed("POST to a resource id is not supported")
        if e.existing is not None:  # a transaction's conditional create, resolved up front
            validate_resource(e.resource, e.rtype)
            result = WriteResult(e.existing, created=False, existing=True)
        else:
            criteria = _criteria(e.if_none_exist) if e.if_none_exist is not None else None
            result = svc.create(e.rtype, e.resource, if_none_exist=criteria, res_id=e.rid_assigned)
        return _write(conn, ctx, e, result)
    if e.method == "PUT":
        assert e.resource is not None and e.rid is not None
        result = svc.update(e.rtype, e.rid, e.resource, if_match=parse_if_match(e.if_match))
        return _write(conn, ctx, e, result)
    if e.method == "PATCH":
        assert e.resource is not None and e.rid is not None
        # Lock before the patch reads the current version: otherwise a concurrent writer
        # between that read and the update turns this into a spurious 412 (PostgreSQL).
        _lock(conn, [(e.rtype, e.rid)])
        result = svc.patch(
            e.rtype, e.rid, _patch_ops(e.resource), if_match=parse_if_match(e.if_match)
        )
        return _write(conn, ctx, e, result)
    if e.method == "DELETE":
        assert e.rid is not None
        deleted = svc.delete(e.rtype, e.rid)
        if deleted is not None:
            ctx.guard.written(conn, e.gate, "delete", deleted)
        return _deleted(deleted)
    # GET / HEAD
    if e.rid is None:
        parsed = parse_search(
            e.rtype,
            e.query,
            default_count=ctx.default_count,
            max_count=ctx.max_count,
            now=svc.clock(),
        )
        restrict = ctx.guard.restrict(e.gate, visibility)
        body = execute_search(conn, parsed, ctx.base, restrict, e.disclosed)
        out: dict[str, Any] = {"response": {"status": _status(200)}}
    else:
        row = svc.vread(e.rtype, e.rid, e.vid) if e.vid else svc.read(e.rtype, e.rid)
        assert row.content is not None
        e.disclosed.append(row)
        body = row.content
        out = {
            "fullUrl": f"{ctx.base}/{e.rtype}/{e.rid}",
            "response": {
                "status": _status(200),
                "etag": etag(row.version_id),
                "lastModified": format_instant(row.last_updated),
            },
        }
    if e.method == "GET":  # HEAD answers without a body
        out["resource"] = orjson.loads(body)
    return out


def _lock(conn: Connection, identities: Iterable[tuple[str, str]]) -> None:
    """Lock the current rows of these resources, in one canonical order (PostgreSQL row
    locks; SQLite serializes writers already). A transaction locks everything it will change
    before changing anything, so two transactions touching the same resources in different
    orders queue instead of deadlocking."""
    repo = Repository(conn)
    for rtype, rid in sorted(identities):
        repo.current(rtype, rid, for_update=True)


def _error_entry(exc: FHIRError) -> dict[str, Any]:
    return {"response": {"status": _status(exc.status), "outcome": exc.outcome()}}


def process_bundle(bundle: dict[str, Any], ctx: BundleContext) -> dict[str, Any]:
    """Process a ``batch`` or ``transaction`` Bundle and return the response Bundle."""
    if bundle.get("resourceType") != "Bundle":
        raise BadRequest("The request body must be a Bundle")
    btype = bundle.get("type")
    if btype not in ("batch", "transaction"):
        raise BadRequest("Bundle.type must be batch or transaction")
    entries = _parse_entries(bundle, ctx.base)
    if btype == "batch":
        results = [_batch_entry(ctx, e) for e in entries]
    else:
        results = _transaction(ctx, entries)
    out: dict[str, Any] = {"resourceType": "Bundle", "type": f"{btype}-response"}
    if results:  # FHIR JSON has no empty arrays
        out["entry"] = results
    return out


def _batch_entry(ctx: BundleContext, e: _Entry) -> dict[str, Any]:
    try:
        _gate(ctx, e)
        scope = ctx.read() if e.method in ("GET", "HEAD") else ctx.write()
        with scope as conn:
            result = _run_entry(conn, ctx, e)
    except FHIRError as exc:
        return _error_entry(exc)
    if e.disclosed:
        ctx.guard.disclosed(e.gate, e.disclosed)
    return result


# -- transactions -------------------------------------------------------------------------


@contextmanager
def _blame(e: _Entry) -> Iterator[None]:
    """Name the failing entry (by its position in the request) in the OperationOutcome."""
    try:
        yield
    except FHIRError as exc:
        for issue in exc.issues:
            issue.diagnostics = f"Bundle.entry[{e.index}]: {issue.diagnostics}"
        raise


def _assign_ids(base: str, entries: list[_Entry]) -> dict[str, str]:
    """Pre-assign ids to creates and map each entry's full URL (and, for a URL on this
    server, its relative form) to the identity the entry will have."""
    mapping: dict[str, str] = {}
    for e in entries:
        if e.method == "POST":
            e.rid_assigned = str(uuid.uuid4())
            target = f"{e.rtype}/{e.rid_assigned}"
        elif e.method == "PUT":
            target = f"{e.rtype}/{e.rid}"
        else:
            continue
        if e.full_url is None:
            continue
        e.aliases.append(e.full_url)
        if e.method == "POST" and e.full_url.startswith(base + "/"):
            local = e.full_url[len(base) + 1 :]
            if local.count("/") == 1 and local.split("/")[0] == e.rtype:
                e.aliases.append(local)
        for alias in e.aliases:
            if alias in mapping:
                raise BadRequest(f"Bundle.entry[{e.index}].fullUrl is duplicated")
            mapping[alias] = target
    return mapping


def _check_overlaps(entries: list[_Entry]) -> set[tuple[str, str]]:
    """R4 http.html §3.1.0.11.2: identities touched by DELETE/PUT/PATCH may not overlap.
    Returns the touched identities."""
    touched: set[tuple[str, str]] = set()
    conditional: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for e in entries:
        if e.method in ("DELETE", "PUT", "PATCH"):
            assert e.rid is not None
            if (e.rtype, e.rid) in touched:
                raise BadRequest(
                    f"Bundle.entry[{e.index}]: {e.rtype}/{e.rid[:64]} is the target of more "
                    "than one entry"
                )
            touched.add((e.rtype, e.rid))
        elif e.method == "POST" and e.if_none_exist is not None:
            key = (e.rtype, tuple(sorted(_criteria(e.if_none_exist))))
            if key in conditional:
                raise BadRequest(
                    f"Bundle.entry[{e.index}]: the same conditional create appears twice"
                )
            conditional.add(key)
    return touched


def _resolve_conditional(
    conn: Connection,
    ctx: BundleContext,
    e: _Entry,
    mapping: dict[str, str],
    touched: set[tuple[str, str]],
) -> None:
    """Decide a conditional create once, before any POST runs, so that links to it can be
    rewritten: a single match becomes the entry's identity; none means create."""
    assert e.if_none_exist is not None
    visibility = ctx.guard.open(conn, e.gate)
    service = ctx.service(conn, visibility)
    matches = service.conditional_matches(e.rtype, _criteria(e.if_none_exist))
    if len(matches) > 1:
        raise PreconditionFailed("ifNoneExist matched more than one resource")
    e.if_none_exist = None  # decided: never re-evaluated against this transaction's writes
    if not matches:
        return
    match = matches[0]
    if (e.rtype, match.res_id) in touched:
        raise BadRequest(
            f"ifNoneExist matched {e.rtype}/{match.res_id}, which another entry changes"
        )
    e.existing = match
    for alias in e.aliases:
        mapping[alias] = f"{e.rtype}/{match.res_id}"


def _transaction(ctx: BundleContext, entries: list[_Entry]) -> list[dict[str, Any]]:
    for e in entries:  # every entry may run, or none does
        with _blame(e):
            _gate(ctx, e)
    mapping = _assign_ids(ctx.base, entries)
    touched = _check_overlaps(entries)
    results: dict[int, dict[str, Any]] = {}
    with ctx.write() as conn:  # any exception rolls the whole transaction back
        _lock(conn, touched)
        for e in entries:
            if e.method == "DELETE":
                with _blame(e):
                    results[e.index] = _run_entry(conn, ctx, e)
        for e in entries:
            if e.method == "POST" and e.if_none_exist is not None:
                with _blame(e):
                    _resolve_conditional(conn, ctx, e, mapping, touched)
        for e in entries:
            if e.resource is not None:
                e.resource = _rewrite(e.resource, mapping)
                if e.method in ("POST", "PUT") and _unresolved(e.resource):
                    raise BadRequest(
                        f"Bundle.entry[{e.index}]: a reference names a placeholder (urn:uuid: "
                        "or urn:oid:) that is not the fullUrl of an entry in this transaction"
                    )
        rest = [e for e in entries if e.method != "DELETE"]
        for e in sorted(rest, key=lambda x: (_ORDER[x.method], x.index)):
            with _blame(e):
                results[e.index] = _run_entry(conn, ctx, e)
    for e in entries:  # committed: what the reads disclosed goes to the audit trail
        if e.disclosed:
            ctx.guard.disclosed(e.gate, e.disclosed)
    return [results[i] for i in range(len(entries))]
