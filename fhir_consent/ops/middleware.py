"""The outermost ASGI layer: request id, access log line and request metrics.

For every HTTP request it

1. takes the incoming ``X-Request-ID`` when it is well-formed (8–64 characters of
   ``[A-Za-z0-9._-]``, e.g. nginx's ``$request_id``) and ``trust_request_id`` is on, else
   generates one (32 hex digits); sets it in :data:`fhir_consent.ops.logs.request_id` for
   every line logged while the request runs, and returns it in the response's
   ``X-Request-ID``;
2. when the response is done, logs one line on ``fhir_consent.access`` (method, route
   template, status, duration, body bytes) and counts it in the metrics.

It never reads the request body and never logs the path, the query string or a header value
(docs/operations.md, Logs).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from os import urandom
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_consent.ops.logs import request_id
from fhir_consent.ops.metrics import KNOWN_METHODS, Metrics
from fhir_consent.ops.routing import route_template

__all__ = ["REQUEST_ID_HEADER", "OpsMiddleware", "valid_request_id"]

REQUEST_ID_HEADER: Final = "x-request-id"
_REQUEST_ID_RAW: Final = REQUEST_ID_HEADER.encode("ascii")
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._-]{8,64}")
#: Probes and scrapes: logged at debug level (they arrive every few seconds).
_QUIET_ROUTES: Final = frozenset({"/healthz", "/readyz", "/metrics"})

access_log = logging.getLogger("fhir_consent.access")


def valid_request_id(value: str | None) -> bool:
    """Whether an incoming request id may be reused as-is."""
    return value is not None and _REQUEST_ID.fullmatch(value) is not None


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            try:
                return bytes(value).decode("ascii")
            except UnicodeDecodeError:
                return None
    return None


class OpsMiddleware:
    """See the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        prefixes: Sequence[str] = (),
        trust_request_id: bool = True,
        access_log_enabled: bool = True,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.prefixes = tuple(p.rstrip("/") for p in prefixes if p.rstrip("/"))
        self.trust = trust_request_id
        self.log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _incoming_id(scope) if self.trust else None
        # 32 hex digits of the OS's CSPRNG (as uuid4().hex, at a third of its cost)
        rid = incoming if incoming is not None and valid_request_id(incoming) else None
        if rid is None:
            rid = urandom(16).hex()
        token = request_id.set(rid)
        rid_raw = rid.encode("ascii")
        started = time.perf_counter()
        status = 500
        sent = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                # a new list (the response's own header list is left as it is), replacing
                # any request id the app set
                headers = [h for h in message.get("headers", ()) if h[0] != _REQUEST_ID_RAW]
                headers.append((_REQUEST_ID_RAW, rid_raw))
                message["headers"] = headers
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = route_template(scope, self.prefixes)
            method = str(scope.get("method", "GET"))
            method = method if method in KNOWN_METHODS else "other"
            self.metrics.observe_request(method, route, status, elapsed)
            level = logging.DEBUG if route in _QUIET_ROUTES else logging.INFO
            if self.log_enabled and access_log.isEnabledFor(level):
                access_log.log(
                    level,
                    "request",
                    extra={
                        "method": method,
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "bytes": sent,
                    },
                )
            request_id.reset(token)
