"""The public address of each request: mount point, trusted proxy headers, configured base.

Every absolute URL the server hands out (Bundle links and ``fullUrl``, ``Location``, the SMART
discovery documents, the ``aud`` and ``iss`` it issues and checks, the CapabilityStatement and
the patient app's configuration) starts with the **public root** of the request:
``scheme://host[:port]`` + the proxy's path prefix + the ASGI ``root_path`` (the point where a
host application mounted this app). :class:`PublicURLs` computes it once, at the app's entry,
and stores it in the ASGI scope; :func:`public_root` reads it back.

Proxy headers (``X-Forwarded-Proto``, ``X-Forwarded-Host``, ``X-Forwarded-Port``,
``X-Forwarded-Prefix`` and ``X-Forwarded-For``) are honoured **only** when the direct peer is
one of the configured trusted proxies (``FHIR_CONSENT_TRUSTED_PROXIES``; empty by default, so
by default they are ignored: anyone can send them). From a trusted proxy the right-most value of
each header is used (the one that proxy wrote), the request's ``scheme`` becomes the forwarded
one and its ``client`` the right-most untrusted address of ``X-Forwarded-For``. A malformed
forwarded value is ignored, never echoed. ``FHIR_CONSENT_PUBLIC_BASE_URL`` overrides all of
this for the FHIR base (see :meth:`fhir_consent.fhir.routes.FHIRContext.base`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["SCOPE_KEY", "ProxyPolicy", "PublicURLs", "public_root", "route_path"]

#: Where :class:`PublicURLs` leaves the public root in the ASGI scope.
SCOPE_KEY: Final = "fhir_consent.public_root"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]+\]")
_PORT: Final = re.compile(r"[0-9]{1,5}")
_PREFIX: Final = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*/?")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """Which direct peers may set the public address through ``X-Forwarded-*`` headers.

    :param trusted: networks of trusted proxies (``127.0.0.1``, ``10.0.0.0/8``, ``::1``);
        empty (the default) means no peer is trusted.
    """

    trusted: tuple[_Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> ProxyPolicy:
        """From addresses or CIDR networks; raises ``ValueError`` on a malformed entry."""
        nets = []
        for raw in entries:
            text = raw.strip()
            if text:
                nets.append(ipaddress.ip_network(text, strict=False))
        return cls(tuple(nets))

    def trusts(self, host: str | None) -> bool:
        """Whether ``host`` (an IP address as text) is a trusted proxy."""
        if not self.trusted or not host:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self.trusted)


def _header(scope: Scope, name: bytes) -> str | None:
    """The right-most value of a (possibly repeated, comma-separated) header."""
    found: str | None = None
    for key, value in scope.get("headers", ()):
        if key == name:
            found = value.decode("latin-1")
    if found is None:
        return None
    last = found.rsplit(",", 1)[-1].strip()
    return last or None


def _host_header(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"host":
            return str(value.decode("latin-1"))
    return None


def _split_host(value: str) -> tuple[str, str | None] | None:
    """``host[:port]`` → (host, port) when well formed, else None."""
    if len(value) > 260:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            return None
    else:
        host, _, port_text = value.partition(":")
        port = port_text if ":" in value else None
    if not _HOST.fullmatch(host):
        return None
    if port is not None and not (_PORT.fullmatch(port) and 0 < int(port) < 65536):
        return None
    return host, port


def _origin(scheme: str, host: str, port: str | None) -> str:
    if port is not None and int(port) != _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


def _direct_origin(scope: Scope) -> str:
    scheme = str(scope.get("scheme", "http"))
    raw = _host_header(scope)
    parsed = _split_host(raw) if raw else None
    if parsed is not None:
        return _origin(scheme, *parsed)
    server = scope.get("server")
    if server:
        host, port = server[0], server[1]
        host = f"[{host}]" if ":" in str(host) else str(host)
        return _origin(scheme, host, None if port is None else str(port))
    return f"{scheme}://localhost"


def _client_from(forwarded_for: str, policy: ProxyPolicy) -> str | None:
    """The right-most address of ``X-Forwarded-For`` that is not a trusted proxy."""
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not policy.trusts(hop):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return None
    return hops[0] if hops else None


def _all_values(scope: Scope, name: bytes) -> str | None:
    values = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k == name]
    return ",".join(values) if values else None


class PublicURLs:
    """ASGI middleware (outermost): the request's public root into ``scope[SCOPE_KEY]``, and
    scheme and client from a trusted proxy's headers (see the module docstring)."""

    def __init__(self, app: ASGIApp, policy: ProxyPolicy | None = None) -> None:
        self.app = app
        self.policy = policy if policy is not None else ProxyPolicy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            # In place, not a copy: what the layers inside record in the scope (Starlette's
            # matched ``route``) must stay visible to the layers outside (the ops middleware
            # names a request by its route template). The scope is this request's own.
            scope.update(self.resolve(scope))
        await self.app(scope, receive, send)

    def resolve(self, scope: Scope) -> Scope:
        """A copy of ``scope`` with the public root set (and the proxy's view applied)."""
        scope = dict(scope)
        root_path = str(scope.get("root_path", "")).rstrip("/")
        client = scope.get("client")
        prefix = ""
        if self.policy.trusts(client[0] if client else None):
            proto = _header(scope, b"x-forwarded-proto")
            if proto is not None and proto.lower() in ("http", "https"):
                scope["scheme"] = proto.lower()
            forwarded_for = _all_values(scope, b"x-forwarded-for")
            if forwarded_for:
                address = _client_from(forwarded_for, self.policy)
                if address is not None:
                    scope["client"] = (address, 0)
            origin = _direct_origin(scope)
            fwd_host = _header(scope, b"x-forwarded-host")
            parsed = _split_host(fwd_host) if fwd_host else None
            fwd_port = _header(scope, b"x-forwarded-port")
            if fwd_port is not None and not _PORT.fullmatch(fwd_port):
                fwd_port = None
            if parsed is not None:
                host, port = parsed
                origin = _origin(str(scope["scheme"]), host, port or fwd_port)
            elif fwd_port is not None:
                direct = _split_host(_host_header(scope) or "")
                if direct is not None:
                    origin = _origin(str(scope["scheme"]), direct[0], fwd_port)
            raw_prefix = _header(scope, b"x-forwarded-prefix")
            if raw_prefix and _PREFIX.fullmatch(raw_prefix) and ".." not in raw_prefix:
                prefix = raw_prefix.rstrip("/")
                if prefix and not prefix.startswith("/"):
                    prefix = ""
        else:
            origin = _direct_origin(scope)
        scope[SCOPE_KEY] = origin + prefix + root_path
        return scope


def public_root(conn: HTTPConnection | Scope) -> str:
    """The public root (no trailing slash) of a request that passed :class:`PublicURLs`;
    without it, the request's own origin and ``root_path``."""
    # not isinstance(conn, HTTPConnection): that is an ABC check (a Mapping), ~1.5 µs on
    # every authenticated request
    scope: Any = getattr(conn, "scope", conn)
    found = scope.get(SCOPE_KEY)
    if isinstance(found, str):
        return found
    return _direct_origin(scope) + str(scope.get("root_path", "")).rstrip("/")


def route_path(scope: Scope) -> str:
    """The request path below the mount point (``root_path`` removed when it is a prefix)."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path
