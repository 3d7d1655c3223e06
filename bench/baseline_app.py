"""The bare baseline: a FastAPI app with one endpoint that returns fixed bytes.

It answers ``GET /fhir/Patient/{rid}`` with exactly the body, content type, ``ETag`` and
``Last-Modified`` of a stored Patient as the real server returned it (captured by
``bench/run_core.py`` into the file named by ``BENCH_BASELINE_BODY``, headers in
``BENCH_BASELINE_HEADERS`` as JSON). No database, no thread pool, no middleware: this is the
ceiling that FastAPI + uvicorn reach on this machine for the same response, so the read
figure can be quoted as a fraction of it.

Run it exactly like the server (1 worker, same loop and HTTP implementation)::

    BENCH_BASELINE_BODY=/tmp/patient.json uvicorn bench.baseline_app:app --loop uvloop \
        --http httptools --workers 1
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response

__all__ = ["app", "create_app"]

FHIR_JSON = "application/fhir+json; charset=utf-8"


def create_app(body: bytes, headers: dict[str, str]) -> FastAPI:
    """An app whose only endpoint returns ``body`` with ``headers``."""
    app = FastAPI(title="baseline", openapi_url=None, docs_url=None, redoc_url=None)
    fixed = dict(headers)

    @app.get("/fhir/Patient/{rid}")
    async def read(rid: str) -> Response:
        return Response(body, status_code=200, headers=fixed, media_type=FHIR_JSON)

    return app


def _from_env() -> FastAPI:
    path = os.environ.get("BENCH_BASELINE_BODY")
    body = Path(path).read_bytes() if path else b'{"resourceType":"Patient","id":"x"}'
    headers = json.loads(os.environ.get("BENCH_BASELINE_HEADERS", "{}"))
    return create_app(body, headers)


app = _from_env()
