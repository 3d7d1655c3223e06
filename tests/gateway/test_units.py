"""The gateway's parts on their own: settings, sealed paging tokens, the re-paging scan, the
include rule, the upstream client's error mapping and credentials, and key loading."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import ValidationError

from fhir_consent.gateway.config import GatewaySettings
from fhir_consent.gateway.decide import Upstreamed, linked
from fhir_consent.gateway.paging import PageState, Sealer, load_page_key
from fhir_consent.gateway.search import SearchPlan, collect_page, count_visible
from fhir_consent.gateway.upstream import (
    Answer,
    BackendServicesAuth,
    StaticToken,
    Upstream,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    load_private_key,
)
from smart_on_fhir.keys import generate_signing_key

UP = "http://ehr.internal:8080/fhir"


def settings(**kw: Any) -> GatewaySettings:
    return GatewaySettings(_env_file=None, **{"upstream": UP, **kw})  # type: ignore[call-arg]


# -- settings ---------------------------------------------------------------------------------


def test_settings_validation() -> None:
    assert settings().upstream == UP
    assert settings(upstream=UP + "/").upstream == UP
    assert GatewaySettings(_env_file=None).upstream is None  # type: ignore[call-arg]
    bad: list[dict[str, Any]] = [
        {"upstream": "ftp://x/fhir"},
        {"upstream": "http://x/fhir?a=b"},
        {"types": ["Consent"]},
        {"types": ["AuditEvent"]},
        {"types": ["Binary"]},
        {"types": ["Observation"]},
        {"types": ["Patient"], "write_types": ["Encounter"]},
        {"client_id": "c"},
        {"token": "t", "client_id": "c", "key_file": "k"},
    ]
    for kw in bad:
        with pytest.raises(ValidationError):
            settings(**kw)


# -- paging tokens ----------------------------------------------------------------------------


def test_sealed_tokens() -> None:
    key = bytes(range(32))
    now = [1000.0]
    sealer = Sealer(key, lifetime=60, clock=lambda: now[0])
    state = PageState(f"{UP}/DocumentReference?_count=7&x=1", 3, "q" * 32, "w" * 32)
    token = sealer.seal(state)
    assert "ehr.internal" not in token
    assert sealer.open(token) == state
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-1] ^= 1
    altered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    assert sealer.open(altered) is None
    assert Sealer(bytes(32)).open(token) is None  # another key
    for junk in ("", "!!!", "a" * 9000, base64.urlsafe_b64encode(b"{}").decode()):
        assert sealer.open(junk) is None
    now[0] += 61
    assert sealer.open(token) is None  # expired
    with pytest.raises(ValueError):
        Sealer(b"short")


def test_page_key_file_and_setting(tmp_path: Path) -> None:
    s = settings(keys_dir=tmp_path / "gw")
    first = load_page_key(s)
    assert load_page_key(s) == first
    path = tmp_path / "gw" / "paging.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) == 32
    hexed = settings(page_key="ab" * 32)
    b64 = settings(page_key=base64.b64encode(bytes.fromhex("ab" * 32)).decode())
    assert load_page_key(hexed) == load_page_key(b64) != first
    with pytest.raises(ValueError):
        load_page_key(settings(page_key="abcd"))


# -- the re-paging scan -----------------------------------------------------------------------


def doc(i: int, patient: str = "a") -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": f"d{i}",
        "subject": {"reference": f"Patient/{patient}"},
    }


class Visible:
    """A stand-in for the request's Decider: these ids are visible."""

    def __init__(self, ids: set[str]) -> None:
        self.ids = ids

    def permits(self, item: Upstreamed, _interaction: Any = None) -> bool:
        return item.ref in self.ids


def upstream_pages(
    resources: list[dict[str, Any]], size: int, extra: list[dict[str, Any]] | None = None
) -> dict[str, bytes]:
    """Upstream searchset pages by URL, with next links (and an outcome entry each)."""
    pages = {}
    chunks = [resources[i : i + size] for i in range(0, len(resources), size)] or [[]]
    for n, chunk in enumerate(chunks):
        url = f"{UP}/DocumentReference?page={n}"
        entries: list[dict[str, Any]] = [
            {"resource": r, "search": {"mode": "match"}} for r in chunk
        ]
        entries += [{"resource": r, "search": {"mode": "include"}} for r in extra or []]
        entries.append(
            {
                "resource": {"resourceType": "OperationOutcome", "id": "oo"},
                "search": {"mode": "outcome"},
            }
        )
        links = [{"relation": "self", "url": url}]
        if n + 1 < len(chunks):
            links.append({"relation": "next", "url": f"{UP}/DocumentReference?page={n + 1}"})
        pages[url] = orjson.dumps(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(resources),
                "link": links,
                "entry": entries,
            }
        )
    return pages


def fetcher(pages: dict[str, bytes], calls: list[str]) -> Any:
    async def fetch(url: str) -> Answer:
        calls.append(url)
        return Answer(200, pages[url], None, None, None)

    return fetch


def plan(count: int, scan_limit: int = 1000) -> SearchPlan:
    return SearchPlan("DocumentReference", f"{UP}/DocumentReference?page=0", count, scan_limit)


def test_pages_are_full_and_resume_where_they_stopped() -> None:
    resources = [doc(i) for i in range(30)]
    visible = {f"DocumentReference/d{i}" for i in range(30) if i % 3 == 0}  # 10 of 30
    pages = upstream_pages(resources, 7)
    calls: list[str] = []
    fetch = fetcher(pages, calls)
    got: list[str] = []
    state: PageState | None = None
    shapes = []
    for _ in range(5):
        page = asyncio.run(collect_page(plan(4), Visible(visible), fetch, state))  # type: ignore[arg-type]
        got += [m.ref for m in page.matches]
        shapes.append((len(page.matches), page.complete))
        if page.next_state is None:
            break
        state = PageState(page.next_state[0], page.next_state[1], "", "")
    assert shapes == [(4, False), (4, False), (2, True)]
    assert got == sorted(visible, key=lambda r: int(r.rsplit("d", 1)[1]))
    assert "OperationOutcome/oo" not in got


def test_scan_limit_ends_a_page_early_and_withholds_counts() -> None:
    resources = [doc(i) for i in range(40)]
    visible = {"DocumentReference/d35"}
    pages = upstream_pages(resources, 10)
    page = asyncio.run(
        collect_page(
            plan(5, scan_limit=20),
            Visible(visible),  # type: ignore[arg-type]
            fetcher(pages, []),
            None,
        )
    )
    assert page.matches == [] and not page.complete
    assert page.next_state == (f"{UP}/DocumentReference?page=2", 0)
    assert (
        asyncio.run(
            count_visible(
                plan(5, scan_limit=20),
                Visible(visible),  # type: ignore[arg-type]
                fetcher(pages, []),
            )
        )
        is None
    )
    assert (
        asyncio.run(
            count_visible(
                plan(5, scan_limit=100),
                Visible(visible),  # type: ignore[arg-type]
                fetcher(pages, []),
            )
        )
        == 1
    )


def test_upstream_errors_during_a_scan() -> None:
    async def broken(url: str) -> Answer:
        return Answer(200, b"not json", None, None, None)

    with pytest.raises(UpstreamError):
        asyncio.run(collect_page(plan(5), Visible(set()), broken, None))  # type: ignore[arg-type]

    async def refused(url: str) -> Answer:
        return Answer(400, b"{}", None, None, None)

    from fhir_consent.errors import BadRequest

    with pytest.raises(BadRequest):
        asyncio.run(collect_page(plan(5), Visible(set()), refused, None))  # type: ignore[arg-type]


def item(resource: dict[str, Any]) -> Upstreamed:
    parsed = Upstreamed.parse(resource)
    assert parsed is not None
    return parsed


def test_includes_only_linked_to_served_matches() -> None:
    served = [item(doc(1, "a"))]
    patient_a = item({"resourceType": "Patient", "id": "a"})
    patient_b = item({"resourceType": "Patient", "id": "b"})  # only a hidden doc names it
    prov = item(
        {
            "resourceType": "Provenance",
            "id": "p1",
            "target": [{"reference": "DocumentReference/d1"}],
        }
    )
    org = item({"resourceType": "Organization", "id": "o"})
    patient_a_linked = dict(
        patient_a.resource, managingOrganization={"reference": "Organization/o"}
    )
    kept = linked(served, [patient_b, prov, org, item(patient_a_linked)])
    assert {k.ref for k in kept} == {"Provenance/p1", "Patient/a", "Organization/o"}
    assert linked([], [patient_a, prov]) == []


# -- the upstream client ----------------------------------------------------------------------


class Counting(StaticToken):
    def __init__(self) -> None:
        super().__init__("t0")
        self.invalidated = 0

    def invalidate(self) -> None:
        self.invalidated += 1


def client(handler: Any, credentials: Any = None) -> Upstream:
    return Upstream(
        settings(), credentials or StaticToken("tok"), transport=httpx.MockTransport(handler)
    )


def test_upstream_maps_failures_and_owns_only_its_base() -> None:
    up = client(lambda r: httpx.Response(200))
    assert up.owns(f"{UP}/Patient?x=1") and up.owns(UP)
    assert not up.owns("http://ehr.internal:8080/fhirx/Patient")
    assert not up.owns("http://evil.example/fhir/Patient")
    assert not up.owns("https://ehr.internal:8080/fhir/Patient")
    assert up.relative(f"{UP}/Patient/1/_history/2") == "Patient/1/_history/2"
    with pytest.raises(UpstreamError):
        asyncio.run(up.get_url("http://evil.example/fhir/Patient"))

    def raise_(exc: Exception) -> Any:
        def handler(request: httpx.Request) -> httpx.Response:
            raise exc

        return handler

    cases = [
        (lambda r: httpx.Response(500, text="secret stack trace"), UpstreamError, 502),
        (lambda r: httpx.Response(403), UpstreamError, 502),
        (raise_(httpx.ConnectError("refused")), UpstreamUnavailable, 503),
        (raise_(httpx.ReadTimeout("slow")), UpstreamTimeout, 504),
    ]
    for handler, kind, status in cases:
        with pytest.raises(kind) as info:
            asyncio.run(client(handler).get("Patient/1"))
        assert info.value.status == status
        assert "secret" not in info.value.diagnostics


def test_upstream_sends_credentials_and_retries_once_on_401() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(401)

    creds = Counting()
    with pytest.raises(UpstreamError):
        asyncio.run(client(handler, creds).get("Patient/1"))
    assert seen == ["Bearer t0", "Bearer t0"] and creds.invalidated == 1
    ok = client(
        lambda r: httpx.Response(
            200, json={"resourceType": "Patient", "id": "1"}, headers={"etag": 'W/"3"'}
        )
    )
    answer = asyncio.run(ok.get("Patient/1"))
    assert answer.status == 200 and answer.etag == 'W/"3"'


def test_backend_services_discovers_signs_and_caches() -> None:
    key = generate_signing_key("ES384")
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.path.endswith("smart-configuration"):
            return httpx.Response(200, json={"token_endpoint": "http://auth.internal/token"})
        if request.url.path == "/token":
            form = dict(x.split("=", 1) for x in request.content.decode().split("&"))
            assert form["grant_type"] == "client_credentials"
            assert form["client_assertion_type"].startswith("urn")
            return httpx.Response(200, json={"access_token": "up-token", "expires_in": 300})
        assert request.headers["authorization"] == "Bearer up-token"
        return httpx.Response(200, json={"resourceType": "Patient", "id": "1"})

    now = [0.0]
    auth = BackendServicesAuth(
        upstream=UP, client_id="gw", key=key, scope="system/*.rs", clock=lambda: now[0]
    )
    up = client(handler, auth)
    asyncio.run(up.get("Patient/1"))
    asyncio.run(up.get("Patient/1"))
    paths = [r.url.path for r in requests]
    assert paths.count("/token") == 1 and paths.count("/fhir/.well-known/smart-configuration") == 1
    now[0] += 290  # past expiry minus the margin: renewed
    asyncio.run(up.get("Patient/1"))
    assert [r.url.path for r in requests].count("/token") == 2
    assert "gw" in repr(auth) and "up-token" not in repr(auth)


def test_private_key_files(tmp_path: Path) -> None:
    key = generate_signing_key("ES384")
    jwk = tmp_path / "k.json"
    jwk.write_text(json.dumps(dict(key.as_dict(private=True))))
    assert load_private_key(jwk).kid == key.kid
    pem = tmp_path / "k.pem"
    pem.write_bytes(key.as_pem(private=True))
    loaded = load_private_key(pem)
    assert loaded.kid == loaded.thumbprint()
    assert load_private_key(pem, "my-kid").kid == "my-kid"
    public = tmp_path / "pub.json"
    public.write_text(json.dumps(dict(key.as_dict(private=False))))
    with pytest.raises(ValueError):
        load_private_key(public)
