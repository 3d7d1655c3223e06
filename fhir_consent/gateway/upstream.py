"""The upstream FHIR server: one pooled keep-alive ``aiohttp`` client and our credentials.

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
from typing import Any, Final, Protocol
from urllib.parse import urlencode, urlsplit

import aiohttp
import httpx
import orjson
import yarl
from joserfc.jwk import ECKey, RSAKey

from fhir_consent.errors import FHIRError
from fhir_consent.gateway.config import GatewaySettings
from smart_on_fhir.client_auth import ASSERTION_TYPE, sign_client_assertion

__all__ = [
    "MAX_ANSWER_BYTES",
    "AiohttpSender",
    "Answer",
    "BackendServicesAuth",
    "HttpxSender",
    "Sender",
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

    async def header(self, http: Sender) -> str | None: ...

    def invalidate(self) -> None: ...


class StaticToken:
    """A fixed bearer token (or none)."""

    def __init__(self, token: str | None) -> None:
        self._value = f"Bearer {token}" if token else None

    async def header(self, http: Sender) -> str | None:
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

    async def header(self, http: Sender) -> str | None:
        token = self._token
        if token is not None and self.clock() < self._expires:
            return f"Bearer {token}"
        async with self._lock:
            if self._token is None or self.clock() >= self._expires:
                await self._renew(http)
            return f"Bearer {self._token}"

    async def _discover(self, http: Sender) -> str:
        try:
            r = await http.send(
                "GET",
                f"{self.upstream}/.well-known/smart-configuration",
                None,
                {"accept": "application/json"},
            )
        except UpstreamTimeout:
            raise UpstreamTimeout("The upstream's SMART configuration did not load") from None
        url = None
        if r.status == 200:
            try:
                found = orjson.loads(r.body)
            except orjson.JSONDecodeError:
                found = None
            url = found.get("token_endpoint") if isinstance(found, dict) else None
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise UpstreamError("The upstream publishes no usable SMART token endpoint")
        return url

    async def _renew(self, http: Sender) -> None:
        if self.token_url is None:
            self.token_url = await self._discover(http)
        assertion = sign_client_assertion(
            self.key, client_id=self.client_id, token_url=self.token_url
        )
        form = urlencode(
            {
                "grant_type": "client_credentials",
                "scope": self.scope,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
            }
        ).encode()
        try:
            r = await http.send(
                "POST",
                self.token_url,
                form,
                {"accept": "application/json", "content-type": "application/x-www-form-urlencoded"},
            )
        except UpstreamTimeout:
            raise UpstreamTimeout("The upstream's token endpoint did not answer") from None
        except UpstreamUnavailable:
            raise UpstreamUnavailable("The upstream's token endpoint cannot be reached") from None
        body: Any = None
        if r.status == 200:
            try:
                body = orjson.loads(r.body)
            except orjson.JSONDecodeError:
                body = None
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            # the error code is the upstream's RFC 6749 error (no secrets, no patient data)
            code = body.get("error") if isinstance(body, dict) else None
            log.warning("upstream token request refused: HTTP %s %s", r.status, str(code)[:40])
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


class _TooLarge(UpstreamError):
    def __init__(self) -> None:
        super().__init__("The upstream FHIR server's answer is too large")


class Sender(Protocol):
    """Sends one HTTP request to the upstream and returns :class:`Answer` (any status).

    Transport failures are raised as :class:`UpstreamTimeout` (no answer in time),
    :class:`UpstreamUnavailable` (refused, reset, closed) or :class:`UpstreamError` (an
    answer that is not HTTP, or too large), none of them carrying upstream content."""

    async def send(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]
    ) -> Answer: ...

    async def close(self) -> None: ...


class AiohttpSender:
    """The production sender: one ``aiohttp`` keep-alive connection pool per event loop.

    aiohttp parses HTTP in C (``llhttp``): a pooled upstream call costs the gateway about a
    fifth of the CPU of an ``httpx.AsyncClient`` call (``docs/benchmarks.md``, "Gateway").
    Redirects are not followed, cookies are not kept, proxies in the environment are ignored,
    and URLs are sent exactly as given (``encoded=True``: the upstream's own paging links)."""

    def __init__(self, *, timeout: float, connections: int, max_body: int) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._connections = connections
        self._max_body = max_body
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            for other in [x for x in self._sessions if x.is_closed()]:
                del self._sessions[other]  # a test's finished loop
            session = self._sessions[loop] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._connections, keepalive_timeout=30, ttl_dns_cache=300
                ),
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                skip_auto_headers=("User-Agent",),
            )
        return session

    async def send(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]
    ) -> Answer:
        session = self._session()
        try:
            async with session.request(
                method,
                yarl.URL(url, encoded=True),
                data=body,
                headers=headers,
                allow_redirects=False,
            ) as r:
                if r.content_length is not None:
                    if r.content_length > self._max_body:
                        raise _TooLarge()
                    data = await r.read()  # a truncated body raises ClientPayloadError
                else:
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in r.content.iter_any():
                        size += len(chunk)
                        if size > self._max_body:
                            raise _TooLarge()
                        chunks.append(chunk)
                    data = b"".join(chunks)
                h = r.headers
                return Answer(
                    r.status, data, h.get("etag"), h.get("last-modified"), h.get("location")
                )
        except TimeoutError:
            raise UpstreamTimeout("The upstream FHIR server did not answer in time") from None
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            if isinstance(exc, aiohttp.ClientConnectionError) and isinstance(
                exc.__cause__, TimeoutError
            ):
                raise UpstreamTimeout("The upstream FHIR server did not answer in time") from None
            raise UpstreamUnavailable("The upstream FHIR server cannot be reached") from None
        except (aiohttp.ClientError, ValueError):
            # not HTTP (a garbled status line or headers, a bad chunk), or an unusable URL
            raise UpstreamError("The upstream FHIR server's answer is not valid HTTP") from None

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for loop, session in sessions.items():
            if not loop.is_closed() and loop is asyncio.get_running_loop():
                await session.close()


class HttpxSender:
    """A sender over an ``httpx`` transport (tests inject ``httpx.MockTransport``)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, *, timeout: float) -> None:
        self._client = httpx.AsyncClient(
            transport=transport, timeout=timeout, follow_redirects=False, trust_env=False
        )

    async def send(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]
    ) -> Answer:
        try:
            r = await self._client.request(method, url, content=body, headers=dict(headers))
        except httpx.TimeoutException:
            raise UpstreamTimeout("The upstream FHIR server did not answer in time") from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            raise UpstreamUnavailable("The upstream FHIR server cannot be reached") from None
        except httpx.HTTPError:
            raise UpstreamError("The upstream FHIR server call failed") from None
        h = r.headers
        return Answer(
            r.status_code, r.content, h.get("etag"), h.get("last-modified"), h.get("location")
        )

    async def close(self) -> None:
        await self._client.aclose()


#: The largest upstream answer the gateway reads (one resource or one page of a search).
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024


class Upstream:
    """Calls to the upstream FHIR base over one keep-alive connection pool
    (:class:`AiohttpSender`), closed by :meth:`close` (the app's lifespan). ``transport``
    (an ``httpx`` transport) replaces the pool, for tests."""

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
        self.sender: Sender = (
            HttpxSender(transport, timeout=settings.timeout)
            if transport is not None
            else AiohttpSender(
                timeout=settings.timeout,
                connections=settings.connections,
                max_body=MAX_ANSWER_BYTES,
            )
        )

    async def close(self) -> None:
        await self.sender.close()

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
        """``GET {base}/{path}`` (``path`` relative to the base: valid FHIR types and ids)."""
        url = f"{self.base}/{path}"
        if params:
            url = f"{url}?{urlencode(list(params))}"
        return await self.request("GET", url)

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
        if params:
            url = f"{url}?{urlencode(list(params))}"
        send = {"accept": _FHIR_JSON, **(headers or {})}
        if body is not None:
            send.setdefault("content-type", _FHIR_JSON)
        for attempt in (1, 2):
            auth = await self.credentials.header(self.sender)
            if auth is not None:
                send["authorization"] = auth
            r = await self.sender.send(method, url, body, send)
            if r.status == 401 and attempt == 1:
                self.credentials.invalidate()
                continue
            break
        if r.status in (401, 403):
            log.warning("upstream refused our credentials: HTTP %s", r.status)
            raise UpstreamError("The upstream FHIR server refused the gateway's credentials")
        if r.status >= 500:
            raise UpstreamError(f"The upstream FHIR server failed (HTTP {r.status})")
        return r
