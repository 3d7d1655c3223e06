"""What each part of the authenticated read costs, measured in one process: ``GET
/fhir/Patient/{id}`` of 16 patients, each with their own token from a real standalone launch,
sent straight into the ASGI app (no HTTP, no load generator), in rounds that take turns
between an open app (``open_access``) and the secured app with one part switched off:

* ``auth``: the secured read as served (token, revocation check, consent, audit);
* ``no_audit``: the audit sink records nothing (no AuditEvent is queued or written);
* ``no_token_check``: no per-request revocation check (on PostgreSQL the read's own query
  runs alone instead of joined to the token's state);
* ``no_observers``: audit records are queued but not counted in the metrics.

A variant switched off serves what the secured read serves (every response is checked for
200) but is not a configuration anyone may run: it exists to measure the part it drops.

Per round it takes the process CPU time per request (the event loop and the audit writer;
``time.process_time``) and the event loop's alone (``time.thread_time``). On a machine whose
speed drifts from minute to minute (other tenants), one round of one variant against the
``auth`` round next to it is the fair comparison: the script prints, per variant, the median
of those paired differences and of ``open / variant`` (the ratio the #3 target is judged on,
without the HTTP layer, which adds the same to both):

    python bench/read_parts.py --backend sqlite --rounds 40 --requests 1500
    python bench/read_parts.py --backend postgres --variants no_audit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bulk_load  # noqa: E402
import read_cpu  # noqa: E402
import run_core  # noqa: E402

READERS = 16
VARIANTS = ("no_audit", "no_token_check", "no_observers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--requests", type=int, default=1500, help="requests per round")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    tmp = Path(tempfile.mkdtemp(prefix="read-parts-"))
    os.chdir(tmp)  # the apps create their key rings under the working directory
    with read_cpu._database(args.backend, tmp) as url:
        env, host, tokens, ids = _prepare(url, tmp)
        os.environ.update(env)
        asyncio.run(_measure(args, variants, host, tokens, ids))


def _prepare(url: str, tmp: Path) -> tuple[dict[str, str], str, list[str], list[str]]:
    """The data set, and one token per patient from a real server on the same database."""
    from fhir_consent.store.migrate import upgrade

    upgrade(url)
    bulk_load.load(url, read_cpu.PLAN)
    env = {
        "FHIR_CONSENT_DATABASE_URL": url,
        "FHIR_CONSENT_AUTO_MIGRATE": "false",
        "FHIR_CONSENT_SMART_KEYS_DIR": str(tmp / "smart-keys"),
    }
    ids = [bulk_load.patient_id(read_cpu.PLAN.seed, i) for i in range(READERS)]
    with run_core.serving(
        "fhir_consent.main:app", env, tmp / "server.log", "/fhir/metadata"
    ) as srv:
        client_id, password, prefix = run_core.provision_patient_logins(url, ids)
        tokens = [
            run_core.patient_token(srv.base, client_id, f"{prefix}{i}", password)
            for i in range(READERS)
        ]
        host = srv.base.split("//", 1)[1]  # the tokens' audience names this host
    return env, host, tokens, ids


def _app(open_access: bool) -> Any:
    from fhir_consent.app import create_app
    from fhir_consent.config import Settings

    os.environ["FHIR_CONSENT_OPEN_ACCESS"] = "true" if open_access else "false"
    return create_app(Settings())


async def _drive(
    app: Any, host: str, paths: list[str], tokens: list[str] | None, n: int
) -> set[int]:
    """``n`` reads through the ASGI app, round robin over the patients; the statuses seen."""
    statuses: set[int] = set()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    port = int(host.rsplit(":", 1)[1])
    scopes = []
    for i, path in enumerate(paths):
        headers = [(b"host", host.encode()), (b"accept", b"application/fhir+json")]
        if tokens is not None:
            headers.append((b"authorization", f"Bearer {tokens[i]}".encode()))
        scopes.append(
            {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "query_string": b"",
                "root_path": "",
                "headers": headers,
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", port),
            }
        )
    for k in range(n):
        await app(dict(scopes[k % len(scopes)]), receive, send)
        if k % 250 == 249:
            await asyncio.sleep(0)  # let the event loop's other tasks run
    return statuses


async def _measure(
    args: argparse.Namespace, variants: list[str], host: str, tokens: list[str], ids: list[str]
) -> None:
    paths = [f"/fhir/Patient/{pid}" for pid in ids]
    opened, secured = _app(True), _app(False)
    async with contextlib.AsyncExitStack() as stack:
        for app in (opened, secured):
            await stack.enter_async_context(app.router.lifespan_context(app))
        assert await _drive(opened, host, paths, None, 2000) == {200}
        assert await _drive(secured, host, paths, tokens, 2000) == {200}
        assert await _drive(secured, host, paths, None, 16) == {401}  # it is the secured app
        ctx = secured.state.fhir
        sink = ctx.audit
        kept = (ctx.token_check, ctx.token_check_async)
        observers = list(sink.observers)

        async def query_only(fetch: Any, _access: Any, then: Any = None) -> Any:
            return None if then is None else await fetch(*then)

        def restore() -> None:
            ctx.token_check, ctx.token_check_async = kept
            sink.__dict__.pop("record_access", None)  # the class's method again
            sink.observers[:] = observers

        def no_audit() -> None:
            sink.record_access = lambda *_a, **_k: None

        def no_token_check() -> None:
            ctx.token_check = None
            ctx.token_check_async = query_only  # PostgreSQL: the read's query alone

        def no_observers() -> None:
            sink.observers[:] = []

        switches: dict[str, Callable[[], None]] = {
            "no_audit": no_audit,
            "no_token_check": no_token_check,
            "no_observers": no_observers,
        }
        order = ["open", "auth", *variants]
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in order}
        for _ in range(args.rounds):
            for name in order:
                restore()
                if name in switches:
                    switches[name]()
                await asyncio.sleep(0.3)  # the audit writer's last round
                proc, loop = time.process_time(), time.thread_time()
                seen = await _drive(
                    opened if name == "open" else secured,
                    host,
                    paths,
                    None if name == "open" else tokens,
                    args.requests,
                )
                await asyncio.sleep(0.3)  # its audit records are written in this round's time
                cpu[name].append(
                    (
                        (time.process_time() - proc) / args.requests * 1e6,
                        (time.thread_time() - loop) / args.requests * 1e6,
                    )
                )
                if seen != {200}:
                    raise SystemExit(f"{name}: statuses {sorted(seen)}")
        restore()
    _report(cpu, args)


def _report(cpu: dict[str, list[tuple[float, float]]], args: argparse.Namespace) -> None:
    print(
        f"{args.backend}: {args.rounds} rounds of {args.requests} reads each; "
        "µs of CPU per request (median over rounds)"
    )
    auth = [p for p, _ in cpu["auth"]]
    opened = [p for p, _ in cpu["open"]]
    for name, rounds in cpu.items():
        proc = statistics.median(p for p, _ in rounds)
        loop = statistics.median(t for _, t in rounds)
        paired = statistics.median(p - a for (p, _), a in zip(rounds, auth, strict=True))
        ratio = statistics.median(o / p for (p, _), o in zip(rounds, opened, strict=True))
        print(
            f"  {name:15} process {proc:6.1f}  event loop {loop:6.1f}  "
            f"vs auth {paired:+6.1f}  open/this {ratio * 100:5.1f}%"
        )


if __name__ == "__main__":
    main()
