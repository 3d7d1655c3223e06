"""FHIR R4 REST checks: is the CapabilityStatement true?

For every resource type the server claims (or those of ``--types``), every claimed
interaction is exercised (create, read, vread, update with ``If-Match``, patch, delete,
history-instance, history-type, search-type, conditional create/update/delete) and every
claimed search parameter is searched with a resource that matches and one that does not
(:mod:`.samples`). Whole-system ``batch`` and ``transaction`` run when claimed. Headers
(``Location``, ``ETag``, ``Content-Type``), the error shape (OperationOutcome for 400, 404,
410, 412) and ``_count`` paging are checked along the way. What the server does not claim is
reported as ``skip`` ("not claimed"), so the kit can be pointed at any R4 server.

Every resource the kit creates carries the run's tag (``meta.tag`` with system
:data:`~conformance.samples.KIT_SYSTEM`) and is deleted at the end where the server allows it.
"""

from __future__ import annotations

import copy
import functools
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import orjson

from .capability import TYPE_INTERACTIONS, Capability, ResourceClaim, parse_capability
from .fhirhttp import (
    Api,
    bundle_ids,
    expect,
    is_fhir_json,
    is_outcome,
    json_of,
    next_link,
    version_of,
)
from .fhirtypes import is_known_type
from .report import Recorder, Result
from .samples import KIT_SYSTEM, Plan, SampleFactory, Unsupported, expression_for

__all__ = ["RestOptions", "run_rest"]

SECTION = "rest"
_JSON_PATCH = "application/json-patch+json"
_NOT_CLAIMED = "skip: not claimed"
_UNSEARCHED = {"_text", "_content", "_has", "_list", "_query", "_type", "_filter", "_in"}
_SPECIAL = {"_id", "_lastUpdated"}
_SERVER_MANAGED = ("meta",)


@dataclass(frozen=True)
class RestOptions:
    """``types``: only these resource types (default: every claimed type). ``token``: a
    bearer token for every request (e.g. from :func:`conformance.smart.backend_token`)."""

    types: tuple[str, ...] = ()
    token: str | None = None


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource without the elements the server manages (for comparisons)."""
    out = copy.deepcopy(resource)
    meta = out.pop("meta", None) or {}
    kept = {k: v for k, v in meta.items() if k in ("tag", "security", "profile")}
    if kept:
        out["meta"] = kept
    out.pop("text", None)
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """None when equal, else the first differing top-level element (name only)."""
    ca, cb = _content(a), _content(b)
    if ca == cb:
        return None
    for key in sorted(set(ca) | set(cb)):
        if ca.get(key) != cb.get(key):
            if key == "meta":
                for sub in sorted(set(ca.get("meta", {})) | set(cb.get("meta", {}))):
                    if ca.get("meta", {}).get(sub) != cb.get("meta", {}).get(sub):
                        return f"meta.{sub}"
            return key
    return "?"


@dataclass
class _Run:
    api: Api
    cap: Capability
    rec: Recorder
    run: str
    created: list[tuple[str, str]] = field(default_factory=list)
    strict_refs: bool = False
    ref_counter: int = 0
    _factory: SampleFactory | None = None

    # -- resources ----------------------------------------------------------------------------

    def created_id(self, r: httpx.Response, rtype: str) -> tuple[str, str, dict[str, Any]]:
        """(id, version, resource) of a 201 create or update response; fetches the resource
        from ``Location`` when the server returned no body."""
        location = r.headers.get("location", "")
        parts = location.rstrip("/").split("/")
        body: dict[str, Any] = {}
        if r.content:
            try:
                parsed = r.json()
                body = parsed if isinstance(parsed, dict) else {}
            except ValueError:
                body = {}
        if body.get("resourceType") != rtype:
            assert location, "no Location header and no resource in the response"
            read = self.api.get(location if "_history" not in location else location)
            expect(read, 200, what=f"GET the created {rtype} at Location")
            body = json_of(read)
        rid = body.get("id")
        if not isinstance(rid, str) and "_history" in parts:
            rid = parts[parts.index("_history") - 1]
        assert isinstance(rid, str), "the created resource has no id"
        vid = version_of(r.headers.get("etag")) or str((body.get("meta") or {}).get("versionId"))
        self.created.append((rtype, rid))
        return rid, vid, body

    def create(self, resource: dict[str, Any], what: str = "") -> tuple[str, str, dict[str, Any]]:
        rtype = resource["resourceType"]
        r = self.api.post(rtype, json=resource, headers={"prefer": "return=representation"})
        expect(r, 201, what=what or f"POST {rtype}")
        return self.created_id(r, rtype)

    def reference(self, rtype: str, purpose: str) -> str:
        """A reference target: made up, or (strict servers) a real minimal resource."""
        self.ref_counter += 1
        if self.strict_refs and self.cap.claims(rtype, "create") and is_known_type(rtype):
            factory = SampleFactory(self.run, frozenset(self.cap.resources), self._lazy_ref)
            try:
                rid, _v, _b = self.create(factory.base(rtype), what=f"POST {rtype} (target)")
                return f"{rtype}/{rid}"
            except (AssertionError, Unsupported):
                pass
        return self._lazy_ref(rtype, purpose)

    def _lazy_ref(self, rtype: str, _purpose: str) -> str:
        self.ref_counter += 1
        return f"{rtype}/conf{self.run}r{self.ref_counter}"

    def factory(self) -> SampleFactory:
        """The run's sample factory (one counter: every generated value is unique)."""
        if self._factory is None:
            self._factory = SampleFactory(self.run, frozenset(self.cap.resources), self.reference)
        return self._factory

    def probe_references(self, types: list[str]) -> str | None:
        """Does the server refuse references to resources that do not exist? Then every
        reference the samples carry points at a resource the kit creates first."""
        for rtype in types:
            if not self.cap.claims(rtype, "create"):
                continue
            for p in self.cap.resources[rtype].search_params:
                if p.type != "reference":
                    continue
                factory = self.factory()
                try:
                    plan = factory.plan(
                        rtype, p.name, p.type, expression_for(rtype, p.name, p.documentation)
                    )
                    resource = factory.base(rtype)
                    factory.place(resource, plan, plan.value_a, set())
                except Unsupported:
                    continue
                r = self.api.post(rtype, json=resource, headers={"prefer": "return=minimal"})
                if r.status_code == 201:
                    self.created_id(r, rtype)
                    return "references to missing resources are accepted"
                self.strict_refs = True
                return f"{rtype}.{plan.path} to a missing resource: {r.status_code}"
        return "skip: no creatable type with a reference parameter"

    def cleanup(self) -> None:
        left: list[str] = []
        skipped: set[str] = set()
        for rtype, rid in reversed(self.created):
            if not self.cap.claims(rtype, "delete"):
                skipped.add(rtype)
                left.append(f"{rtype}/{rid}")
                continue
            r = self.api.delete(f"{rtype}/{rid}")
            if r.status_code not in (200, 202, 204, 404, 410):
                left.append(f"{rtype}/{rid}")
        self.created.clear()

        def report() -> str | None:
            if skipped and len(left) == sum(1 for x in left if x.split("/")[0] in skipped):
                return (
                    f"skip: delete not claimed for {', '.join(sorted(skipped))}; "
                    f"{len(left)} resources left, tagged {KIT_SYSTEM}|{self.run}"
                )
            assert not left, f"could not delete {len(left)}: {', '.join(left[:5])}"
            return None

        self.rec.check(SECTION, "cleanup", "delete what the kit created", report)


# ---------------------------------------------------------------------------------------------
# Server-wide checks
# ---------------------------------------------------------------------------------------------


def _metadata(api: Api, rec: Recorder) -> Capability | None:
    holder: list[Capability] = []

    def fetch() -> str | None:
        r = api.get("metadata")
        expect(r, 200, what="GET metadata")
        assert is_fhir_json(r), f"Content-Type {r.headers.get('content-type')}"
        cap = parse_capability(json_of(r))
        assert cap.fhir_version.startswith("4.0"), f"fhirVersion {cap.fhir_version!r}"
        assert any("json" in f for f in cap.formats), "JSON is not among the formats"
        holder.append(cap)
        return f"{len(cap.resources)} resource types claimed"

    rec.check(SECTION, "metadata", "CapabilityStatement (R4, JSON)", fetch)
    return holder[0] if holder else None


def _errors(run: _Run, rtype: str) -> None:
    api, rec = run.api, run.rec

    def unknown_type() -> None:
        r = api.get(f"NotAResourceType{run.run}/x")
        expect(r, 404, 400, what="GET an unknown resource type")
        assert is_outcome(r), "no OperationOutcome"

    def missing() -> None:
        r = api.get(f"{rtype}/conf-missing-{run.run}")
        expect(r, 404, what=f"GET {rtype}/<unknown id>")
        assert is_outcome(r), "no OperationOutcome"
        assert is_fhir_json(r), f"Content-Type {r.headers.get('content-type')}"

    def malformed() -> str | None:
        if not run.cap.claims(rtype, "create"):
            return _NOT_CLAIMED
        r = api.request(
            "POST",
            rtype,
            content=b'{"resourceType": "' + rtype.encode() + b'", ',
            headers={"content-type": "application/fhir+json"},
        )
        expect(r, 400, what="POST malformed JSON")
        assert is_outcome(r), "no OperationOutcome"
        return None

    def invalid() -> str | None:
        if not run.cap.claims(rtype, "create"):
            return _NOT_CLAIMED
        r = api.post(rtype, json={"resourceType": rtype, "language": 42})
        if r.status_code == 201:
            run.created_id(r, rtype)
        expect(r, 400, 422, what="POST a resource with a number for a code")
        assert is_outcome(r), "no OperationOutcome"
        return None

    def strict() -> str | None:
        if not run.cap.claims(rtype, "search-type"):
            return _NOT_CLAIMED
        r = api.get(f"{rtype}?conf-unknown-{run.run}=1", headers={"prefer": "handling=strict"})
        expect(r, 400, what="unknown parameter with Prefer: handling=strict")
        assert is_outcome(r), "no OperationOutcome"
        return None

    rec.check(SECTION, "error:unknown-type", "unknown type -> 404 OperationOutcome", unknown_type)
    rec.check(SECTION, "error:404", f"{rtype}/<unknown id> -> 404 OperationOutcome", missing)
    rec.check(SECTION, "error:400-json", "malformed JSON -> 400 OperationOutcome", malformed)
    rec.check(SECTION, "error:400-invalid", "invalid element -> 400/422 OperationOutcome", invalid)
    rec.check(SECTION, "error:strict", "handling=strict, unknown param -> 400", strict)


# ---------------------------------------------------------------------------------------------
# One resource type
# ---------------------------------------------------------------------------------------------


class _TypeChecks:
    def __init__(self, run: _Run, claim: ResourceClaim) -> None:
        self.run = run
        self.api = run.api
        self.claim = claim
        self.rtype = claim.type
        self.sample_id: str | None = None
        self.versions: list[str] = []
        self.bodies: dict[str, dict[str, Any]] = {}
        self.sent: dict[str, Any] = {}
        self.created_at = run.api.now()
        self.plans: list[Plan] = []
        self.samples: dict[str, tuple[str, str]] = {}  # param → (id of A, id of B)

    def check(self, name: str, title: str, fn: Callable[[], str | None]) -> bool:
        return self.run.rec.check(SECTION, f"{self.rtype}:{name}", title, fn)

    def claimed(self, interaction: str) -> bool:
        return interaction in self.claim.interactions

    def needs(self, interaction: str, *, sample: bool = True) -> str | None:
        if not self.claimed(interaction):
            return _NOT_CLAIMED
        if sample and self.sample_id is None:
            return "skip: no sample resource (create failed or not claimed)"
        return None

    @property
    def path(self) -> str:
        return f"{self.rtype}/{self.sample_id}"

    # -- the interactions -------------------------------------------------------------------

    def run_all(self) -> None:
        t = self.rtype
        self.check("create", "create -> 201, Location, ETag", self.create)
        self.check("read", "read -> 200, ETag, Content-Type", self.read)
        self.check("vread", "vread -> the version", self.vread)
        self.check("update", "update with If-Match -> 200, new version", self.update)
        self.check("update-412", "update with a stale If-Match -> 412", self.stale_update)
        self.check("update-400", "update with another id in the body -> 400", self.wrong_id)
        self.check("update-create", "update to a new id -> 201 (updateCreate)", self.upsert)
        self.check("patch", "JSON Patch -> 200, only the patched element changes", self.patch)
        self.check("history-instance", "history of the sample, newest first", self.history)
        self.check("history-type", f"{t}/_history?_since= has the sample", self.history_type)
        self.check("search-type", "search -> searchset with the sample", self.search)
        self.check("search-post", f"POST {t}/_search (form)", self.search_post)
        self.search_params()
        self.check("paging", "_count=1 pages through every match with next links", self.paging)
        self.check("conditional-create", "If-None-Exist: 201, then 200", self.conditional_create)
        self.check("conditional-update", "PUT [type]?search", self.conditional_update)
        self.check("conditional-delete", "DELETE [type]?search", self.conditional_delete)
        self.check("delete", "delete -> 200/204; read -> 410; search omits it", self.delete)
        others = [i for i in self.claim.interactions if i not in TYPE_INTERACTIONS]
        for code in sorted(others):
            self.run.rec.skip(SECTION, f"{t}:{code}", code, "interaction not exercised by the kit")

    def create(self) -> str | None:
        if not self.claimed("create"):
            return self._existing_sample()
        sample = self.run.factory().base(self.rtype)
        r = self.api.post(self.rtype, json=sample, headers={"prefer": "return=representation"})
        expect(r, 201, what=f"POST {self.rtype}")
        location = r.headers.get("location", "")
        assert location, "no Location header"
        assert f"{self.rtype}/" in location and "/_history/" in location, (
            f"Location is not [base]/{self.rtype}/[id]/_history/[vid]: {location[:100]}"
        )
        etag = r.headers.get("etag")
        assert version_of(etag), f"no (weak) ETag: {etag!r}"
        rid, vid, body = self.run.created_id(r, self.rtype)
        tail = location.rstrip("/").split("/")
        assert tail[-3:] == [rid, "_history", vid], f"Location {location[:100]} ≠ id/version"
        if r.content:
            assert is_fhir_json(r), f"Content-Type {r.headers.get('content-type')}"
        self.sample_id = rid
        self.versions.append(vid)
        self.bodies[vid] = body
        self.sent = sample
        diff = _same(dict(body, id=None), dict(sample, id=None))
        assert diff is None, f"the created resource (response) differs from the one sent in {diff}"
        return None

    def _existing_sample(self) -> str | None:
        if not self.claimed("search-type"):
            return _NOT_CLAIMED
        r = self.api.get(self.rtype, params={"_count": "1"})
        ids = bundle_ids(json_of(r), self.rtype) if r.status_code == 200 else []
        if ids:
            self.sample_id = ids[0]
            return "skip: not claimed (read-only checks use an existing resource)"
        return _NOT_CLAIMED

    def read(self) -> str | None:
        if (skip := self.needs("read")) is not None:
            return skip
        r = self.api.get(self.path)
        expect(r, 200, what=f"GET {self.rtype}/[id]")
        assert is_fhir_json(r), f"Content-Type {r.headers.get('content-type')}"
        body = json_of(r)
        assert body.get("resourceType") == self.rtype, "wrong resourceType"
        assert body.get("id") == self.sample_id, "wrong id"
        vid = version_of(r.headers.get("etag"))
        assert vid, "no ETag"
        assert str((body.get("meta") or {}).get("versionId")) == vid, "ETag ≠ meta.versionId"
        assert r.headers.get("last-modified"), "no Last-Modified"
        if self.versions:
            assert vid == self.versions[-1], f"ETag {vid} ≠ created version {self.versions[-1]}"
            diff = _same(dict(body, id=None), dict(self.sent, id=None))
            assert diff is None, f"read differs from the resource created in {diff}"
            self.bodies[vid] = body
        return None

    def vread(self) -> str | None:
        if (skip := self.needs("vread")) is not None:
            return skip
        if not self.versions:
            return "skip: no version known"
        vid = self.versions[0]
        r = self.api.get(f"{self.path}/_history/{vid}")
        expect(r, 200, what="GET [type]/[id]/_history/[vid]")
        body = json_of(r)
        assert str((body.get("meta") or {}).get("versionId")) == vid, "wrong version"
        diff = _same(dict(body, id=None), dict(self.sent, id=None))
        assert diff is None, f"the first version differs from the resource created in {diff}"
        return None

    def _current(self) -> tuple[dict[str, Any], str]:
        r = self.api.get(self.path)
        expect(r, 200, what=f"GET {self.rtype}/[id]")
        return json_of(r), version_of(r.headers.get("etag")) or ""

    def update(self) -> str | None:
        if (skip := self.needs("update")) is not None:
            return skip
        if not self.claimed("read"):
            return "skip: needs read"
        body, vid = self._current()
        changed = dict(body, language="nl")
        r = self.api.put(
            self.path,
            json=changed,
            headers={"if-match": f'W/"{vid}"', "prefer": "return=representation"},
        )
        expect(r, 200, what=f"PUT {self.rtype}/[id] with If-Match")
        new = version_of(r.headers.get("etag"))
        assert new and new != vid, f"version did not change ({vid} → {new})"
        after, now = self._current()
        assert now == new, "read after update is not the new version"
        assert after.get("language") == "nl", "the update was not stored"
        diff = _same(after, changed)
        assert diff is None, f"stored resource differs from the update in {diff}"
        self.versions.append(new)
        self.bodies[new] = after
        return None

    def stale_update(self) -> str | None:
        if (skip := self.needs("update")) is not None:
            return skip
        if self.claim.versioning != "versioned-update":
            return f"skip: versioning is {self.claim.versioning!r}, not versioned-update"
        if len(self.versions) < 2:
            return "skip: needs a second version"
        body, _vid = self._current()
        r = self.api.put(
            self.path,
            json=dict(body, language="fr"),
            headers={"if-match": f'W/"{self.versions[0]}"'},
        )
        expect(r, 412, 409, what="PUT with a stale If-Match")
        assert is_outcome(r), "no OperationOutcome"
        after, vid = self._current()
        assert vid == self.versions[-1] and after.get("language") != "fr", "written anyway"
        return None

    def wrong_id(self) -> str | None:
        if (skip := self.needs("update")) is not None:
            return skip
        body, _vid = self._current()
        r = self.api.put(self.path, json=dict(body, id=f"conf-other-{self.run.run}"))
        if r.status_code in (200, 201):
            self.run.created.append((self.rtype, f"conf-other-{self.run.run}"))
        expect(r, 400, what="PUT with a different id in the body")
        assert is_outcome(r), "no OperationOutcome"
        return None

    def upsert(self) -> str | None:
        if not self.claimed("update"):
            return _NOT_CLAIMED
        if not self.claim.update_create:
            return "skip: updateCreate not claimed"
        rid = f"conf-{self.run.run}-{self.rtype.lower()}-put"
        body = dict(self.run.factory().base(self.rtype), id=rid)
        r = self.api.put(f"{self.rtype}/{rid}", json=body)
        expect(r, 201, what="PUT to a new id")
        self.run.created.append((self.rtype, rid))
        read = self.api.get(f"{self.rtype}/{rid}")
        expect(read, 200, what="GET the resource created by PUT")
        return None

    def patch(self) -> str | None:
        if (skip := self.needs("patch")) is not None:
            return skip
        if _JSON_PATCH not in self.run.cap.patch_formats:
            return "skip: no application/json-patch+json in patchFormat"
        before, vid = self._current()
        ops = [{"op": "add", "path": "/language", "value": "en"}]
        r = self.api.request(
            "PATCH",
            self.path,
            content=orjson.dumps(ops),
            headers={"content-type": _JSON_PATCH, "prefer": "return=representation"},
        )
        expect(r, 200, what="PATCH (JSON Patch)")
        new = version_of(r.headers.get("etag"))
        assert new and new != vid, "version did not change"
        after, now = self._current()
        self.versions.append(now)
        self.bodies[now] = after
        assert now == new, "read after patch is not the new version"
        expected = dict(before, language="en")
        diff = _same(after, expected)
        assert diff is None, f"after the patch, {diff} differs from the resource + the patch"
        if r.content:
            returned = json_of(r)
            diff = _same(returned, after)
            assert diff is None, f"the PATCH response differs from a read in {diff}"
            extra = set(returned.get("meta", {})) - set(after.get("meta", {}))
            assert not extra, f"the PATCH response has meta.{sorted(extra)[0]} that a read has not"
        return None

    def history(self) -> str | None:
        if (skip := self.needs("history-instance")) is not None:
            return skip
        r = self.api.get(f"{self.path}/_history")
        expect(r, 200, what="GET [type]/[id]/_history")
        bundle = json_of(r)
        assert bundle.get("type") == "history", f"Bundle.type {bundle.get('type')!r}"
        seen = [
            str(((e.get("resource") or {}).get("meta") or {}).get("versionId"))
            for e in bundle.get("entry") or []
            if e.get("resource")
        ]
        want = list(reversed(self.versions))
        assert seen[: len(want)] == want, f"versions {seen[:5]} ≠ newest first {want}"
        for entry in bundle.get("entry") or []:
            assert (entry.get("request") or {}).get("method"), "an entry has no request.method"
        if self.claimed("read"):
            current, _ = self._current()
            newest = (bundle.get("entry") or [{}])[0].get("resource") or {}
            diff = _same(newest, current)
            assert diff is None, f"the newest history entry differs from a read in {diff}"
            extra = set(newest.get("meta", {})) - set(current.get("meta", {}))
            assert not extra, f"the history entry has meta.{sorted(extra)[0]} that a read has not"
        return None

    def history_type(self) -> str | None:
        if (skip := self.needs("history-type")) is not None:
            return skip
        since = (self.created_at - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
        r = self.api.get(f"{self.rtype}/_history", params={"_since": since})
        expect(r, 200, what="GET [type]/_history")
        found = False
        for page in self.api.pages(r):
            assert page.get("type") == "history", f"Bundle.type {page.get('type')!r}"
            ids = {(e.get("resource") or {}).get("id") for e in page.get("entry") or []}
            if self.sample_id in ids:
                found = True
                break
        assert found, "the sample is not in the type history since its creation"
        return None

    def _search(self, params: dict[str, str]) -> list[str]:
        r = self.api.get(self.rtype, params=params)
        expect(r, 200, what=f"GET {self.rtype}?{'&'.join(params)}")
        bundle = json_of(r)
        assert bundle.get("resourceType") == "Bundle", "not a Bundle"
        assert bundle.get("type") == "searchset", f"Bundle.type {bundle.get('type')!r}"
        ids: list[str] = []
        for page in self.api.pages(r):
            ids += bundle_ids(page, self.rtype)
        return ids

    def _by_id(self) -> bool:
        return self.claim.param("_id") is not None

    def search(self) -> str | None:
        if (skip := self.needs("search-type")) is not None:
            return skip
        if not self._by_id():
            ids = self._search({"_count": "5"})
            assert ids, "a search without parameters found nothing"
            return "no _id parameter: searched without parameters"
        r = self.api.get(self.rtype, params={"_id": str(self.sample_id)})
        expect(r, 200, what=f"GET {self.rtype}?_id=")
        assert is_fhir_json(r), f"Content-Type {r.headers.get('content-type')}"
        bundle = json_of(r)
        assert bundle.get("type") == "searchset", f"Bundle.type {bundle.get('type')!r}"
        assert any(link.get("relation") == "self" for link in bundle.get("link") or []), (
            "no self link"
        )
        entries = bundle.get("entry") or []
        assert bundle_ids(bundle, self.rtype) == [self.sample_id], "the sample was not found"
        entry = entries[0]
        assert str(entry.get("fullUrl", "")).endswith(f"{self.rtype}/{self.sample_id}"), (
            "fullUrl is not the resource's URL"
        )
        if "total" in bundle:
            assert bundle["total"] == 1, f"total {bundle['total']}"
        if self.versions and self.claimed("read"):
            current, _ = self._current()
            diff = _same(entry["resource"], current)
            assert diff is None, f"the search entry differs from a read in {diff}"
            extra = set(entry["resource"].get("meta", {})) - set(current.get("meta", {}))
            assert not extra, f"the search entry has meta.{sorted(extra)[0]} that a read has not"
        return None

    def search_post(self) -> str | None:
        if (skip := self.needs("search-type")) is not None:
            return skip
        if not self._by_id():
            return "skip: no _id parameter claimed"
        r = self.api.request(
            "POST",
            f"{self.rtype}/_search",
            data={"_id": str(self.sample_id)},
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        expect(r, 200, what=f"POST {self.rtype}/_search")
        assert bundle_ids(json_of(r), self.rtype) == [self.sample_id], "the sample was not found"
        return None

    # -- search parameters ------------------------------------------------------------------

    def search_params(self) -> None:
        t = self.rtype
        if not self.claimed("search-type"):
            for p in self.claim.search_params:
                self.run.rec.skip(
                    SECTION, f"{t}:search:{p.name}", p.type, "search-type not claimed"
                )
            return
        plans: list[Plan] = []
        factory = self.run.factory()
        for p in self.claim.search_params:
            tid = f"{t}:search:{p.name}"
            if p.name in _SPECIAL:
                continue
            if p.name in _UNSEARCHED:
                self.run.rec.skip(SECTION, tid, p.type, "parameter not exercised by the kit")
                continue
            if not self.claimed("create"):
                self.run.rec.skip(SECTION, tid, p.type, "needs create (not claimed)")
                continue
            try:
                expression = expression_for(t, p.name, p.documentation)
                plans.append(factory.plan(t, p.name, p.type, expression))
            except Unsupported as error:
                self.run.rec.skip(SECTION, tid, p.type, f"not exercised: {error}")
        refused = self._create_samples(factory, plans)
        self.plans = plans
        for param in ("_id", "_lastUpdated"):
            claim = self.claim.param(param)
            if claim is not None:
                fn = self._id_search if param == "_id" else self._last_updated
                self.check(f"search:{param}", claim.type, fn)
        for plan in plans:
            title = f"{plan.param_type} {self.rtype}.{plan.path}"
            if plan.param in refused:
                self.run.rec.fail(
                    SECTION, f"{self.rtype}:search:{plan.param}", title, refused[plan.param]
                )
                continue
            self.check(f"search:{plan.param}", title, functools.partial(self._param_search, plan))

    def _create_samples(self, factory: SampleFactory, plans: list[Plan]) -> dict[str, str]:
        """Create resource A and B carrying every plan's values (a pair per plan that
        collides with another); returns the plans whose samples the server refused."""
        refused: dict[str, str] = {}
        if not plans:
            return refused
        groups: list[tuple[list[Plan], dict[str, Any], dict[str, Any]]] = []
        a, b = factory.base(self.rtype), factory.base(self.rtype)
        owned_a: set[str] = set()
        owned_b: set[str] = set()
        merged: list[Plan] = []
        solo: list[Plan] = []
        for plan in plans:
            ta, tb, oa, ob = copy.deepcopy(a), copy.deepcopy(b), set(owned_a), set(owned_b)
            try:
                ok = factory.place(ta, plan, plan.value_a, oa) and factory.place(
                    tb, plan, plan.value_b, ob
                )
            except Unsupported:
                ok = False
            if ok:
                a, b, owned_a, owned_b = ta, tb, oa, ob
                merged.append(plan)
            else:
                solo.append(plan)
        groups.append((merged, a, b))
        for plan in solo:
            pa, pb = factory.base(self.rtype), factory.base(self.rtype)
            try:
                factory.place(pa, plan, plan.value_a, set())
                factory.place(pb, plan, plan.value_b, set())
            except Unsupported as error:
                refused[plan.param] = f"cannot build a sample: {error}"
                continue
            groups.append(([plan], pa, pb))
        for group, ga, gb in groups:
            if not group:
                continue
            problem = self._create_pair(group, ga, gb)
            if problem is None:
                continue
            if len(group) == 1:
                refused[group[0].param] = problem
                continue
            for plan in group:  # find out which parameter's value the server refuses
                pa, pb = factory.base(self.rtype), factory.base(self.rtype)
                factory.place(pa, plan, plan.value_a, set())
                factory.place(pb, plan, plan.value_b, set())
                single = self._create_pair([plan], pa, pb)
                if single is not None:
                    refused[plan.param] = single
        return refused

    def _create_pair(self, plans: list[Plan], a: dict[str, Any], b: dict[str, Any]) -> str | None:
        ids = []
        for label, resource in (("A", a), ("B", b)):
            r = self.api.post(self.rtype, json=resource, headers={"prefer": "return=minimal"})
            if r.status_code != 201:
                return f"the server refused sample {label}: {r.status_code}"
            rid, _v, _body = self.run.created_id(r, self.rtype)
            ids.append(rid)
        for plan in plans:
            self.samples[plan.param] = (ids[0], ids[1])
        return None

    def _restricted(self, params: dict[str, str], pair: tuple[str, str]) -> list[str]:
        if self._by_id():
            return self._search({**params, "_id": ",".join(pair)})
        return self._search({**params, "_count": "100"})

    def _param_search(self, plan: Plan) -> str | None:
        pair = self.samples.get(plan.param)
        assert pair is not None, "no samples"
        a, b = pair
        found = self._restricted({plan.param: plan.query}, pair)
        assert a in found, f"{plan.param}={plan.query[:60]} did not find the matching resource"
        assert b not in found, f"{plan.param}={plan.query[:60]} found the non-matching resource"
        return None

    def _id_search(self) -> str | None:
        pair = next(iter(self.samples.values()), None)
        if pair is None:
            if self.sample_id is None:
                return "skip: no samples"
            found = self._search({"_id": self.sample_id})
            assert found == [self.sample_id], "_id did not find exactly the sample"
            return None
        a, b = pair
        found = self._search({"_id": a})
        assert found == [a], f"_id=A found {found[:3]}"
        return None

    def _last_updated(self) -> str | None:
        pair = next(iter(self.samples.values()), None)
        if pair is None:
            return "skip: no samples"
        day = (self.api.now() - timedelta(days=1)).strftime("%Y-%m-%d")
        found = set(self._restricted({"_lastUpdated": f"ge{day}"}, pair))
        assert set(pair) <= found, f"_lastUpdated=ge{day} did not find resources created now"
        none = set(self._restricted({"_lastUpdated": f"lt{day}"}, pair))
        assert not (set(pair) & none), f"_lastUpdated=lt{day} found resources created now"
        return None

    # -- paging, conditional interactions, delete ---------------------------------------------

    def paging(self) -> str | None:
        if (skip := self.needs("search-type", sample=False)) is not None:
            return skip
        expected = {rid for pair in self.samples.values() for rid in pair}
        if self.sample_id:
            expected.add(self.sample_id)
        expected = set(sorted(expected)[:4])
        if len(expected) < 2:
            return "skip: fewer than two resources of this type were created"
        if self._by_id():
            params = {"_id": ",".join(sorted(expected)), "_count": "1"}
        else:
            return "skip: needs the _id parameter"
        r = self.api.get(self.rtype, params=params)
        expect(r, 200, what=f"GET {self.rtype}?_count=1")
        seen: list[str] = []
        pages = 0
        for page in self.api.pages(r, limit=len(expected) + 2):
            pages += 1
            ids = bundle_ids(page, self.rtype)
            assert len(ids) <= 1, f"page {pages} has {len(ids)} entries with _count=1"
            seen += ids
            if len(seen) < len(expected):
                assert next_link(page), f"page {pages} has no next link"
        assert len(seen) == len(set(seen)), "a resource appeared on two pages"
        assert set(seen) == expected, f"paging found {len(seen)} of {len(expected)}"
        return None

    def _unique_token_plan(self) -> Plan | None:
        factory = self.run.factory()
        for p in self.claim.search_params:
            if p.type != "token" or p.name.startswith("_"):
                continue
            try:
                plan = factory.plan(
                    self.rtype, p.name, p.type, expression_for(self.rtype, p.name, p.documentation)
                )
            except Unsupported:
                continue
            if plan.hops[-1].element.type == "Identifier":
                return plan
        return None

    def _conditional_sample(self) -> tuple[Plan, dict[str, Any]] | None:
        plan = self._unique_token_plan()
        if plan is None:
            return None
        factory = self.run.factory()
        resource = factory.base(self.rtype)
        if not factory.place(resource, plan, plan.value_a, set()):
            return None
        return plan, resource

    def conditional_create(self) -> str | None:
        if not self.claimed("create"):
            return _NOT_CLAIMED
        if not self.claim.conditional_create:
            return "skip: conditionalCreate not claimed"
        found = self._conditional_sample()
        if found is None:
            return "skip: no Identifier search parameter to make a condition with"
        plan, resource = found
        condition = f"{plan.param}={plan.query}"
        first = self.api.post(self.rtype, json=resource, headers={"if-none-exist": condition})
        expect(first, 201, what="POST with If-None-Exist (no match)")
        rid, _v, _b = self.run.created_id(first, self.rtype)
        again = self.api.post(self.rtype, json=resource, headers={"if-none-exist": condition})
        expect(again, 200, what="POST with If-None-Exist (one match)")
        if again.content and again.json().get("resourceType") == self.rtype:
            assert again.json().get("id") == rid, "returned another resource"
        if self.claimed("search-type"):
            ids = self._search({plan.param: plan.query})
            assert ids == [rid], f"{len(ids)} resources match after two conditional creates"
        return None

    def conditional_update(self) -> str | None:
        if not self.claimed("update"):
            return _NOT_CLAIMED
        if not self.claim.conditional_update:
            return "skip: conditionalUpdate not claimed"
        found = self._conditional_sample()
        if found is None:
            return "skip: no Identifier search parameter to make a condition with"
        plan, resource = found
        rid, _v, _b = self.run.create(resource)
        r = self.api.put(
            f"{self.rtype}?{plan.param}={plan.query}", json=dict(resource, language="de")
        )
        expect(r, 200, what="PUT [type]?condition (one match)")
        after = self.api.get(f"{self.rtype}/{rid}")
        expect(after, 200, what="GET after the conditional update")
        assert after.json().get("language") == "de", "the matching resource was not updated"
        return None

    def conditional_delete(self) -> str | None:
        if not self.claimed("delete"):
            return _NOT_CLAIMED
        if self.claim.conditional_delete not in ("single", "multiple"):
            return f"skip: conditionalDelete is {self.claim.conditional_delete!r}"
        found = self._conditional_sample()
        if found is None:
            return "skip: no Identifier search parameter to make a condition with"
        plan, resource = found
        rid, _v, _b = self.run.create(resource)
        r = self.api.delete(f"{self.rtype}?{plan.param}={plan.query}")
        expect(r, 200, 202, 204, what="DELETE [type]?condition")
        gone = self.api.get(f"{self.rtype}/{rid}")
        expect(gone, 410, 404, what="GET after the conditional delete")
        return None

    def delete(self) -> str | None:
        if (skip := self.needs("delete")) is not None:
            return skip
        if not self.versions:
            return "skip: the kit deletes only what it created"
        r = self.api.delete(self.path)
        expect(r, 200, 202, 204, what=f"DELETE {self.rtype}/[id]")
        if self.claimed("read"):
            gone = self.api.get(self.path)
            expect(gone, 410, what="GET after DELETE")
            assert is_outcome(gone), "410 without an OperationOutcome"
        if self.claimed("search-type") and self._by_id():
            assert self._search({"_id": str(self.sample_id)}) == [], "search still finds it"
        again = self.api.delete(self.path)
        expect(again, 200, 202, 204, what="DELETE again (already deleted)")
        self.sample_id = None
        return None


# ---------------------------------------------------------------------------------------------
# batch and transaction
# ---------------------------------------------------------------------------------------------


def _writable_type(run: _Run, types: list[str]) -> str | None:
    for preferred in ("Organization", "Patient", "Practitioner", *types):
        if preferred in types and run.cap.claims(preferred, "create") and is_known_type(preferred):
            return preferred
    return None


def _reference_into(run: _Run, target: str, types: list[str]) -> tuple[str, Plan] | None:
    """A claimed, creatable type with a reference search parameter that can point at
    ``target`` (for the transaction's urn:uuid resolution check)."""
    factory = run.factory()
    for rtype in types:
        claim = run.cap.resources[rtype]
        if not run.cap.claims(rtype, "create") or not run.cap.claims(rtype, "read"):
            continue
        for p in claim.search_params:
            if p.type != "reference":
                continue
            try:
                plan = factory.plan(
                    rtype, p.name, p.type, expression_for(rtype, p.name, p.documentation)
                )
            except Unsupported:
                continue
            if plan.references and plan.references[0].startswith(f"{target}/"):
                return rtype, plan
    return None


def _system(run: _Run, types: list[str]) -> None:
    api, rec = run.api, run.rec
    t0 = _writable_type(run, types)

    def batch() -> str | None:
        if "batch" not in run.cap.system_interactions:
            return _NOT_CLAIMED
        if t0 is None:
            return "skip: no creatable type"
        bundle = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"resource": run.factory().base(t0), "request": {"method": "POST", "url": t0}},
                {"request": {"method": "GET", "url": f"{t0}/conf-missing-{run.run}"}},
            ],
        }
        r = api.post("", json=bundle)
        expect(r, 200, what="POST [base] batch")
        body = json_of(r)
        assert body.get("type") == "batch-response", f"Bundle.type {body.get('type')!r}"
        entries = body.get("entry") or []
        assert len(entries) == 2, f"{len(entries)} response entries for 2"
        first = entries[0].get("response") or {}
        second = entries[1].get("response") or {}
        assert str(first.get("status", "")).startswith("201"), f"create: {first.get('status')}"
        assert str(second.get("status", "")).startswith("404"), f"read: {second.get('status')}"
        location = str(first.get("location", ""))
        rid = location.split("/_history")[0].rstrip("/").split("/")[-1]
        assert rid, "no location for the created entry"
        run.created.append((t0, rid))
        read = api.get(f"{t0}/{rid}")
        expect(read, 200, what="GET the resource the batch created (despite the failed entry)")
        return None

    def transaction() -> str | None:
        if "transaction" not in run.cap.system_interactions:
            return _NOT_CLAIMED
        if t0 is None:
            return "skip: no creatable type"
        full = f"urn:uuid:{uuid.uuid4()}"
        second = _reference_into(run, t0, types)
        entries: list[dict[str, Any]] = [
            {
                "fullUrl": full,
                "resource": run.factory().base(t0),
                "request": {"method": "POST", "url": t0},
            }
        ]
        factory = run.factory()
        if second is not None:
            u, plan = second
            resource = factory.base(u)
            factory.place(resource, plan, {"reference": full}, set())
        else:
            u, plan, resource = t0, None, factory.base(t0)
        entries.append({"resource": resource, "request": {"method": "POST", "url": u}})
        r = api.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
        expect(r, 200, what="POST [base] transaction")
        body = json_of(r)
        assert body.get("type") == "transaction-response", f"Bundle.type {body.get('type')!r}"
        out = body.get("entry") or []
        assert len(out) == 2, f"{len(out)} response entries for 2"
        made: list[str] = []
        for entry, rtype in zip(out, (t0, u), strict=True):
            response = entry.get("response") or {}
            assert str(response.get("status", "")).startswith("201"), (
                f"entry status {response.get('status')}"
            )
            rid = str(response.get("location", "")).split("/_history")[0].rstrip("/").split("/")[-1]
            assert rid, "no location"
            run.created.append((rtype, rid))
            made.append(rid)
        if plan is None:
            return "no type references another here: urn:uuid resolution not checked"
        read = api.get(f"{u}/{made[1]}")
        expect(read, 200, what="GET the second entry")
        refs = _references(json_of(read))
        assert any(ref.endswith(f"{t0}/{made[0]}") for ref in refs), (
            "the urn:uuid reference was not replaced by the new resource's reference"
        )
        return None

    def atomic() -> str | None:
        if "transaction" not in run.cap.system_interactions:
            return _NOT_CLAIMED
        if t0 is None or not run.cap.claims(t0, "search-type"):
            return "skip: no creatable, searchable type"
        if run.cap.resources[t0].param("_tag") is None:
            return "skip: needs the _tag parameter"
        marker = f"atomic-{run.run}"
        good = run.factory().base(t0)
        good["meta"]["tag"].append({"system": KIT_SYSTEM, "code": marker})
        bad_id = f"conf-{run.run}-a"
        bad = dict(run.factory().base(t0), id=f"conf-{run.run}-b")
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": good, "request": {"method": "POST", "url": t0}},
                {"resource": bad, "request": {"method": "PUT", "url": f"{t0}/{bad_id}"}},
            ],
        }
        r = api.post("", json=bundle)
        if r.status_code == 200:
            for entry in json_of(r).get("entry") or []:
                loc = str((entry.get("response") or {}).get("location", ""))
                rid = loc.split("/_history")[0].rstrip("/").split("/")[-1]
                if rid:
                    run.created.append((t0, rid))
        expect(r, 400, 404, 409, 412, 422, what="a transaction with a failing entry")
        assert is_outcome(r), "no OperationOutcome"
        found = api.get(t0, params={"_tag": f"{KIT_SYSTEM}|{marker}"})
        expect(found, 200, what="search for the first entry")
        assert not bundle_ids(json_of(found), t0), "the first entry was written anyway"
        return None

    rec.check(SECTION, "batch", "batch: entries succeed or fail independently", batch)
    rec.check(
        SECTION, "transaction", "transaction: 201s, urn:uuid references resolved", transaction
    )
    rec.check(SECTION, "transaction-atomic", "a failing transaction writes nothing", atomic)


def _references(resource: Any) -> list[str]:
    out: list[str] = []
    if isinstance(resource, dict):
        for key, value in resource.items():
            if key == "reference" and isinstance(value, str):
                out.append(value)
            else:
                out += _references(value)
    elif isinstance(resource, list):
        for item in resource:
            out += _references(item)
    return out


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def run_rest(base: str, options: RestOptions, *, http: httpx.Client | None = None) -> list[Result]:
    """Run the REST checks against the FHIR base *base*; returns the results in order."""
    own = http is None
    client = http or httpx.Client(timeout=30.0)
    rec = Recorder()
    try:
        api = Api(client, base, options.token)
        cap = _metadata(api, rec)
        if cap is None:
            return rec.results
        run = _Run(api, cap, rec, run=secrets.token_hex(4))
        claimed = list(cap.resources)
        wanted = list(options.types) or claimed
        types = [t for t in wanted if t in cap.resources]
        for t in wanted:
            if t not in cap.resources:
                rec.skip(SECTION, f"{t}:*", "resource type", "not claimed")
        if not types:
            return rec.results
        probe_type = next((t for t in types if cap.claims(t, "search-type")), None)
        if probe_type is not None and options.token is None:
            probe = api.get(probe_type, params={"_count": "1"})
            if probe.status_code == 401:
                rec.skip(
                    SECTION,
                    "access",
                    "the FHIR API without a token",
                    "the server requires a token: pass --backend-client-id and --backend-key",
                )
                return rec.results
        rec.check(
            SECTION,
            "references",
            "referential integrity probe",
            lambda: run.probe_references(types),
        )
        _errors(run, types[0])
        try:
            for rtype in types:
                if not is_known_type(rtype):
                    rec.skip(SECTION, f"{rtype}:*", "resource type", "not an R4 type the kit knows")
                    continue
                _TypeChecks(run, cap.resources[rtype]).run_all()
            _system(run, types)
        finally:
            run.cleanup()
        return rec.results
    finally:
        if own:
            client.close()
