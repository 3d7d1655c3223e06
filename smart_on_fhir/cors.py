"""CORS as SMART App Launch 2.2 asks (app-launch.md §"Considerations for Cross-Origin
Resource Sharing", conformance.md; Inferno 1.1.03-04 and ``smart_cors_token_exchange``).

* Discovery documents, ``/metadata``, the JWK Set and the style document are public:
  ``Access-Control-Allow-Origin: *``.
* The token, introspection, revocation and registration endpoints and the FHIR API answer a
  browser only from a registered client's origin (the origins of its redirect URIs), plus
  configured extra origins; the origin is echoed with ``Vary: Origin``. No cookies are
  involved (bearer tokens), so credentials are never allowed.
* The authorization pages (login, consent) get no CORS headers at all.

Preflight ``OPTIONS`` requests are answered here. The registered origins come from
*load_origins* (a database read on a worker thread), cached for *ttl* seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["SmartCORS"]

_PUBLIC_SUFFIXES: Final = (
    "/.well-known/smart-configuration",
    "/.well-known/openid-configuration",
)
_ALLOW_HEADERS: Final = (
    "Authorization, Content-Type, Accept, Prefer, If-Match, If-None-Match, If-None-Exist, "
    "If-Modified-Since, X-Requested-With"
)
_EXPOSE_HEADERS: Final = "Location, ETag, Last-Modified, Content-Location, WWW-Authenticate"
_METHODS: Final = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


def _route_path(scope: Scope) -> str:
    """The path below the mount point: a host app that mounts us sets ``root_path``."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


class SmartCORS:
    """Pure ASGI middleware; see the module docstring.

    :param fhir_path: mount point of the FHIR API (``/fhir``)
    :param auth_path: mount point of the authorization server (``/auth``)
    :param extra_origins: always-allowed origins (lower case, no trailing slash)
    :param load_origins: returns every registered client origin (called off the event loop)
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        fhir_path: str,
        auth_path: str,
        extra_origins: frozenset[str],
        load_origins: Callable[[], frozenset[str]],
        ttl: float = 30.0,
    ) -> None:
        self.app = app
        self.fhir = fhir_path.rstrip("/")
        self.auth = auth_path.rstrip("/")
        self.extra = extra_origins
        self.load = load_origins
        self.ttl = ttl
        self._origins: frozenset[str] = frozenset()
        self._loaded_at = float("-inf")
        self._public = {
            f"{self.fhir}/metadata",
            f"{self.auth}/jwks",
            f"{self.auth}/smart-style.json",
        }
        self._client_paths = {
            f"{self.auth}/{name}" for name in ("token", "introspect", "revoke", "register")
        }

    def _kind(self, path: str) -> str | None:
        if path in self._public or path.endswith(_PUBLIC_SUFFIXES):
            return "public"
        if path in self._client_paths:
            return "client"
        if path == self.fhir or path.startswith(self.fhir + "/"):
            return "client"
        return None

    async def _allowed(self, origin: str) -> bool:
        normal = origin.rstrip("/").lower()
        if normal in self.extra:
            return True
        now = time.monotonic()
        if now - self._loaded_at > self.ttl:
            self._origins = await run_in_threadpool(self.load)
            self._loaded_at = now
        return normal in self._origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        kind = self._kind(_route_path(scope))
        if origin is None or kind is None:
            await self.app(scope, receive, send)
            return
        allow = "*" if kind == "public" else (origin if await self._allowed(origin) else None)
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if preflight:
            await self._preflight(send, allow)
            return
        if allow is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out["Access-Control-Allow-Origin"] = allow
                out["Access-Control-Expose-Headers"] = _EXPOSE_HEADERS
                if allow != "*":
                    out.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, send: Send, allow: str | None) -> None:
        headers: list[tuple[bytes, bytes]] = [(b"vary", b"Origin"), (b"content-length", b"0")]
        if allow is not None:
            headers += [
                (b"access-control-allow-origin", allow.encode("latin-1")),
                (b"access-control-allow-methods", _METHODS.encode()),
                (b"access-control-allow-headers", _ALLOW_HEADERS.encode()),
                (b"access-control-max-age", b"600"),
            ]
        await send(
            {"type": "http.response.start", "status": 204 if allow else 403, "headers": headers}
        )
        await send({"type": "http.response.body", "body": b""})
