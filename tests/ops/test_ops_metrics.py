"""``/metrics``: request counts and latencies by route template, access decisions from the
audit trail, ledger outbox backlog and lag, audit queue depth; its protection; and
prometheus-client's multiprocess mode under ``fhir-consent serve --workers 2``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from opskit import Server, clean_env, consent, patient
from prometheus_client.parser import text_string_to_metric_families

from fhir_consent.app import create_core_app, install_layers
from fhir_consent.auth import AccessContext
from fhir_consent.config import Settings
from fhir_consent.ledger import outbox
from fhir_consent.ops import install as install_ops
from smart_on_fhir.scopes import parse_scopes

TOKEN = "metrics-secret-token-for-tests"
BEARER = {"authorization": f"Bearer {TOKEN}"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition text, by name and sorted labels."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


class Caller:
    """The authenticator of these tests: the caller is whoever the test says."""

    def __init__(self) -> None:
        self.access = AccessContext(scopes=None)

    async def __call__(self, _request: object) -> AccessContext:
        return self.access


@contextmanager
def whole_server(settings: Settings) -> Iterator[tuple[TestClient, Caller]]:
    """The whole server (every layer and the ops layer) with an injected caller (in place
    of SMART tokens: ``open_access`` only leaves the token check out)."""
    app = create_core_app(settings.model_copy(update={"open_access": True}))
    caller = Caller()
    app.state.fhir.authenticate = caller
    install_layers(app)
    install_ops(app)
    with TestClient(app, base_url="https://testserver") as client:
        yield client, caller


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_requests_decisions_and_ledger_gauges(db_url: str) -> None:
    settings = Settings(database_url=db_url, auto_migrate=False, metrics_token=TOKEN)
    with whole_server(settings) as (client, caller):
        pid = client.post("/fhir/Patient", json=patient("MetricsCase")).json()["id"]
        other = client.post("/fhir/Patient", json=patient("OtherCase")).json()["id"]
        assert client.post("/fhir/Consent", json=consent(pid)).status_code == 201
        caller.access = AccessContext(
            scopes=parse_scopes("patient/*.rs"), patient=pid, fhir_user=f"Patient/{pid}"
        )
        assert client.get(f"/fhir/Patient/{pid}").status_code == 200  # permit: patient-self
        stranger = AccessContext(
            scopes=parse_scopes("user/*.rs"), fhir_user="Practitioner/stranger", client_id="ehr"
        )
        caller.access = stranger
        refused = client.get(f"/fhir/Patient/{other}")
        assert refused.status_code in (403, 404)  # deny: nobody permitted this practitioner
        client.get("/fhir/Patient/does-not-exist")
        caller.access = AccessContext(scopes=None)
        db = client.app.state.fhir.db  # type: ignore[attr-defined]
        with db.write() as conn:  # what an external engine's outbox holds while its node is down
            assert outbox.backfill(conn) == 1
        time.sleep(0.05)

        text = client.get("/metrics", headers=BEARER).text
        assert (
            value(
                text,
                "fhir_consent_http_requests_total",
                method="POST",
                route="/fhir/Patient",
                status="201",
            )
            == 2
        )
        assert (
            value(
                text,
                "fhir_consent_http_requests_total",
                method="GET",
                route="/fhir/Patient/{rid}",
                status="200",
            )
            == 1
        )
        assert (
            value(
                text,
                "fhir_consent_http_request_duration_seconds_count",
                method="GET",
                route="/fhir/Patient/{rid}",
            )
            == 3
        )
        assert (
            value(
                text, "fhir_consent_access_decisions_total", outcome="permit", reason="patient-self"
            )
            >= 1
        )
        denied = sum(
            v
            for (name, labels), v in samples(text).items()
            if name == "fhir_consent_access_decisions_total" and ("outcome", "deny") in labels
        )
        assert denied >= 1
        assert value(text, "fhir_consent_ledger_entries") == 1
        assert value(text, "fhir_consent_ledger_outbox", status="pending") == 1
        assert value(text, "fhir_consent_ledger_outbox_backlog") == 1
        assert value(text, "fhir_consent_ledger_lag_seconds") > 0
        assert value(text, "fhir_consent_db_up") == 1
        assert ("fhir_consent_audit_queue_depth", ()) in samples(text)
        for (_name, labels), _v in samples(text).items():  # no id ever becomes a label
            assert all(pid not in v and other not in v for _k, v in labels)


def test_audit_queue_depth_counts_unwritten_audit_events(db_url: str) -> None:
    settings = Settings(
        database_url=db_url, auto_migrate=False, metrics_token=TOKEN, audit_flush_interval=30
    )
    with whole_server(settings) as (client, caller):
        pid = client.post("/fhir/Patient", json=patient("QueueCase")).json()["id"]
        caller.access = AccessContext(
            scopes=parse_scopes("patient/*.rs"), patient=pid, fhir_user=f"Patient/{pid}"
        )
        for _ in range(4):  # the first is written at once, the writer then waits 30 s
            assert client.get(f"/fhir/Patient/{pid}").status_code == 200
        sink = client.app.state.fhir.audit  # type: ignore[attr-defined]
        assert sink.pending >= 3
        text = client.get("/metrics", headers=BEARER).text
        assert value(text, "fhir_consent_audit_queue_depth") == sink.pending


def test_metrics_need_the_token_when_one_is_set(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}"
    with whole_server(Settings(database_url=url, metrics_token=TOKEN)) as (client, _):
        assert client.get("/metrics").status_code == 401
        wrong = client.get("/metrics", headers={"authorization": "Bearer not-it"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
        ok = client.get("/metrics", headers=BEARER)
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")


def test_metrics_can_be_switched_off(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}"
    settings = Settings(database_url=url, metrics_enabled=False, metrics_token=TOKEN)
    with whole_server(settings) as (client, _):
        assert client.get("/metrics", headers=BEARER).status_code == 404


def test_without_a_token_only_direct_loopback_clients_scrape(tmp_path: Path) -> None:
    env = clean_env(FHIR_CONSENT_DATABASE_URL=f"sqlite:///{tmp_path / 'm.sqlite3'}")
    with Server(tmp_path, env) as server:
        assert httpx.get(f"{server.origin}/metrics").status_code == 200
        proxied = httpx.get(f"{server.origin}/metrics", headers={"x-forwarded-for": "203.0.113.9"})
        assert proxied.status_code == 403
        forwarded = httpx.get(f"{server.origin}/metrics", headers={"forwarded": "for=127.0.0.1"})
        assert forwarded.status_code == 403


def test_several_workers_report_merged_metrics(pg_url: str | None, tmp_path: Path) -> None:
    """Several workers share a PostgreSQL database (the deployment docs/operations.md
    describes); SQLite deployments run one worker."""
    if pg_url is None:
        pytest.skip("PostgreSQL not reachable")
    metrics_dir = tmp_path / "metrics"
    env = clean_env(
        FHIR_CONSENT_DATABASE_URL=pg_url,
        FHIR_CONSENT_OPEN_ACCESS="true",
        FHIR_CONSENT_METRICS_TOKEN=TOKEN,
        FHIR_CONSENT_METRICS_DIR=str(metrics_dir),
    )
    requests = 60
    with Server(tmp_path, env, args=("--workers", "2")) as server:
        deadline = time.monotonic() + 60
        while len(list(metrics_dir.glob("gauge_livesum_*.db"))) < 2:  # both workers are up
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)

        def one(_i: int) -> int:
            with httpx.Client(timeout=30) as fresh:  # a new connection: any worker may take it
                return fresh.get(f"{server.base}/metadata").status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(one, range(requests))) == {200}
        pids = {p.stem.rsplit("_", 1)[-1] for p in metrics_dir.glob("counter_*.db")}
        assert len(pids) == 2, f"both workers should have served requests: {pids}"
        for _ in range(6):  # whichever worker answers, it reports both workers' counts
            with httpx.Client(timeout=30) as fresh:
                text = fresh.get(f"{server.origin}/metrics", headers=BEARER).text
            served = value(
                text,
                "fhir_consent_http_requests_total",
                method="GET",
                route="/fhir/metadata",
                status="200",
            )
            assert served == requests
    assert server.proc.returncode == 0
    assert not list(metrics_dir.glob("gauge_livesum_*.db")), "stopped workers' gauges are gone"
