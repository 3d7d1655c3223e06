"""authlib request objects built from Starlette requests whose body was already awaited.

authlib's core is synchronous and framework-free; its Flask and Django integrations read
the framework request lazily. Starlette bodies must be awaited, so the adapter reads the
query string and the form (or JSON) in the event loop first, then hands authlib plain
mappings it can read from a worker thread (modelled on
``authlib/integrations/flask_oauth2/requests.py``).

Transport: authlib refuses URIs that are neither ``https`` nor loopback ``http``
(``InsecureTransportError``, RFC 6749 §3.1/§10.9). The same rule applies here unless the
server was configured with ``insecure_transport=True`` for tests or development behind a
TLS-terminating proxy; authlib's check is then satisfied with a placeholder and the real
URI is kept in :attr:`OAuth2Request.uri`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from authlib.oauth2.rfc6749 import JsonPayload, JsonRequest, OAuth2Payload, OAuth2Request
from authlib.oauth2.rfc6749.errors import InsecureTransportError

__all__ = ["SmartJsonRequest", "SmartOAuth2Request"]

_PLACEHOLDER = "https://localhost/"


class _Payload(OAuth2Payload):  # type: ignore[misc]
    """Query and form parameters merged (form wins), first value per name."""

    def __init__(self, items: Sequence[tuple[str, str]]) -> None:
        lists: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in items:
            lists[key].append(value)
        self._datalist = lists
        self._data = {key: values[0] for key, values in lists.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class SmartOAuth2Request(OAuth2Request):  # type: ignore[misc]
    """An :class:`~authlib.oauth2.rfc6749.OAuth2Request` over pre-read parameters.

    :param query: the query string parameters, in order (duplicates kept, so authlib can
        reject repeated parameters per RFC 6749 §3.1)
    :param form: the ``application/x-www-form-urlencoded`` body parameters
    :param insecure_transport: skip the https check (tests/development only)
    """

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Mapping[str, str],
        *,
        query: Sequence[tuple[str, str]] = (),
        form: Sequence[tuple[str, str]] = (),
        insecure_transport: bool = False,
    ) -> None:
        if not insecure_transport:
            InsecureTransportError.check(uri)
        super().__init__(method, _PLACEHOLDER if insecure_transport else uri, headers=headers)
        self.uri = uri
        self._args = dict(reversed(query))
        self._form = dict(reversed(form))
        self.payload = _Payload([*query, *form])
        #: set by the server adapter: the per-request context (connection, URLs, time)
        self.smart: Any = None

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


class _JsonPayload(JsonPayload):  # type: ignore[misc]
    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    @property
    def data(self) -> dict[str, Any]:
        return self._data


class SmartJsonRequest(JsonRequest):  # type: ignore[misc]
    """An authlib :class:`~authlib.oauth2.rfc6749.JsonRequest` over a parsed JSON body
    (RFC 7591 client registration)."""

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Mapping[str, str],
        data: Mapping[str, Any],
        *,
        insecure_transport: bool = False,
    ) -> None:
        if not insecure_transport:
            InsecureTransportError.check(uri)
        super().__init__(method, uri, headers)
        self.payload = _JsonPayload(data)
        self.smart: Any = None
