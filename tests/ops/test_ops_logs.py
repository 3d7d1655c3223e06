"""Logs of a real ``fhir-consent serve``: one JSON line per request with its request id, the
id in every line of that request, and no patient data anywhere — whatever the requests carry
(names, identifiers, birth dates, client-chosen ids, query values, document content, bad
bodies, bad request ids), at debug level."""

from __future__ import annotations

import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from opskit import Server, clean_env, document, patient

from fhir_consent.ops.logs import JsonFormatter, TextFormatter, logging_config, request_id
from fhir_consent.ops.middleware import valid_request_id

FHIR = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}


def _marker() -> str:
    return "Qx" + uuid.uuid4().hex[:10].upper()


def _traffic(base: str, origin: str, marker: str) -> tuple[list[str], dict[str, str]]:
    """Requests full of patient data; returns the secrets to look for and the request ids
    the server answered, by what the request was."""
    ids: dict[str, str] = {}
    secrets = [marker, "1974-12-25"]
    with httpx.Client(timeout=30, headers=FHIR) as http:

        def note(name: str, response: httpx.Response, *expected: int) -> httpx.Response:
            assert response.status_code in expected, (name, response.status_code, response.text)
            ids[name] = response.headers["x-request-id"]
            return response

        made = note("create", http.post(f"{base}/Patient", json=patient(marker)), 201)
        pid = made.json()["id"]
        secrets.append(pid)
        chosen = f"pt-{marker.lower()}"
        secrets.append(chosen)
        note(
            "put",
            http.put(f"{base}/Patient/{chosen}", json={**patient(marker), "id": chosen}),
            200,
            201,
        )
        note("read", http.get(f"{base}/Patient/{pid}"), 200)
        note("vread", http.get(f"{base}/Patient/{pid}/_history/1"), 200)
        note(
            "search",
            http.get(
                f"{base}/Patient", params={"family": f"Family{marker}", "birthdate": "1974-12-25"}
            ),
            200,
        )
        note("identifier", http.get(f"{base}/Patient?identifier=MRN{marker}"), 200)
        note("missing", http.get(f"{base}/Patient/nobody-{marker}"), 404)
        bad = {**patient(marker), "birthDate": f"born-{marker}"}
        note("invalid", http.post(f"{base}/Patient", json=bad), 400)
        note("malformed", http.post(f"{base}/Patient", content=f'{{"name": "{marker}'), 400)
        content = f"%PDF-1.4 discharge letter of Family{marker}".encode()
        doc = note(
            "document", http.post(f"{base}/DocumentReference", json=document(pid, content)), 201
        ).json()
        binary = doc["content"][0]["attachment"]["url"].rsplit("/", 1)[-1]
        got = note(
            "download",
            http.get(f"{base}/Binary/{binary}", headers={"accept": "application/pdf"}),
            200,
        )
        assert got.content == content
        note("patient-search", http.get(f"{base}/DocumentReference?patient={pid}"), 200)
        note("jwks", http.get(f"{origin}/auth/jwks"), 200)  # creates the SMART keys: logs
        note(
            "token",
            http.post(
                f"{origin}/auth/token",
                data={"grant_type": "password", "username": f"Family{marker}", "password": marker},
            ),
            400,
            401,
        )
        note("echo", http.get(f"{base}/metadata", headers={"x-request-id": "proxy-id-0042"}), 200)
        note(
            "replaced",
            http.get(f"{base}/metadata", headers={"x-request-id": f"Family{marker} Given"}),
            200,
        )
    return secrets, ids


def test_server_logs_carry_request_ids_and_no_patient_data(db_url: str, tmp_path: Path) -> None:
    marker = _marker()
    env = clean_env(
        FHIR_CONSENT_DATABASE_URL=db_url,
        FHIR_CONSENT_OPEN_ACCESS="true",
        FHIR_CONSENT_LOG_FORMAT="json",
        FHIR_CONSENT_LOG_LEVEL="debug",
    )
    with Server(tmp_path, env) as server:
        secrets, ids = _traffic(server.base, server.origin, marker)
    text = server.output()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # all JSON

    for secret in secrets:
        assert secret.lower() not in text.lower(), f"{secret!r} found in the server log"

    access = {ln["request_id"]: ln for ln in lines if ln["logger"] == "fhir_consent.access"}
    assert ids["echo"] == "proxy-id-0042"
    assert re.fullmatch(r"[0-9a-f]{32}", ids["replaced"])
    assert len(set(ids.values())) == len(ids), "every request has its own id"
    routes = {name: access[rid]["route"] for name, rid in ids.items()}
    assert routes["create"] == "/fhir/Patient"
    assert routes["put"] == routes["read"] == routes["missing"] == "/fhir/Patient/{rid}"
    assert routes["vread"] == "/fhir/Patient/{rid}/_history/{vid}"
    assert routes["search"] == "/fhir/Patient"
    assert routes["download"] == "/fhir/Binary/{rid}"
    assert access[ids["invalid"]]["status"] == 400
    assert access[ids["download"]]["method"] == "GET"
    assert access[ids["download"]]["bytes"] > 0
    assert all(isinstance(ln["duration_ms"], float | int) for ln in access.values())
    # A line logged by the request's own work (in a worker thread) carries its request id.
    keys_line = [ln for ln in lines if "SMART signing keys" in ln["msg"]]
    assert keys_line and keys_line[0]["request_id"] == ids["jwks"]
    # Outside requests (start-up, shutdown) lines have no request id.
    assert any(ln["request_id"] == "-" and ln["logger"].startswith("uvicorn") for ln in lines)


def _record(msg: str, *args: Any, exc: BaseException | None = None, **extra: Any) -> Any:
    record = logging.LogRecord("fhir_consent.test", logging.ERROR, __file__, 1, msg, args, None)
    if exc is not None:
        record.exc_info = (type(exc), exc, exc.__traceback__)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def _raise(message: str) -> ValueError:
    try:
        raise ValueError(message)
    except ValueError as exc:
        return exc


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_exception_messages_never_reach_the_log(formatter: logging.Formatter) -> None:
    exc = _raise("invalid birthDate 'Family QxSECRET 1974'")
    token = request_id.set("abcdef123456")
    try:
        line = formatter.format(_record("batch failed: %s", "OperationalError", exc=exc))
    finally:
        request_id.reset(token)
    assert "QxSECRET" not in line and "1974" not in line
    assert "builtins.ValueError" in line and "_raise" in line  # the type and the stack stay
    assert "abcdef123456" in line


def test_text_format_names_the_request_and_its_fields() -> None:
    line = TextFormatter().format(
        _record("request", request_id="r-12345678", method="GET", route="/fhir/{rtype}", status=200)
    )
    assert "[r-12345678] request method=GET route=/fhir/{rtype} status=200" in line


def test_logging_config_holds_chatty_libraries_at_warning() -> None:
    config = logging_config("text", "debug")
    assert config["root"]["level"] == "DEBUG"
    for name in ("authlib", "sqlalchemy", "httpx"):
        assert config["loggers"][name]["level"] == "WARNING"
    with pytest.raises(ValueError):
        logging_config("json", "chatty")


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("proxy-id-0042", True),
        ("0123456789abcdef0123456789abcdef", True),
        ("f47ac10b-58cc-4372-a567-0e02b2c3d479", True),
        ("short", False),
        ("Family Name", False),
        ("a" * 65, False),
        ("id\nforged log line", False),
        (None, False),
    ],
)
def test_which_incoming_request_ids_are_kept(value: str | None, ok: bool) -> None:
    assert valid_request_id(value) is ok
