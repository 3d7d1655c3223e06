"""Request body size limits, enforced before any handler reads the body (413 OperationOutcome).

One default limit applies to every request; :class:`LimitRule` gives matching requests (by
method, path and media type) their own limit — document uploads to ``Binary`` are far larger
than any JSON resource. Rules come from the middleware's constructor or are registered on the
application with :func:`add_limit_rule` (read on each request from ``app.state``, so features
can add theirs after the middleware was configured). The first matching rule wins.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_consent.errors import Issue, PayloadTooLarge, operation_outcome

__all__ = ["BodyLimit", "LimitRule", "add_limit_rule", "remove_limit_rules"]

_STATE_KEY = "body_limit_rules"
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True, slots=True)
class LimitRule:
    """A body limit for requests whose method is in ``methods``, whose path matches ``path``
    (``re.fullmatch``, against the path below any ``root_path``) and, when ``media_types`` is
    set, whose Content-Type (without parameters) is one of them."""

    limit: int
    path: re.Pattern[str]
    methods: frozenset[str] = _WRITE_METHODS
    media_types: frozenset[str] | None = None

    def matches(self, scope: Scope) -> bool:
        """Whether this rule applies to the request in ``scope``."""
        if scope.get("method", "") not in self.methods:
            return False
        path: str = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if self.path.fullmatch(path) is None:
            return False
        if self.media_types is None:
            return True
        return _media_type(scope) in self.media_types


def _media_type(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return str(value.decode("latin-1").split(";")[0].strip().lower())
    return ""


def add_limit_rule(app: Any, rule: LimitRule, *, first: bool = False) -> None:
    """Register ``rule`` on a Starlette/FastAPI application, after the rules registered before
    it (or ahead of them with ``first``)."""
    rules: list[LimitRule] | None = getattr(app.state, _STATE_KEY, None)
    if rules is None:
        rules = []
        setattr(app.state, _STATE_KEY, rules)
    if first:
        rules.insert(0, rule)
    else:
        rules.append(rule)


def remove_limit_rules(app: Any, rules: Sequence[LimitRule]) -> None:
    """Unregister rules added with :func:`add_limit_rule` (by identity)."""
    current: list[LimitRule] | None = getattr(app.state, _STATE_KEY, None)
    if current:
        current[:] = [r for r in current if all(r is not gone for gone in rules)]


class BodyLimit:
    """Refuse request bodies over the limit with 413, whether or not they announce a
    Content-Length (chunked uploads are counted as they arrive)."""

    def __init__(self, app: ASGIApp, limit: int, rules: Sequence[LimitRule] = ()) -> None:
        self.app = app
        self.limit = limit
        self.rules = tuple(rules)

    def limit_for(self, scope: Scope) -> int:
        """The limit for this request: the first matching rule's, else the default."""
        for rule in self.rules:
            if rule.matches(scope):
                return rule.limit
        app = scope.get("app")
        state = getattr(app, "state", None)
        for rule in getattr(state, _STATE_KEY, None) or ():
            if rule.matches(scope):
                return int(rule.limit)
        return self.limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    await _send_413(send, limit)
                    return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(_too_large(limit))
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> str:
    return f"The request body exceeds the limit of {limit} bytes"


async def _send_413(send: Send, limit: int) -> None:
    body = orjson.dumps(operation_outcome([Issue(_too_large(limit), "too-costly")]))
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/fhir+json; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
