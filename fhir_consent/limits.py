"""Request body size limits, enforced before any handler reads the body (413 OperationOutcome).

Kept apart from the app factory so that features with their own limits (document uploads)
can extend :meth:`BodyLimit.limit_for` without touching application wiring.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_consent.errors import Issue, PayloadTooLarge, operation_outcome

__all__ = ["BodyLimit"]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, whether or not they announce a
    Content-Length (chunked uploads are counted as they arrive)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def limit_for(self, scope: Scope) -> int:
        """The limit for this request (one limit for every path today)."""
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
