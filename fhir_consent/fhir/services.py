"""The write and read services: one FHIR interaction = validate → store → notify listeners,
all inside the caller's database transaction (so a failure writes nothing, and a listener —
the ledger outbox, the audit trail — commits atomically with the change).

Time is injected (``clock`` returns microseconds since the epoch) so tests are deterministic.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import jsonpatch
import orjson
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from fhir_consent.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    PreconditionFailed,
    Unprocessable,
)
from fhir_consent.fhir import searchparams
from fhir_consent.fhir.query import parse_search
from fhir_consent.fhir.validation import SUPPORTED_TYPES, is_valid_id, validate_resource
from fhir_consent.store.repository import ConcurrentUpdate, CurrentRow, Repository, VersionRow
from fhir_consent.store.search import run_search

__all__ = [
    "AccessGuard",
    "Clock",
    "PatchSource",
    "check_read_target",
    "readable_current",
    "readable_version",
    "visible_current",
    "PreWrite",
    "ResourceService",
    "WriteEvent",
    "WriteListener",
    "WriteResult",
    "finalize",
    "format_instant",
    "system_clock",
]

Clock = Callable[[], int]


def system_clock() -> int:
    """Now, in microseconds since the Unix epoch (UTC)."""
    return time.time_ns() // 1000


def format_instant(us: int) -> str:
    """A FHIR ``instant`` with microsecond precision, UTC (``…Z``)."""
    dt = datetime.fromtimestamp(us / 1_000_000, UTC)
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class WriteEvent:
    """What a listener sees of one committed-together change."""

    method: str  # create | update | patch | delete
    previous: CurrentRow | None
    current: CurrentRow
    resource: Mapping[str, Any] | None  # the new version (None for a delete)


class WriteListener(Protocol):
    def __call__(self, conn: Connection, event: WriteEvent) -> None: ...


class PreWrite(Protocol):
    """Transforms a validated resource before it is stored, in the write's transaction (e.g.
    moving inline attachment bytes into Binary storage). Returns the resource to store."""

    def __call__(
        self,
        service: ResourceService,
        res_type: str,
        resource: dict[str, Any],
        previous: CurrentRow | None,
    ) -> dict[str, Any]: ...


class PatchSource(Protocol):
    """The form of the current version a JSON Patch applies to, for a type whose stored form
    is not what clients read (Binary: the content lives outside the resource). None: this
    hook does not apply, patch the stored form."""

    def __call__(
        self, service: ResourceService, row: CurrentRow, operations: list[Any]
    ) -> dict[str, Any] | None: ...


class AccessGuard(Protocol):
    """What the caller may see and write (see :mod:`fhir_consent.fhir.visibility`)."""

    def can_see(self, conn: Connection, row: CurrentRow) -> bool: ...

    def can_write(self, resource_type: str, index: searchparams.IndexRows, res_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class WriteResult:
    row: CurrentRow
    created: bool  # a new resource came into being (201)
    existing: bool = False  # conditional create matched an existing resource (200)


def _check_type(res_type: str) -> None:
    if res_type not in SUPPORTED_TYPES:
        raise NotFound(f"Resource type '{res_type[:64]}' is not supported by this server")


def _check_id(res_id: str) -> None:
    if not is_valid_id(res_id):
        raise BadRequest("The resource id is not a valid FHIR id")


class ResourceService:
    """FHIR interactions over one open transaction."""

    def __init__(
        self,
        conn: Connection,
        *,
        clock: Clock = system_clock,
        listeners: Sequence[WriteListener] = (),
        guard: AccessGuard | None = None,
        prewrites: Sequence[PreWrite] = (),
        patch_sources: Sequence[PatchSource] = (),
    ) -> None:
        self.conn = conn
        self.repo = Repository(conn)
        self.clock = clock
        self.listeners = tuple(listeners)
        self.guard = guard
        self.prewrites = tuple(prewrites)
        self.patch_sources = tuple(patch_sources)

    def _prewrite(
        self, res_type: str, resource: dict[str, Any], previous: CurrentRow | None
    ) -> dict[str, Any]:
        for hook in self.prewrites:
            resource = hook(self, res_type, resource, previous)
        return resource

    def _visible(self, row: CurrentRow) -> bool:
        return self.guard is None or self.guard.can_see(self.conn, row)

    def _index(
        self, res_type: str, res_id: str, parsed: Mapping[str, Any]
    ) -> searchparams.IndexRows:
        index = searchparams.extract(parsed)
        if self.guard is not None and not self.guard.can_write(res_type, index, res_id):
            raise Forbidden(f"This access token may not write this {res_type}")
        return index

    # -- reads -----------------------------------------------------------------------------

    def read(self, res_type: str, res_id: str, *, for_update: bool = False) -> CurrentRow:
        """R4 http.html §3.1.0.2 read: 404 unknown, 410 deleted. ``for_update`` locks the row
        for the rest of the transaction (read-modify-write such as PATCH)."""
        check_read_target(res_type, res_id)
        row = self.repo.current(res_type, res_id, for_update=for_update)
        return readable_current(res_type, res_id, row, self._visible)

    def vread(self, res_type: str, res_id: str, version: str) -> VersionRow:
        """R4 http.html §3.1.0.3 vread: 404 unknown version, 410 deleted version."""
        number = check_read_target(res_type, res_id, version)
        assert number is not None
        current = self.repo.current(res_type, res_id)
        visible_current(res_type, res_id, current, self._visible)
        row = self.repo.version(res_type, res_id, number)
        return readable_version(res_type, res_id, version, row)

    # -- writes ----------------------------------------------------------------------------

    def create(
        self,
        res_type: str,
        resource: dict[str, Any],
        *,
        if_none_exist: Sequence[tuple[str, str]] | None = None,
        res_id: str | None = None,
        validated: bool = False,
    ) -> WriteResult:
        """R4 http.html §3.1.0.7 create (and §3.1.0.8 conditional create). Client ids are
        ignored; ``res_id`` is for transaction bundles that pre-assign ids. ``validated``:
        the caller already ran :func:`validate_resource` on this very ``resource`` (outside
        the transaction)."""
        _check_type(res_type)
        if not validated:
            validate_resource(resource, res_type)
        if if_none_exist is not None:
            matches = self.conditional_matches(res_type, if_none_exist)
            if len(matches) == 1:
                return WriteResult(matches[0], created=False, existing=True)
            if len(matches) > 1:
                raise PreconditionFailed("If-None-Exist matched more than one resource")
        new_id = res_id or str(uuid.uuid4())
        resource = self._prewrite(res_type, resource, None)
        now = self.clock()
        content, parsed = finalize(resource, new_id, 1, now)
        index = self._index(res_type, new_id, parsed)
        if res_id is None:  # a fresh uuid4 cannot collide: no savepoint round trips
            row = self.repo.insert(res_type, new_id, content, now, index, "POST")
        else:
            try:
                with self.conn.begin_nested():
                    row = self.repo.insert(res_type, new_id, content, now, index, "POST")
            except IntegrityError:
                raise Conflict(f"{res_type}/{new_id} already exists") from None
        self._notify(WriteEvent("create", None, row, parsed))
        return WriteResult(row, created=True)

    def update(
        self,
        res_type: str,
        res_id: str,
        resource: dict[str, Any],
        *,
        if_match: int | None = None,
        method: str = "update",
    ) -> WriteResult:
        """R4 http.html §3.1.0.4 update, version-aware with If-Match (§3.1.0.5); creates the
        resource with the client's id when it does not exist (update-as-create)."""
        _check_type(res_type)
        _check_id(res_id)
        body_id = resource.get("id")
        if body_id is None:
            raise BadRequest("The resource in an update must carry an id")
        if body_id != res_id:
            raise BadRequest("The resource id does not match the id in the URL")
        validate_resource(resource, res_type)
        current = self.repo.current(res_type, res_id, for_update=True)
        if current is not None and not self._visible(current):
            raise NotFound(f"{res_type}/{res_id} is not known", hidden=current)
        if if_match is not None and (current is None or current.version_id != if_match):
            raise PreconditionFailed(
                "If-Match does not match the current version",
                headers=_etag_headers(current) if current else None,
            )
        resource = self._prewrite(res_type, resource, current)
        if current is None:
            now = self.clock()
            content, parsed = finalize(resource, res_id, 1, now)
            try:
                with self.conn.begin_nested():
                    row = self.repo.insert(
                        res_type, res_id, content, now, self._index(res_type, res_id, parsed), "PUT"
                    )
            except IntegrityError:
                raise Conflict(f"{res_type}/{res_id} was created concurrently; retry") from None
            self._notify(WriteEvent("create", None, row, parsed))
            return WriteResult(row, created=True)
        return self._new_version(current, resource, method)

    def patch(
        self, res_type: str, res_id: str, operations: Any, *, if_match: int | None = None
    ) -> WriteResult:
        """JSON Patch (RFC 6902) on the current version (R4 http.html §3.1.0.6)."""
        if not isinstance(operations, list) or not all(isinstance(o, dict) for o in operations):
            raise BadRequest("A JSON Patch document must be an array of operations")
        current = self.read(res_type, res_id, for_update=True)  # no lost update between read/write
        if if_match is not None and current.version_id != if_match:
            raise PreconditionFailed(
                "If-Match does not match the current version", headers=_etag_headers(current)
            )
        assert current.content is not None
        doc = None
        for source in self.patch_sources:
            doc = source(self, current, operations)
            if doc is not None:
                break
        if doc is None:
            doc = orjson.loads(current.content)
        try:
            patched = jsonpatch.JsonPatch(operations).apply(doc)
        except jsonpatch.JsonPatchTestFailed:
            raise Unprocessable("A JSON Patch 'test' operation failed") from None
        except (
            jsonpatch.JsonPatchException,
            jsonpatch.JsonPointerException,
            TypeError,
            ValueError,
        ):
            raise BadRequest("The JSON Patch document is invalid or does not apply") from None
        if not isinstance(patched, dict):
            raise BadRequest("The patched document is not a resource")
        if patched.get("resourceType") != res_type or patched.get("id") != res_id:
            raise BadRequest("A patch may not change resourceType or id")
        return self.update(res_type, res_id, patched, if_match=current.version_id, method="patch")

    def delete(self, res_type: str, res_id: str) -> CurrentRow | None:
        """R4 http.html §3.1.0.7 delete: a deletion version; deleting a missing or deleted
        resource succeeds without writing."""
        _check_type(res_type)
        _check_id(res_id)
        current = self.repo.current(res_type, res_id, for_update=True)
        if current is not None and not self._visible(current):
            raise NotFound(f"{res_type}/{res_id} is not known", hidden=current)
        if current is None or current.deleted:
            return current
        now = max(self.clock(), current.last_updated + 1)
        try:
            row = self.repo.write_version(current, None, now, None, "DELETE")
        except ConcurrentUpdate:
            raise Conflict(f"{res_type}/{res_id} changed concurrently; retry") from None
        self._notify(WriteEvent("delete", current, row, None))
        return row

    # -- helpers ---------------------------------------------------------------------------

    def _new_version(
        self, current: CurrentRow, resource: dict[str, Any], method: str
    ) -> WriteResult:
        now = max(self.clock(), current.last_updated + 1)
        vid = current.version_id + 1
        content, parsed = finalize(resource, current.res_id, vid, now)
        try:
            row = self.repo.write_version(
                current,
                content,
                now,
                self._index(current.res_type, current.res_id, parsed),
                "PATCH" if method == "patch" else "PUT",
            )
        except ConcurrentUpdate:
            raise Conflict(
                f"{current.res_type}/{current.res_id} changed concurrently; retry"
            ) from None
        self._notify(WriteEvent(method, current, row, parsed))
        return WriteResult(row, created=current.deleted)

    def conditional_matches(
        self, res_type: str, criteria: Sequence[tuple[str, str]]
    ) -> list[CurrentRow]:
        if not criteria:
            raise BadRequest("If-None-Exist must carry search parameters")
        parsed = parse_search(res_type, criteria, strict=True, now=self.clock())
        if not parsed.spec.conditions:
            raise BadRequest("If-None-Exist must carry search parameters")
        parsed.spec.count = 2
        parsed.spec.want_total = False
        return run_search(self.conn, parsed.spec).rows

    def _notify(self, event: WriteEvent) -> None:
        for listener in self.listeners:
            listener(self.conn, event)


def check_read_target(res_type: str, res_id: str, version: str | None = None) -> int | None:
    """The checks of a read or vread before any look-up: type (404), id (400) and version
    (404 unless digits). Returns the version number."""
    _check_type(res_type)
    _check_id(res_id)
    if version is None:
        return None
    if not version.isdigit():
        raise NotFound(f"Version '{version[:16]}' of {res_type}/{res_id} is not known")
    return int(version)


def _everyone(_row: CurrentRow) -> bool:
    return True


def visible_current(
    res_type: str,
    res_id: str,
    row: CurrentRow | None,
    visible: Callable[[CurrentRow], bool] = _everyone,
) -> CurrentRow:
    """404 for an unknown resource and (auditably, with ``hidden``) for one the caller may
    not see."""
    if row is None:
        raise NotFound(f"{res_type}/{res_id} is not known")
    if not visible(row):
        raise NotFound(f"{res_type}/{res_id} is not known", hidden=row)
    return row


def readable_current(
    res_type: str,
    res_id: str,
    row: CurrentRow | None,
    visible: Callable[[CurrentRow], bool] = _everyone,
) -> CurrentRow:
    """The outcome of a read of ``row`` (the current row or None): 404, 410 or the row."""
    row = visible_current(res_type, res_id, row, visible)
    if row.deleted:
        raise Gone(f"{res_type}/{res_id} has been deleted", headers=_etag_headers(row))
    return row


def readable_version(
    res_type: str, res_id: str, version: str, row: VersionRow | None
) -> VersionRow:
    """The outcome of a vread of ``row`` (that version or None): 404, 410 or the row."""
    if row is None:
        raise NotFound(f"Version {version} of {res_type}/{res_id} is not known")
    if row.deleted:
        raise Gone(f"Version {version} of {res_type}/{res_id} is a deletion")
    return row


def finalize(
    resource: Mapping[str, Any], res_id: str, version_id: int, now: int
) -> tuple[bytes, dict[str, Any]]:
    """Set the server-owned elements (id, meta.versionId, meta.lastUpdated) and serialize
    canonically (sorted keys, compact UTF-8)."""
    out = dict(resource)
    out["id"] = res_id
    meta = dict(out.get("meta") or {})
    meta["versionId"] = str(version_id)
    meta["lastUpdated"] = format_instant(now)
    out["meta"] = meta
    return orjson.dumps(out, option=orjson.OPT_SORT_KEYS), out


def _etag_headers(row: CurrentRow | None) -> dict[str, str]:
    return {"ETag": f'W/"{row.version_id}"'} if row is not None else {}
