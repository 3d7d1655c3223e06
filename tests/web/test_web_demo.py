"""``fhir-consent demo``: the data set, the logins it prints, and ``demo clinic``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from webkit import Live, cheap_argon2, live_app, patient_token

from fhir_consent.demo import _pdf, add_parser, redirect_uris_for
from smart_on_fhir.keys import KeySet


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fhir-consent")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    result: int = args.func(args)
    return result


def test_demo_seeds_and_prints_the_logins(
    tmp_path: Path,
    sqlite_template: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # keys (ledger, documents, SMART) go to ./keys as for serve
    db = f"sqlite:///{tmp_path / 'demo.sqlite3'}"
    with cheap_argon2():
        assert _run(["demo", "--database-url", db, "--json", "--password", "pw-123456"]) == 0
    out = json.loads(capsys.readouterr().out)
    logins = {login["username"]: login for login in out["logins"]}
    assert set(logins) == {"peter", "maria", "dr.weber", "dr.berg"}
    assert logins["peter"]["fhir_user"] == "Patient/peter"
    assert logins["dr.weber"]["fhir_user"] == "Practitioner/dr-weber"
    assert all(login["password"] == "pw-123456" for login in out["logins"])
    assert out["app_client_id"] == "fhir-consent-patient-app"
    assert out["redirect_uris"] == ["http://localhost:8000/app/", "http://127.0.0.1:8000/app/"]
    key = Path(out["clinic_key_file"])
    assert key.stat().st_mode & 0o077 == 0  # the private key is private
    assert json.loads(key.read_text())["kty"] == "EC"
    assert set(out["documents"]) == {"discharge", "lab", "summary"}

    # a second run refuses rather than duplicating
    with cheap_argon2():
        assert _run(["demo", "--database-url", db]) == 2
    assert "already holds the demo data" in capsys.readouterr().err

    # the human-readable form on a fresh database, with random passwords
    db2 = f"sqlite:///{tmp_path / 'demo2.sqlite3'}"
    with cheap_argon2():
        assert _run(["demo", "--database-url", db2, "--base-url", "http://127.0.0.1:9000"]) == 0
    text = capsys.readouterr().out
    assert "Patient app:        http://127.0.0.1:9000/app/" in text
    assert "peter" in text and "dr.weber" in text and "lakeside-ehr" in text
    assert "fhir-consent demo clinic --patient peter" in text


def test_demo_data_through_the_api(tmp_path: Path, sqlite_template: Path) -> None:
    """What the patient app shows: one pending inquiry, one grant, three documents whose
    content comes back as stored (PDF and CDA); and demo clinic acts as Lakeside's EHR."""
    import httpx

    keys = tmp_path / "smart"
    KeySet.generate().save(keys)
    with live_app(tmp_path, sqlite_template, keys) as live:
        token = patient_token(live, "peter")
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
        bundle = httpx.get(f"{live.fhir}/Consent", params={"patient": "peter"}, headers=headers)
        statuses = sorted(e["resource"]["status"] for e in bundle.json()["entry"])
        assert statuses == ["active", "proposed"]
        docs = httpx.get(
            f"{live.fhir}/DocumentReference", params={"patient": "peter"}, headers=headers
        ).json()["entry"]
        assert len(docs) == 3
        types = set()
        for entry in docs:
            attachment = entry["resource"]["content"][0]["attachment"]
            assert "data" not in attachment and attachment["url"].startswith("Binary/")
            raw = httpx.get(
                f"{live.fhir}/{attachment['url']}", headers={**headers, "Accept": "*/*"}
            )
            assert raw.status_code == 200
            types.add(raw.headers["content-type"].split(";")[0])
            assert raw.content[:5] in (b"%PDF-", b"<?xml")
        assert types == {"application/pdf", "application/hl7-cda+xml"}
        _clinic_reads(live)


def _clinic_reads(live: Live) -> None:
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = _run(
            [
                "demo",
                "clinic",
                "--patient",
                "peter",
                "--base-url",
                live.origin,
                "--key-file",
                live.demo.clinic_key_file,
            ]
        )
    assert code == 0
    assert "Lakeside EHR" in out.getvalue()


def test_demo_pdf_is_well_formed() -> None:
    pdf = _pdf("Title (1)", ["a line", "back\\slash"])
    assert pdf.startswith(b"%PDF-1.4") and pdf.rstrip().endswith(b"%%EOF")
    xref = int(pdf.rsplit(b"startxref\n", 1)[1].split(b"\n")[0])
    assert pdf[xref:].startswith(b"xref")
    assert b"(Title \\(1\\)) Tj" in pdf


def test_redirect_uris_cover_both_loopback_names() -> None:
    assert redirect_uris_for("http://localhost:8000/") == [
        "http://localhost:8000/app/",
        "http://127.0.0.1:8000/app/",
    ]
    assert redirect_uris_for("https://records.example") == ["https://records.example/app/"]
