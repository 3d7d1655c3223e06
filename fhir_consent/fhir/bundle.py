"""Batch and transaction Bundles (R4 http.html §3.1.0.11).

A transaction is atomic: every entry runs in one database transaction, in the order the
specification requires (DELETE, POST, PUT/PATCH, GET), with ``urn:uuid:`` full URLs resolved
to server-assigned ids and every reference to them rewritten first. Any failure rolls the
whole transaction back and answers with that entry's error. A batch runs each entry in its
own transaction and reports each entry's outcome.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from sqlalchemy.engine import Connection

from fhir_consent.errors import BadRequest, FHIRError, MethodNotAllowed
from fhir_consent.fhir.http import etag, parse_if_match
from fhir_consent.fhir.query import parse_search
from fhir_consent.fhir.searching import execute_search
from fhir_consent.fhir.services import ResourceService, WriteResult, format_instant
from fhir_consent.fhir.validation import SUPPORTED_TYPES
from fhir_consent.store.repository import CurrentRow

__all__ = ["BundleContext", "process_bundle"]

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}


@dataclass(slots=True)
class BundleContext:
    """What bundle processing needs from the application."""

    base: str
    service: Callable[[Connection], ResourceService]
    write: Callable[[], Any]  # context manager → Connection (a write transaction)
    read: Callable[[], Any]  # context manager → Connection (a read transaction)
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


def _parse_entries(bundle: dict[str, Any], base: str) -> list[_Entry]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be an array")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
            raise BadRequest(f"Bundle.entry[{i}] has no request")
        req = entry["request"]
        method = str(req.get("method", "")).upper()
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
                parse_qsl(parts.query),
                resource,
                full_url if isinstance(full_url, str) else None,
                req.get("ifMatch"),
                req.get("ifNoneExist"),
            )
        )
    return out


def _rewrite(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "reference" and isinstance(v, str) and v in mapping:
                out[k] = mapping[v]
            else:
                out[k] = _rewrite(v, mapping)
        return out
    if isinstance(value, list):
        return [_rewrite(v, mapping) for v in value]
    return value


def _written(base: str, result: WriteResult, minimal: bool) -> dict[str, Any]:
    row = result.row
    status = 201 if result.created else 200
    response: dict[str, Any] = {
        "status": _STATUS_TEXT[status],
        "location": f"{row.res_type}/{row.res_id}/_history/{row.version_id}",
        "etag": etag(row.version_id),
        "lastModified": format_instant(row.last_updated),
    }
    out: dict[str, Any] = {"fullUrl": f"{base}/{row.res_type}/{row.res_id}", "response": response}
    if not minimal and row.content is not None:
        out["resource"] = orjson.loads(row.content)
    return out


def _deleted(row: CurrentRow | None) -> dict[str, Any]:
    response: dict[str, Any] = {"status": _STATUS_TEXT[204]}
    if row is not None:
        response["etag"] = etag(row.version_id)
    return {"response": response}


def _patch_ops(resource: dict[str, Any]) -> Any:
    if resource.get("resourceType") != "Binary" or resource.get("contentType") not in (
        "application/json-patch+json",
    ):
        raise BadRequest("A PATCH entry must carry a Binary with application/json-patch+json")
    try:
        return orjson.loads(base64.b64decode(resource.get("data", ""), validate=True))
    except (ValueError, orjson.JSONDecodeError):
        raise BadRequest("The PATCH entry's Binary.data is not a base64 JSON Patch") from None


def _run_entry(conn: Connection, ctx: BundleContext, e: _Entry) -> dict[str, Any]:
    svc = ctx.service(conn)
    if e.method == "POST":
        assert e.resource is not None
        if e.rid is not None:
            raise MethodNotAllowed("POST to a resource id is not supported")
        criteria = parse_qsl(e.if_none_exist.lstrip("?")) if e.if_none_exist else None
        result = svc.create(e.rtype, e.resource, if_none_exist=criteria, res_id=e.rid_assigned)
        return _written(ctx.base, result, ctx.return_minimal)
    if e.method == "PUT":
        assert e.resource is not None and e.rid is not None
        result = svc.update(e.rtype, e.rid, e.resource, if_match=parse_if_match(e.if_match))
        return _written(ctx.base, result, ctx.return_minimal)
    if e.method == "PATCH":
        assert e.resource is not None and e.rid is not None
        result = svc.patch(
            e.rtype, e.rid, _patch_ops(e.resource), if_match=parse_if_match(e.if_match)
        )
        return _written(ctx.base, result, ctx.return_minimal)
    if e.method == "DELETE":
        assert e.rid is not None
        return _deleted(svc.delete(e.rtype, e.rid))
    # GET / HEAD
    if e.rid is None:
        parsed = parse_search(
            e.rtype,
            e.query,
            default_count=ctx.default_count,
            max_count=ctx.max_count,
            now=svc.clock(),
        )
        body = execute_search(conn, parsed, ctx.base)
        return {"resource": orjson.loads(body), "response": {"status": _STATUS_TEXT[200]}}
    row = svc.vread(e.rtype, e.rid, e.vid) if e.vid else svc.read(e.rtype, e.rid)
    assert row.content is not None
    return {
        "fullUrl": f"{ctx.base}/{e.rtype}/{e.rid}",
        "resource": orjson.loads(row.content),
        "response": {
            "status": _STATUS_TEXT[200],
            "etag": etag(row.version_id),
            "lastModified": format_instant(row.last_updated),
        },
    }


def _error_entry(exc: FHIRError) -> dict[str, Any]:
    return {"response": {"status": str(exc.status), "outcome": exc.outcome()}}


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
        return {"resourceType": "Bundle", "type": "batch-response", "entry": results}
    return {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": _transaction(ctx, entries),
    }


def _batch_entry(ctx: BundleContext, e: _Entry) -> dict[str, Any]:
    try:
        scope = ctx.read() if e.method in ("GET", "HEAD") else ctx.write()
        with scope as conn:
            return _run_entry(conn, ctx, e)
    except FHIRError as exc:
        return _error_entry(exc)


def _transaction(ctx: BundleContext, entries: list[_Entry]) -> list[dict[str, Any]]:
    mapping: dict[str, str] = {}
    for e in entries:
        if e.method == "POST":
            new_id = str(uuid.uuid4())
            if e.full_url and e.full_url.startswith("urn:uuid:"):
                if e.full_url in mapping:
                    raise BadRequest(f"Bundle.entry[{e.index}].fullUrl is duplicated")
                mapping[e.full_url] = f"{e.rtype}/{new_id}"
            e.rid_assigned = new_id
        elif e.method == "PUT" and e.full_url and e.full_url.startswith("urn:uuid:"):
            mapping[e.full_url] = f"{e.rtype}/{e.rid}"
    results: dict[int, dict[str, Any]] = {}
    with ctx.write() as conn:
        for e in entries:
            if e.method == "POST" and e.if_none_exist:
                # A conditional create that matches keeps the existing id for references.
                _resolve_conditional(conn, ctx, e, mapping)
        for e in entries:
            if e.resource is not None:
                e.resource = _rewrite(e.resource, mapping)
        for e in sorted(entries, key=lambda x: (_ORDER[x.method], x.index)):
            try:
                results[e.index] = _run_entry(conn, ctx, e)
            except FHIRError as exc:  # the with-block rolls everything back
                for issue in exc.issues:
                    issue.diagnostics = f"Bundle.entry[{e.index}]: {issue.diagnostics}"
                raise
    return [results[i] for i in range(len(entries))]


def _resolve_conditional(
    conn: Connection, ctx: BundleContext, e: _Entry, mapping: dict[str, str]
) -> None:
    svc = ctx.service(conn)
    criteria = parse_qsl((e.if_none_exist or "").lstrip("?"))
    matches = svc.conditional_matches(e.rtype, criteria)
    if len(matches) == 1 and e.full_url and e.full_url in mapping:
        mapping[e.full_url] = f"{e.rtype}/{matches[0].res_id}"
