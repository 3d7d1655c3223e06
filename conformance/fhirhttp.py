"""A thin FHIR REST client over httpx for the checks: base URL, bearer token, FHIR JSON
headers, the server's clock (from ``Date``), and small assertions on responses."""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx

__all__ = ["Api", "bundle_ids", "expect", "is_outcome", "outcome_text", "version_of"]

FHIR_JSON = "application/fhir+json"
_ETAG = re.compile(r'\A(?:W/)?"([^"]+)"\Z')


class Api:
    def __init__(self, http: httpx.Client, base: str, token: str | None = None) -> None:
        self.http = http
        self.base = base.rstrip("/")
        self.token = token
        self.server_time: datetime | None = None

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base}/{path}"

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        h = {"accept": FHIR_JSON}
        if json is not None:
            h["content-type"] = FHIR_JSON
        bearer = token if token is not None else self.token
        if bearer:
            h["authorization"] = f"Bearer {bearer}"
        h.update(headers or {})
        if json is not None:
            import orjson

            kwargs["content"] = orjson.dumps(json)
        r = self.http.request(method, self.url(path), headers=h, **kwargs)
        date = r.headers.get("date")
        if date:
            try:
                self.server_time = email.utils.parsedate_to_datetime(date).astimezone(UTC)
            except (TypeError, ValueError):
                pass
        return r

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)

    def now(self) -> datetime:
        """The server's time (its last ``Date`` header), else ours."""
        if self.server_time is None:
            self.get("metadata")
        return self.server_time or datetime.now(UTC)

    def pages(self, first: httpx.Response, limit: int = 20) -> Iterator[dict[str, Any]]:
        """The first Bundle and every ``next`` page after it (at most ``limit`` pages)."""
        body = json_of(first)
        for _ in range(limit):
            yield body
            nxt = next_link(body)
            if nxt is None:
                return
            r = self.get(nxt)
            expect(r, 200, what=f"GET next page {nxt[:80]}")
            body = json_of(r)


def json_of(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError as error:
        raise AssertionError(f"status {r.status_code}: body is not JSON") from error
    if not isinstance(body, dict):
        raise AssertionError(f"status {r.status_code}: body is not a JSON object")
    return body


def outcome_text(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:120]
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = body.get("issue") or [{}]
        first = issues[0] if isinstance(issues[0], dict) else {}
        text = first.get("diagnostics") or (first.get("details") or {}).get("text") or ""
        return f"{first.get('code', '?')}: {str(text)[:120]}"
    return ""


def expect(r: httpx.Response, *statuses: int, what: str = "") -> None:
    """Assert the status is one of ``statuses`` (message: what, got, and the outcome)."""
    if r.status_code not in statuses:
        want = "/".join(str(s) for s in statuses)
        extra = outcome_text(r)
        raise AssertionError(
            f"{what or r.request.method}: expected {want}, got {r.status_code}"
            + (f" ({extra})" if extra else "")
        )


def is_outcome(r: httpx.Response) -> bool:
    try:
        body: Any = r.json()
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    return str(body.get("resourceType")) == "OperationOutcome"


def is_fhir_json(r: httpx.Response) -> bool:
    content_type = str(r.headers.get("content-type", ""))
    return content_type.split(";")[0].strip() == FHIR_JSON


def version_of(etag: str | None) -> str | None:
    m = _ETAG.match((etag or "").strip())
    return m.group(1) if m else None


def next_link(bundle: dict[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def bundle_ids(bundle: dict[str, Any], rtype: str | None = None) -> list[str]:
    """Ids of the ``match`` entries (entries without a search mode count as matches)."""
    out = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") or {}
        mode = (entry.get("search") or {}).get("mode", "match")
        if mode != "match" or (rtype and resource.get("resourceType") != rtype):
            continue
        if isinstance(resource.get("id"), str):
            out.append(resource["id"])
    return out
