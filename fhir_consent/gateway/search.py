"""Forwarded searches: scan the upstream's pages, keep what the requester may see, re-page.

Filtering a page after the fact would change what the page says about hidden records: a short
page, or an upstream ``total``, would tell how many were withheld. So (``docs/gateway.md``):

* the upstream's ``total``, links and ``search.mode=outcome`` entries never reach the caller;
* our pages are **re-paged**: the upstream is read page after page until ``_count`` visible
  matches are collected or the upstream has no more — a page is short only at the end;
* our ``next`` link carries a sealed token (:mod:`.paging`) saying where the scan stopped, so
  the next page continues exactly there, for the same requester and search only;
* ``total`` is given only when it is exact: on a first page that reached the end of the
  upstream results, and for ``_summary=count``, by counting the visible matches (up to
  ``scan_limit`` upstream entries; past it the count is withheld with an OperationOutcome);
* ``_include``/``_revinclude`` results are kept only when visible themselves **and** linked
  to a match we serve (one pulled in by a hidden match would betray it);
* one page examines at most ``scan_limit`` upstream matches; when they run out before the
  page is full, the page ends early with a ``next`` link (the only short page that is not
  the last: it says the scan limit was reached, not how many records were hidden);
* ``_summary``/``_elements`` are applied by us after the decision (the upstream always sends
  whole resources: a subset could lack what a Consent's deny matches on).

Only parameters this server defines (:mod:`fhir_consent.fhir.searchparams`) are forwarded, in
their parsed form; anything else is refused (strict) or dropped (lenient) like a local search,
so no chained or ``_has`` query can probe hidden records through the upstream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson

from fhir_consent.errors import BadRequest, Issue, operation_outcome
from fhir_consent.fhir.query import ParsedSearch
from fhir_consent.fhir.searching import raw_bundle
from fhir_consent.fhir.shaping import shape
from fhir_consent.gateway.decide import Decider, Upstreamed, linked
from fhir_consent.gateway.paging import PageState
from fhir_consent.gateway.upstream import Answer, UpstreamError

__all__ = ["Page", "SearchPlan", "count_visible", "collect_page", "render_page", "upstream_params"]

#: Result parameters we apply ourselves (never forwarded).
_OURS = frozenset({"_count", "_summary", "_elements", "_total", "_cursor"})
_INCLUDES = frozenset({"_include", "_revinclude"})

Fetch = Callable[[str | None], Awaitable[Answer]]


def upstream_params(
    parsed: ParsedSearch, page_size: int, *, includes: bool = True
) -> list[tuple[str, str]]:
    """The upstream query: the applied (parsed, known) parameters minus ours, plus our
    ``_count`` for the upstream pages."""
    out = [
        (k, v)
        for k, v in parsed.applied
        if k.split(":", 1)[0] not in _OURS and (includes or k.split(":", 1)[0] not in _INCLUDES)
    ]
    out.append(("_count", str(page_size)))
    return out


@dataclass(slots=True)
class SearchPlan:
    """One search request: what to fetch and how many to serve."""

    rtype: str
    first_url: str  # the upstream URL of the first page of this search
    count: int
    scan_limit: int


@dataclass(slots=True)
class Page:
    """What one of our pages serves."""

    matches: list[Upstreamed] = field(default_factory=list)
    included: list[Upstreamed] = field(default_factory=list)
    next_state: tuple[str, int] | None = None  # (upstream URL, skip)
    complete: bool = False  # the scan reached the end of the upstream results


def _bundle(answer: Answer) -> dict[str, Any]:
    if answer.status != 200:
        if answer.status in (400, 422):
            raise BadRequest("The upstream FHIR server refused this search")
        raise UpstreamError(f"The upstream FHIR server answered HTTP {answer.status}")
    try:
        data = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        raise UpstreamError("The upstream FHIR server did not answer with FHIR JSON") from None
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise UpstreamError("The upstream FHIR server did not answer with a Bundle")
    return data


def _split(
    data: dict[str, Any], rtype: str
) -> tuple[list[Upstreamed], list[Upstreamed], str | None]:
    matches: list[Upstreamed] = []
    includes: list[Upstreamed] = []
    for entry in data.get("entry") or []:
        if not isinstance(entry, dict):
            continue
        item = Upstreamed.parse(entry.get("resource"))
        if item is None:
            continue
        search = entry.get("search")
        mode = search.get("mode") if isinstance(search, dict) else None
        if mode == "outcome" or item.rtype == "OperationOutcome":
            continue  # upstream diagnostics never reach the caller
        if mode == "include" or (mode is None and item.rtype != rtype):
            includes.append(item)
        elif item.rtype == rtype:
            matches.append(item)
    nxt = None
    for link in data.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            nxt = url if isinstance(url, str) and url else None
    return matches, includes, nxt


async def collect_page(
    plan: SearchPlan,
    decider: Decider,
    fetch: Callable[[str], Awaitable[Answer]],
    start: PageState | None,
) -> Page:
    """Scan upstream pages from ``start`` (or the first page) until ``plan.count`` visible
    matches are collected, the upstream ends, or ``plan.scan_limit`` matches were examined."""
    page = Page()
    url = start.url if start is not None else plan.first_url
    skip = start.skip if start is not None else 0
    scanned = 0
    candidates: list[Upstreamed] = []
    while True:
        matches, includes, nxt = _split(_bundle(await fetch(url)), plan.rtype)
        candidates += [c for c in includes if decider.permits(c)]
        stop_at: int | None = None
        for index in range(skip, len(matches)):
            item = matches[index]
            scanned += 1
            if decider.permits(item):
                page.matches.append(item)
                if len(page.matches) >= plan.count:
                    stop_at = index + 1
                    break
        if stop_at is not None:
            if stop_at < len(matches):
                page.next_state = (url, stop_at)
            elif nxt is not None:
                page.next_state = (nxt, 0)
            else:
                page.complete = True
            break
        if nxt is None:
            page.complete = True
            break
        if scanned >= plan.scan_limit:
            page.next_state = (nxt, 0)
            break
        url, skip = nxt, 0
    page.included = linked(page.matches, candidates)
    return page


async def count_visible(
    plan: SearchPlan, decider: Decider, fetch: Callable[[str], Awaitable[Answer]]
) -> int | None:
    """The number of visible matches, or None past ``plan.scan_limit`` examined entries."""
    url: str | None = plan.first_url
    seen = total = 0
    while url is not None:
        matches, _includes, url = _split(_bundle(await fetch(url)), plan.rtype)
        for item in matches:
            seen += 1
            if decider.permits(item):
                total += 1
        if url is not None and seen >= plan.scan_limit:
            return None
    return total


def _entry(base: str, item: Upstreamed, mode: str, parsed: ParsedSearch) -> bytes:
    content = shape(item.raw, parsed.summary, parsed.elements) if mode == "match" else item.raw
    head = orjson.dumps({"fullUrl": f"{base}/{item.ref}", "search": {"mode": mode}})
    return head[:-1] + b',"resource":' + content + b"}"


def _link(base: str, rtype: str, applied: Sequence[tuple[str, str]], cursor: str | None) -> str:
    params = list(applied) + ([("_cursor", cursor)] if cursor else [])
    query = urlencode(params)
    return f"{base}/{rtype}" + (f"?{query}" if query else "")


def render_page(
    base: str,
    parsed: ParsedSearch,
    page: Page,
    *,
    cursor: str | None,
    next_cursor: str | None,
) -> bytes:
    """Our searchset Bundle for one page (links through us; ``total`` only when exact)."""
    rtype = parsed.spec.resource_type
    links = [{"relation": "self", "url": _link(base, rtype, parsed.applied, cursor)}]
    if cursor:
        links.append({"relation": "first", "url": _link(base, rtype, parsed.applied, None)})
    if next_cursor:
        links.append({"relation": "next", "url": _link(base, rtype, parsed.applied, next_cursor)})
    head: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if page.complete and cursor is None:
        head["total"] = len(page.matches)
    head["link"] = links
    entries = [_entry(base, m, "match", parsed) for m in page.matches]
    entries += [_entry(base, i, "include", parsed) for i in page.included]
    return raw_bundle(head, entries)


def render_count(base: str, parsed: ParsedSearch, total: int | None) -> bytes:
    """The ``_summary=count`` Bundle: an exact total, or none with an explanation."""
    rtype = parsed.spec.resource_type
    head: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        head["total"] = total
    head["link"] = [{"relation": "self", "url": _link(base, rtype, parsed.applied, None)}]
    if total is not None:
        return orjson.dumps(head)
    outcome = operation_outcome(
        [
            Issue(
                "The count is not available for this search: too many records to check. "
                "Narrow the search (for example with patient=).",
                "too-costly",
                "warning",
            )
        ]
    )
    entry = orjson.dumps({"resource": outcome, "search": {"mode": "outcome"}})
    return raw_bundle(head, [entry])
