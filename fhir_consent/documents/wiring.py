"""``install(app, ctx, settings)``: put the document store into a FHIR application.

It registers the Binary/DocumentReference PreWrite hook, WriteListener and Binary
PatchSource on the :class:`~fhir_consent.fhir.routes.FHIRContext`, the Binary routes *ahead
of* the generic FHIR routes (whatever order the routers were included in), the upload body
limits, and exposes the :class:`~fhir_consent.documents.routes.Documents` object as
``app.state.documents``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from fhir_consent.documents.access import (
    BinaryAccess,
    DocumentLinkAccess,
    DownloadAudit,
    no_audit,
)
from fhir_consent.documents.config import DocumentSettings
from fhir_consent.documents.errors import StorageFull
from fhir_consent.documents.keys import DataKeyStore, MasterKeyRing
from fhir_consent.documents.routes import JSON_TYPES, Documents, build_router
from fhir_consent.documents.service import DocumentHooks
from fhir_consent.documents.storage import BlobStore
from fhir_consent.errors import Issue, operation_outcome
from fhir_consent.fhir.http import fhir_response
from fhir_consent.fhir.routes import FHIRContext
from fhir_consent.limits import LimitRule, add_limit_rule, remove_limit_rules

__all__ = ["build_store", "install", "load_master_keys", "uninstall"]

log = logging.getLogger("fhir_consent.documents")


async def storage_full(request: Request, exc: Exception) -> Response:
    """507 Insufficient Storage (RFC 4918 §11.5) when content cannot be written for want of
    space: the write's transaction was rolled back, nothing refers to the partial file (it
    was removed), and the same request succeeds once space is freed."""
    name = exc.errno_name if isinstance(exc, StorageFull) else "?"
    log.error(
        "document store full (%s) on %s %s: answered 507, nothing stored",
        name,
        request.method,
        request.url.path,
    )
    issue = Issue("There is no space left to store the document content", "transient")
    return fhir_response(operation_outcome([issue]), 507, {"Retry-After": "60"})


def load_master_keys(settings: DocumentSettings, *, create: bool = True) -> MasterKeyRing:
    """The master key ring: ``FHIR_CONSENT_DOCUMENTS_MASTER_KEYS`` when set, else the key
    ring file (created with a fresh key on first use when ``create``)."""
    if settings.master_keys is not None:
        return MasterKeyRing.from_value(settings.master_keys.get_secret_value())
    return MasterKeyRing.load(settings.master_key_file, create=create)


def build_store(
    settings: DocumentSettings, ctx: FHIRContext, ring: MasterKeyRing | None = None
) -> BlobStore:
    """A :class:`BlobStore` over the context's database and clock; the master key ring is
    loaded on first use unless given."""
    source: MasterKeyRing | Callable[[], MasterKeyRing] = (
        ring if ring is not None else partial(load_master_keys, settings)
    )
    return BlobStore(settings, ctx.db, DataKeyStore(source, ctx.clock), clock=ctx.clock)


def install(
    app: Any,
    ctx: FHIRContext,
    settings: DocumentSettings | None = None,
    *,
    access: BinaryAccess | None = None,
    audit: DownloadAudit | None = None,
    ring: MasterKeyRing | None = None,
    replace: bool = False,
) -> Documents:
    """Install the document store on ``app`` (a FastAPI app whose ``app.state.fhir`` is
    ``ctx``), before the app serves requests. Nothing is read or created on disk until the
    first document is stored or read. A second install fails unless ``replace`` (tests
    re-install with their own settings), which first calls :func:`uninstall`."""
    previous: Documents | None = getattr(app.state, "documents", None)
    if previous is not None:
        if not replace:
            raise RuntimeError("the document store is already installed on this app")
        uninstall(app)
    settings = settings if settings is not None else DocumentSettings()
    store = build_store(settings, ctx, ring)
    hooks = DocumentHooks(
        store,
        lambda conn: ctx.service(conn),
        base_url=ctx.settings.public_base_url,
        max_content_bytes=settings.max_upload_bytes,
        max_patch_bytes=settings.max_json_upload_bytes,
    )
    ctx.prewrites.append(hooks.prewrite)
    ctx.listeners.append(hooks.listener)
    ctx.patch_sources.append(hooks.patch_source)

    routes = app.router.routes
    before = len(routes)
    app.include_router(build_router(), prefix=ctx.settings.fhir_path)
    ours = routes[before:]
    del routes[before:]
    routes[0:0] = ours  # ahead of the generic "/{rtype}/{rid}" routes

    fhir = re.escape(ctx.settings.fhir_path.rstrip("/"))
    binary = re.compile(rf"{fhir}/Binary(/[^/]+)?")
    documents_path = re.compile(rf"{fhir}/DocumentReference(/[^/]+)?")
    json_limit = max(ctx.settings.max_body_bytes, settings.max_json_upload_bytes)
    rules = [
        LimitRule(json_limit, binary, media_types=frozenset(JSON_TYPES)),
        LimitRule(settings.max_upload_bytes, binary),
        LimitRule(json_limit, documents_path),
    ]
    for rule in rules:
        add_limit_rule(app, rule)

    documents = Documents(
        settings=settings,
        fhir=ctx,
        store=store,
        hooks=hooks,
        access=access if access is not None else DocumentLinkAccess(),
        audit=audit if audit is not None else no_audit,
        installed=(tuple(ours), tuple(rules)),
    )
    ctx.bundle_filters.append(documents.inliner)
    app.state.documents = documents
    app.add_exception_handler(StorageFull, storage_full)
    return documents


def uninstall(app: Any) -> None:
    """Remove what :func:`install` added (hooks, routes, body-limit rules)."""
    documents: Documents | None = getattr(app.state, "documents", None)
    if documents is None:
        return
    ctx, hooks = documents.fhir, documents.hooks
    ctx.prewrites[:] = [h for h in ctx.prewrites if h != hooks.prewrite]
    ctx.listeners[:] = [h for h in ctx.listeners if h != hooks.listener]
    ctx.patch_sources[:] = [h for h in ctx.patch_sources if h != hooks.patch_source]
    ctx.bundle_filters[:] = [f for f in ctx.bundle_filters if f is not documents.inliner]
    routes, rules = documents.installed
    app.router.routes[:] = [r for r in app.router.routes if all(r is not o for o in routes)]
    remove_limit_rules(app, rules)
    app.state.documents = None
