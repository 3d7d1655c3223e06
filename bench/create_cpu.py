"""Server CPU per create, in-process: ``POST /fhir/Patient`` with the official
``Patient-example.json`` straight into the whole ASGI app (``create_app()``, open access, no
HTTP client or socket), on a fresh SQLite file or a PostgreSQL database, ``--concurrency``
requests in flight at a time. Prints the process CPU time per create (the app's event loop,
its worker and writer threads, and the psycopg/SQLite client side; not the PostgreSQL
backend) for 3 rounds after a warm-up. CPU time, unlike req/s, barely depends on what else
the machine runs.

    python bench/create_cpu.py --backend sqlite --concurrency 32 -n 512
    python bench/create_cpu.py --backend postgres --database-url \
        postgresql+psycopg://postgres@127.0.0.1:5432/fc_create
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = (ROOT / "tests" / "fixtures" / "hl7-r4-examples" / "Patient-example.json").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("-n", type=int, default=512, help="creates per round")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="create-cpu-")
    url = args.database_url or (
        f"sqlite:///{tmp}/db.sqlite"
        if args.backend == "sqlite"
        else "postgresql+psycopg://postgres@127.0.0.1:5432/fc_create"
    )
    os.environ.update(
        FHIR_CONSENT_DATABASE_URL=url,
        FHIR_CONSENT_OPEN_ACCESS="true",
        FHIR_CONSENT_SMART_KEYS_DIR=f"{tmp}/smart-keys",
    )
    os.chdir(tmp)  # the ledger's keys, created on first start, stay out of the checkout
    from fhir_consent.app import create_app
    from fhir_consent.store.migrate import upgrade

    upgrade(url)
    app = create_app()
    headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/fhir+json"),
        (b"accept", b"application/fhir+json"),
        (b"content-length", str(len(BODY)).encode()),
    ]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/fhir/Patient",
        "raw_path": b"/fhir/Patient",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def one() -> None:
        sent = False
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": BODY, "more_body": False}
            await asyncio.sleep(3600)  # the client never disconnects
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(dict(scope), receive, send)
        assert statuses == [201], statuses

    async def rounds() -> None:
        c = max(1, args.concurrency)

        async def batch(k: int) -> None:
            for _ in range(max(1, k // c)):
                await asyncio.gather(*(one() for _ in range(c)))

        async with app.router.lifespan_context(app):
            await batch(100)
            results = []
            for _ in range(3):
                cpu, wall = time.process_time(), time.perf_counter()
                await batch(args.n)
                done = max(1, args.n // c) * c
                results.append(
                    (
                        (time.process_time() - cpu) / done * 1e6,
                        (time.perf_counter() - wall) / done * 1e6,
                    )
                )
        cpu_text = ", ".join(f"{r[0]:,.0f}" for r in results)
        wall_text = ", ".join(f"{r[1]:,.0f}" for r in results)
        print(
            f"{args.backend} concurrency={c}: CPU µs per create {cpu_text}; wall µs {wall_text}"
        )

    asyncio.run(rounds())


if __name__ == "__main__":
    main()
