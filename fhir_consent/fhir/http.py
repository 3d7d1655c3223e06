"""HTTP details of the FHIR REST API (R4 http.html): media types, ETags, Prefer, dates."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from fhir_consent.errors import BadRequest, NotAcceptable, UnsupportedMediaType

__all__ = [
    "FHIR_JSON",
    "check_accept",
    "check_content_type",
    "etag",
    "fhir_response",
    "http_date",
    "parse_if_match",
    "parse_prefer",
]

FHIR_JSON = "application/fhir+json; charset=utf-8"
_JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
_FORMAT_ALIASES = frozenset(
    {"json", "application/json", "application/fhir+json", "application/json+fhir"}
)
_ACCEPT_WILDCARDS = frozenset({"*/*", "application/*"})


def fhir_response(
    body: bytes | Mapping[str, Any] | None,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A response with the FHIR JSON media type; mappings are serialized with orjson."""
    content = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    return Response(content, status_code=status, headers=dict(headers or {}), media_type=FHIR_JSON)


def _media_types(header: str) -> list[str]:
    return [part.split(";")[0].strip().lower() for part in header.split(",") if part.strip()]


def check_accept(request: Request) -> None:
    """``_format`` overrides ``Accept`` (R4 http.html §3.1.0.1.5); only JSON is served."""
    fmt = request.query_params.get("_format") if request.scope.get("query_string") else None
    if fmt is not None:
        if fmt.split(";")[0].strip().lower() not in _FORMAT_ALIASES:
            raise NotAcceptable("Only JSON (application/fhir+json) is supported")
        return
    accept = request.headers.get("accept")
    if not accept:
        return
    types = _media_types(accept)
    if not any(t in _JSON_TYPES or t in _ACCEPT_WILDCARDS for t in types):
        raise NotAcceptable("Only application/fhir+json is supported")


def check_content_type(request: Request, allowed: frozenset[str] = _JSON_TYPES) -> None:
    ctype = request.headers.get("content-type")
    if ctype is None:
        raise UnsupportedMediaType("A Content-Type header is required")
    if ctype.split(";")[0].strip().lower() not in allowed:
        raise UnsupportedMediaType("Unsupported Content-Type for this interaction")


def etag(version_id: int) -> str:
    return f'W/"{version_id}"'


def parse_if_match(value: str | None) -> int | None:
    """``If-Match: W/"3"`` (or ``"3"``) → 3."""
    if value is None:
        return None
    v = value.strip()
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"')
    if not v.isdigit():
        raise BadRequest('If-Match must be a version ETag such as W/"1"')
    return int(v)


def parse_prefer(request: Request) -> dict[str, str]:
    """``Prefer: return=minimal, handling=strict`` → {"return": "minimal", "handling": …}."""
    out: dict[str, str] = {}
    for header in request.headers.getlist("prefer"):
        for part in header.split(","):
            key, _, value = part.strip().partition("=")
            if key:
                out[key.strip().lower()] = value.strip().strip('"').lower()
    return out


def http_date(us: int) -> str:
    return format_datetime(datetime.fromtimestamp(us / 1_000_000, UTC), usegmt=True)
