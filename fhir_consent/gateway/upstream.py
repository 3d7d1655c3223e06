"""The upstream FHIR server: one pooled ``httpx.AsyncClient`` and our credentials for it.

Errors (none of them carries upstream content; they are safe to log and return)::

    FHIRError
    └── UpstreamError          502  the upstream answered with something we cannot use
        ├── UpstreamUnavailable 503  connection refused / reset: the upstream is down
        └── UpstreamTimeout     504  no answer within the timeout

Credentials are a static bearer token, or a SMART backend-services client of the upstream
(SMART App Launch 2.2 backend-services.md): a ``private_key_jwt`` client assertion (RS384 /
ES384) exchanged at the upstream's token endpoint (from its
``.well-known/smart-configuration`` unless configured) for a short-lived access token, cached
until shortly before it expires and renewed once when the upstream answers 401.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from joserfc.jwk import ECKey, RSAKey

from fhir_consent.errors import FHIRError
from fhir_consent.gateway.config import GatewaySettings
from smart_on_fhir.client_auth import ASSERTION_TYPE, sign_client_assertion

__all__ = [
    "BackendServicesAuth",
    "Credentials",
    "StaticToken",
    "Upstream",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "credentials_from",
    "load_private_key",
]

log = logging.getLogger("fhir_consent.gateway")

_FHIR_JSON = "application/fhir+json"


class UpstreamError(FHIRError):
    """The upstream's answer is unusable (5xx, 401/403 to us, not FHIR JSON, …)."""

    status = 502
    code = "exception"


class UpstreamUnavailable(UpstreamError):
    """The upstream FHIR server cannot be reached."""

    status = 503
    code = "transient"


class UpstreamTimeout(UpstreamError):
    """The upstream FHIR server did not answer in time."""

    status = 504
    code = "timeout"


class Credentials(Protocol):
    """Supplies the ``Authorization`` header value for upstream calls."""

    async def header(self, http: httpx.AsyncClient) -> str | None: ...

    def invalidate(self) -> None: ...


class StaticToken:
    """A fixed bearer token (or none)."""

    def __init__(self, token: str | None) -> None:
        self._value = f"Bearer {token}" if token else None

    async def header(self, http: httpx.AsyncClient) -> str | None:
        return self._value

    def invalidate(self) -> None:
        return None

    def __repr__(self) -> str:
        return "StaticToken(***)" if self._value else "StaticToken(None)"


def load_private_key(path: Path, kid: str | None = None) -> RSAKey | ECKey:
    """A backend-services private key from a JWK (JSON) or PEM file.

    .. warning:: the key is a secret: keep the file readable by the server only.
    """
    raw = path.read_bytes()
    key: RSAKey | ECKey
    text = raw.strip()
    if text.startswith(b"{"):
        data = json.loads(text)
        if data.get("kty") == "RSA":
            key = RSAKey.import_key(data)
        elif data.get("kty") == "EC":
            key = ECKey.import_key(data)
        else:
            raise ValueError("the key file must hold an RSA or EC private JWK")
    else:
        try:
            key = RSAKey.import_key(raw)
        except Exception:  # noqa: BLE001 - any failure: try the other kind
            key = ECKey.import_key(raw)
    if not key.is_private:
        raise ValueError("the key file holds a public key; the private key is needed")
    if kid or key.kid is None:
        data = dict(key.as_dict(private=True))
        data["kid"] = kid or key.thumbprint()
        key = type(key).import_key(data)
    return key


class BackendServicesAuth:
    """SMART backend services against the upstream's authorization server."""

    #: renew this many seconds before the token expires
    MARGIN = 30

    def __init__(
        self,
        *,
        upstream: str,
        client_id: str,
        key: RSAKey | ECKey,
        scope: str,
        token_url: str | None = None,
        clock: Any = time.time,
    ) -> None:
        self.upstream = upstream
        self.client_id = client_id
        self.key = key
        self.scope = scope
        self.token_url = token_url
        self.clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"BackendServicesAuth(client_id={self.client_id!r})"

    def invalidate(self) -> None:
        self._token = None

    async def header(self, http: httpx.AsyncClient) -> str | None:
        token = self._token
        if token is not None and self.clock() < self._expires:
            return f"Bearer {token}"
        async with self._lock:
            if self._token is None or self.clock() >= self._expires:
                await self._renew(http)
            return f"Bearer {self._token}"

    async def _discover(self, http: httpx.AsyncClient) -> str:
        try:
            r = await http.get(
                f"{self.upstream}/.well-known/smart-configuration",
                headers={"accept": "application/json"},
            )
        except httpx.TimeoutException:
            raise UpstreamTimeout("The upstream's SMART configuration did not load") from None
        except httpx.TransportError:
            raise UpstreamUnavailable("The upstream FHIR server cannot be reached") from None
        url = None
        if r.status_code == 200:
            try:
                url = r.json().get("token_endpoint")
            except ValueError:
                url = None
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise UpstreamError("The upstream publishes no usable SMART token endpoint")
        return url

    async def _renew(self, http: httpx.AsyncClient) -> None:
        if self.token_url is None:
            self.token_url = await self._discover(http)
        assertion = sign_client_assertion(
            self.key, client_id=self.client_id, token_url=self.token_url
        )
        try:
            r = await http.post(
                self.token_url,
                data={
                    "grant_type": "client_credentials",
                    "scope": self.scope,
                    "client_assertion_type": ASSERTION_TYPE,
                    "client_assertion": assertion,
                },
                headers={"accept": "application/json"},
            )
        except httpx.TimeoutException:
            raise UpstreamTimeout("The upstream's token endpoint did not answer") from None
        except httpx.TransportError:
            raise UpstreamUnavailable("The upstream's token endpoint cannot be reached") from None
        body: Any = None
        if r.status_code == 200:
            try:
                body = r.json()
            except ValueError:
                body = None
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            # the error code is the upstream's RFC 6749 error (no secrets, no patient data)
            code = body.get("error") if isinstance(body, dict) else None
            log.warning("upstream token request refused: HTTP %s %s", r.status_code, str(code)[:40])
            raise UpstreamError("The upstream refused our backend-services credentials")
        lifetime = body.get("expires_in", 300)
        lifetime = lifetime if isinstance(lifetime, int) and lifetime > 0 else 300
        self._token = token
        self._expires = self.clock() + max(lifetime - self.MARGIN, lifetime / 2)


def credentials_from(settings: GatewaySettings) -> Credentials:
    """The credentials the settings describe (a static token, backend services, or none)."""
    assert settings.upstream is not None
    if settings.client_id is not None and settings.key_file is not None:
        return BackendServicesAuth(
            upstream=settings.upstream,
            client_id=settings.client_id,
            key=load_private_key(settings.key_file, settings.key_id),
            scope=settings.scope,
            token_url=settings.token_url,
        )
    if settings.token_file is not None:
        return StaticToken(settings.token_file.read_text().strip() or None)
    return StaticToken(settings.token.get_secret_value() if settings.token else None)


@dataclass(frozen=True, slots=True)
class Answer:
    """One upstream response: status, body bytes and the headers we may pass on."""

    status: int
    body: bytes
    etag: str | None
    last_modified: str | None
    location: str | None


class Upstream:
    """Calls to the upstream FHIR base over one keep-alive connection pool.

    The ``httpx.AsyncClient`` is created on first use inside the serving event loop and
    closed by :meth:`close` (the app's lifespan). ``transport`` is injectable for tests.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        credentials: Credentials,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        assert settings.upstream is not None
        self.base = settings.upstream
        parts = urlsplit(self.base)
        self._origin = f"{parts.scheme}://{parts.netloc}".lower()
        self._path = parts.path.rstrip("/")
        self.credentials = credentials
        self._timeout = settings.timeout
        self._limits = httpx.Limits(
            max_connections=settings.connections,
            max_keepalive_connections=settings.connections,
            keepalive_expiry=30,
        )
        self._transport = transport
        self._http: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self._timeout,
                limits=self._limits,
                transport=self._transport,
                follow_redirects=False,
                trust_env=False,
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def owns(self, url: str) -> bool:
        """Whether ``url`` lies under the upstream base (same origin, base path prefix)."""
        parts = urlsplit(url)
        if f"{parts.scheme}://{parts.netloc}".lower() != self._origin:
            return False
        path = parts.path
        return path == self._path or path.startswith(self._path + "/")

    def relative(self, url: str) -> str | None:
        """``Type/id/...`` of an upstream URL under the base (None when it is not ours)."""
        if not self.owns(url):
            return None
        rest = urlsplit(url).path[len(self._path) :].lstrip("/")
        return rest or None

    async def get(self, path: str, params: Sequence[tuple[str, str]] | None = None) -> Answer:
        """``GET {base}/{path}`` (``path`` relative to the base)."""
        return await self.request("GET", f"{self.base}/{path}", params=params)

    async def get_url(self, url: str) -> Answer:
        """``GET`` an absolute URL, which must lie under the upstream base (paging links)."""
        if not self.owns(url):
            raise UpstreamError("The upstream sent a link outside its own base")
        return await self.request("GET", url)

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One upstream call with our credentials (renewed once on 401); 5xx, transport
        errors and refusals of our credentials become :class:`UpstreamError`s."""
        http = self.client()
        send = {"accept": _FHIR_JSON, **(headers or {})}
        if body is not None:
            send.setdefault("content-type", _FHIR_JSON)
        for attempt in (1, 2):
            auth = await self.credentials.header(http)
            if auth is not None:
                send["authorization"] = auth
            try:
                r = await http.request(
                    method,
                    url,
                    params=list(params) if params else None,
                    content=body,
                    headers=send,
                )
            except httpx.TimeoutException:
                raise UpstreamTimeout("The upstream FHIR server did not answer in time") from None
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                raise UpstreamUnavailable("The upstream FHIR server cannot be reached") from None
            except httpx.HTTPError:
                raise UpstreamError("The upstream FHIR server call failed") from None
            if r.status_code == 401 and attempt == 1:
                self.credentials.invalidate()
                continue
            break
        if r.status_code in (401, 403):
            log.warning("upstream refused our credentials: HTTP %s", r.status_code)
            raise UpstreamError("The upstream FHIR server refused the gateway's credentials")
        if r.status_code >= 500:
            raise UpstreamError(f"The upstream FHIR server failed (HTTP {r.status_code})")
        return Answer(
            r.status_code,
            r.content,
            r.headers.get("etag"),
            r.headers.get("last-modified"),
            r.headers.get("location"),
        )
