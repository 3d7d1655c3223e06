"""Liveness and readiness (``/healthz``, ``/readyz``).

``/healthz`` answers 200 while the process serves HTTP at all; it touches nothing else, so a
database outage never makes an orchestrator restart healthy workers.

``/readyz`` answers 200 only when this worker can do its job, else 503, both with a JSON body
naming each check and, on 503, the first failing one as ``reason``:

``database``
    A *new* connection (never a pooled one: a pooled SQLite connection keeps working on a
    deleted file, and a pooled PostgreSQL one hides a refused login) opens and answers
    ``SELECT 1`` within ``ready_timeout`` seconds. SQLite is opened read-write without
    create, so a missing database file is a failure rather than a fresh empty database.
``migrations``
    The schema is at the Alembic head of this code (``alembic_version`` holds exactly the
    script heads).
``keys``
    The keys this worker signs and decrypts with are loaded: the ledger key ring, the document
    master key ring and (unless ``open_access``) the SMART token signing keys.
``ledger_outbox``
    At most ``ready_max_outbox_backlog`` ledger entries wait (pending or sent) for the external
    ledger: beyond that the relay is not keeping up and new writes should go elsewhere.

Details name exception types only, never their messages (which can quote paths or values).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.script import ScriptDirectory
from starlette.concurrency import run_in_threadpool

from fhir_consent.config import Settings
from fhir_consent.ledger.tables import ledger_outbox
from fhir_consent.store.db import normalize_url
from fhir_consent.store.migrate import alembic_config

__all__ = ["Check", "Readiness", "probe_url"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def probe_url(url: str) -> sa.URL:
    """The URL a readiness probe connects with: SQLite files read-write *without* create."""
    parsed = sa.make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite":
        return parsed
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return parsed
    path = Path(database).resolve()
    return parsed.set(database=f"file:{path}", query={**parsed.query, "mode": "rw", "uri": "true"})


def _failure(exc: BaseException) -> str:
    return f"failed ({type(exc).__name__})"


class Readiness:
    """The readiness checks of one app (see the module docstring)."""

    def __init__(self, settings: Settings, keys: Callable[[], None]) -> None:
        self.settings = settings
        self.keys = keys
        url = probe_url(settings.database_url)
        connect_args: dict[str, Any] = {}
        if url.get_backend_name() == "sqlite":
            connect_args["timeout"] = settings.ready_timeout
        else:
            connect_args["connect_timeout"] = max(1, math.ceil(settings.ready_timeout))
        self.engine = sa.create_engine(url, poolclass=sa.NullPool, connect_args=connect_args)
        self._heads: frozenset[str] | None = None

    def heads(self) -> frozenset[str]:
        """The Alembic heads of this code's migrations."""
        if self._heads is None:
            script = ScriptDirectory.from_config(alembic_config(self.settings.database_url))
            self._heads = frozenset(script.get_heads())
        return self._heads

    def _database_checks(self) -> list[Check]:
        try:
            conn = self.engine.connect()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            return [Check("database", False, _failure(exc))]
        checks: list[Check] = []
        with conn:
            try:
                conn.execute(sa.text("SELECT 1")).scalar()
                checks.append(Check("database", True, "ok"))
            except Exception as exc:  # noqa: BLE001
                return [Check("database", False, _failure(exc))]
            try:
                found = frozenset(
                    str(v)
                    for v in conn.execute(
                        sa.text("SELECT version_num FROM alembic_version")
                    ).scalars()
                )
                at_head = found == self.heads()
                where = ",".join(sorted(found)) or "empty"
                checks.append(
                    Check("migrations", at_head, "at head" if at_head else f"at {where}, not head")
                )
            except Exception as exc:  # noqa: BLE001
                checks.append(Check("migrations", False, _failure(exc)))
            try:
                o = ledger_outbox.c
                backlog = int(
                    conn.execute(
                        sa.select(sa.func.count()).where(o.status.in_(("pending", "sent")))
                    ).scalar()
                    or 0
                )
                bound = self.settings.ready_max_outbox_backlog
                checks.append(
                    Check(
                        "ledger_outbox",
                        backlog <= bound,
                        f"{backlog} waiting (bound {bound})",
                    )
                )
            except Exception as exc:  # noqa: BLE001
                checks.append(Check("ledger_outbox", False, _failure(exc)))
        return checks

    def _key_check(self) -> Check:
        try:
            self.keys()
        except Exception as exc:  # noqa: BLE001
            return Check("keys", False, _failure(exc))
        return Check("keys", True, "loaded")

    def run(self) -> list[Check]:
        """Every check, in order (blocking: run it in a thread)."""
        return [*self._database_checks(), self._key_check()]

    async def report(self) -> tuple[int, dict[str, Any]]:
        """``(status code, JSON body)`` of ``/readyz``."""
        try:
            checks = await asyncio.wait_for(
                run_in_threadpool(self.run), timeout=self.settings.ready_timeout + 1
            )
        except TimeoutError:
            checks = [Check("database", False, "timed out")]
        failing = [c for c in checks if not c.ok]
        body: dict[str, Any] = {
            "status": "ready" if not failing else "not ready",
            "checks": {c.name: c.detail for c in checks},
        }
        if failing:
            body["reason"] = f"{failing[0].name}: {failing[0].detail}"
        return (200 if not failing else 503), body

    def dispose(self) -> None:
        self.engine.dispose()
