"""Helpers for the patient-app tests: the full application (:func:`fhir_consent.app.create_app`)
seeded with the demo data and served by uvicorn on a loopback port in a thread, SMART sign-in
without a browser, an SSE reader, and Debian's Chromium for Playwright."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from argon2 import PasswordHasher
from smart.kit import drive_pages, pkce_pair

from fhir_consent.app import create_app
from fhir_consent.config import Settings
from fhir_consent.demo import Demo, seed
from fhir_consent.documents import DocumentSettings
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.store.migrate import upgrade
from fhir_consent.web import WebSettings
from smart_on_fhir import users as users_module

CHROMIUM = "/usr/bin/chromium"
#: Flags for this machine's closed network (see the machine notes).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "demo password 1"
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
BROWSER_REASON = (
    "the browser tests need Playwright for Python and Debian's chromium: "
    "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 pip install playwright && apt-get install -y chromium"
)


def require_browser() -> None:
    """Skip without Playwright or /usr/bin/chromium, but FAIL under CI=true."""
    missing = not os.access(CHROMIUM, os.X_OK)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = True
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(BROWSER_REASON + " — CI must install them (.ci/run)")
        pytest.skip(BROWSER_REASON)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


@contextmanager
def cheap_argon2() -> Iterator[None]:
    """Test-sized argon2 costs (the server runs in this process)."""
    cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(users_module, "_hasher", lambda: cheap)
        yield


@dataclass
class Live:
    """The full app with the demo data, served on ``origin``."""

    origin: str
    app: Any
    demo: Demo
    tmp: Path

    @property
    def fhir(self) -> str:
        return f"{self.origin}/fhir"

    @property
    def ctx(self) -> Any:
        return self.app.state.fhir

    def consent_enforced(self) -> bool:
        """Whether the consent layer (issue 4) is installed: only then are clinics refused."""
        return self.ctx.consent is not None


@contextmanager
def live_app(
    tmp: Path,
    template: Path,
    smart_keys: Path,
    *,
    web: WebSettings | None = None,
    database_url: str | None = None,
) -> Iterator[Live]:
    """Build, seed and serve the full app on a fresh SQLite database (a copy of
    ``template``), or on ``database_url`` (migrated and emptied by the caller)."""
    import uvicorn

    if database_url is None:
        db = tmp / "web.sqlite3"
        shutil.copy(template, db)
        url = f"sqlite:///{db}"
        upgrade(url)  # the template is at head already; this is a no-op check
    else:
        url = database_url
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    settings = Settings(
        database_url=url, auto_migrate=False, db_pool_size=8, smart_keys_dir=str(smart_keys)
    )
    ledger = LedgerSettings(
        _env_file=None,  # type: ignore[call-arg]
        keys_dir=str(tmp / "ledger-keys"),
        origin="demo.example/ledger",
    )
    documents = DocumentSettings(
        _env_file=None,  # type: ignore[call-arg]
        master_key_file=tmp / "master-keys.json",
        blob_backend="db",
    )
    web = web or WebSettings(  # type: ignore[call-arg]
        _env_file=None, events_poll_interval=0.2, events_heartbeat=0.5
    )
    with cheap_argon2():
        app = create_app(settings, ledger=ledger, documents=documents, web=web)
        demo = seed(app, base_url=origin, password=PASSWORD, out_dir=tmp / "demo")
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started, timeout=20)
        try:
            yield Live(origin, app, demo, tmp)
        finally:
            server.should_exit = True
            thread.join(10)
            app.state.fhir.db.dispose()


# -- SMART without a browser ----------------------------------------------------------------


def patient_token(live: Live, username: str = "peter", scope: str | None = None) -> str:
    """A patient token through the real pages (login, consent), as the app would get it."""
    verifier, challenge = pkce_pair()
    redirect = f"{live.origin}/app/"
    params = {
        "response_type": "code",
        "client_id": live.demo.app_client_id,
        "redirect_uri": redirect,
        "scope": scope or WebSettings(_env_file=None).scope,  # type: ignore[call-arg]
        "state": "s1",
        "aud": live.fhir,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    with httpx.Client() as http:
        first = http.get(f"{live.origin}/auth/authorize?{urlencode(params)}")
        last = drive_pages(http, first, username=username, password=PASSWORD)
        code = parse_qs(urlsplit(last.headers["location"]).query)["code"][0]
        r = http.post(
            f"{live.origin}/auth/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect,
                "code_verifier": verifier,
                "client_id": live.demo.app_client_id,
            },
        )
        r.raise_for_status()
        token: str = r.json()["access_token"]
        return token


def clinic_headers(live: Live) -> dict[str, str]:
    from fhir_consent.demo import clinic_token

    token = clinic_token(live.origin, live.demo.clinic_key_file)
    return {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}


# -- reading the event stream ---------------------------------------------------------------


class EventReader:
    """Reads ``$events`` in a thread; parsed ``(event, id, data)`` tuples land in ``events``."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self.headers = headers
        self.events: queue.Queue[tuple[str, str | None, str]] = queue.Queue()
        self.status: int | None = None
        self.ended = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EventReader:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(10, read=30)) as http,
                http.stream("GET", self.url, headers=self.headers) as r,
            ):
                self.status = r.status_code
                event, eid, data = "message", None, []
                for line in r.iter_lines():
                    if self._stop.is_set():
                        return
                    if line == "":
                        if data:
                            self.events.put((event, eid, "\n".join(data)))
                        event, eid, data = "message", None, []
                    elif line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("id: "):
                        eid = line[4:]
                    elif line.startswith("data: "):
                        data.append(line[6:])
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def next(self, kind: str | None = None, timeout: float = 5.0) -> tuple[str, str | None, str]:
        """The next event (of ``kind``), waiting at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind or 'event'} within {timeout} s")
            try:
                item = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if kind is None or item[0] == kind:
                return item


def propose(live: Live, patient: str) -> str:
    """A new inquiry from Lakeside for ``patient``: POSTed by the clinic's system when its
    scopes allow it, else written as the server would (the demo client only reads)."""
    from datetime import UTC, datetime

    from fhir_consent.demo import inquiry

    body = inquiry(
        f"Patient/{patient}", "Organization/lakeside", None, days=30, now=datetime.now(UTC)
    )
    headers = {**clinic_headers(live), "Content-Type": "application/fhir+json"}
    r = httpx.post(f"{live.fhir}/Consent", json=body, headers=headers)
    if r.status_code == 403:
        with live.ctx.db.write() as conn:
            rid: str = live.ctx.service(conn).create("Consent", body).row.res_id
            return rid
    assert r.status_code == 201, r.text
    created: str = r.json()["id"]
    return created
