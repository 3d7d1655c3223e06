"""``fhir-consent demo``: a realistic data set, so a newcomer sees the patient app in a minute.

``fhir-consent demo`` (or ``demo seed``) writes, through the same services the FHIR API uses
(so documents are encrypted, and every Consent version gets its ledger entry):

* two clinics — Lakeside General Hospital and Northgate Family Practice (Organizations) — with
  a clinician each (Practitioner, PractitionerRole, and a login);
* two patients with logins; Peter Chalmers has a PDF discharge summary and a PDF lab report
  from Lakeside, a CDA summary from Northgate, an active grant to Northgate, and one pending
  inquiry: Lakeside asks to see his documents for 90 days, for treatment;
* the patient app's public client (PKCE; redirect URIs ``<base>/app/``) and a SMART backend
  services client for Lakeside's EHR, whose private key is written to ``--out``
  (default ``./keys/demo``);

then prints the logins. ``fhir-consent demo clinic --patient peter`` acts as Lakeside's EHR
(client credentials with that key) and reads the patient's documents, so the access (or the
refusal) shows up live in the patient's access log.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from fhir_consent.auth import AccessContext
from fhir_consent.config import Settings
from fhir_consent.fhir.routes import FHIRContext
from fhir_consent.web.config import DEFAULT_CLIENT_ID, WebSettings

__all__ = ["CLINIC_CLIENT_ID", "Demo", "add_parser", "clinic_token", "seed"]

#: The backend-services client of Lakeside General Hospital's EHR.
CLINIC_CLIENT_ID = "lakeside-ehr"
CLINIC_SCOPE = "system/*.rs"
LOINC = "http://loinc.org"
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def _say(text: str, *, error: bool = False) -> None:
    print(text, file=sys.stderr if error else sys.stdout)  # noqa: T201


# -- demo content -------------------------------------------------------------------------


def _pdf(title: str, lines: list[str]) -> bytes:
    """A small, valid one-page PDF with a title and some lines of text."""

    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    ops = ["BT", "/F1 18 Tf", "56 780 Td", f"({esc(title)}) Tj", "/F1 11 Tf"]
    for line in lines:
        ops += ["0 -20 Td", f"({esc(line)}) Tj"]
    stream = "\n".join([*ops, "ET"]).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def _cda(title: str, patient: str, text: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ClinicalDocument xmlns="urn:hl7-org:v3">\n'
        '  <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>\n'
        f'  <code code="34133-9" codeSystem="2.16.840.1.113883.6.1" displayName="{title}"/>\n'
        f"  <title>{title}</title>\n"
        f"  <recordTarget><patientRole><patient><name>{patient}</name></patient></patientRole>"
        "</recordTarget>\n"
        f"  <component><structuredBody><component><section><text>{text}</text></section>"
        "</component></structuredBody></component>\n"
        "</ClinicalDocument>\n"
    ).encode()


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d")


def _instant(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def inquiry(
    patient: str,
    organization: str,
    practitioner: str | None,
    *,
    days: int,
    now: datetime,
    codes: tuple[tuple[str, str], ...] = (),
    status: str = "proposed",
) -> dict[str, Any]:
    """A clinic's inquiry (consent.md §2): a proposed Consent asking for the patient's
    documents for ``days`` days, for treatment."""
    actors = [
        {
            "role": _concept(_PARTICIPATION, "PRCP", "primary information recipient"),
            "reference": {"reference": organization},
        }
    ]
    if practitioner:
        actors.append(
            {
                "role": _concept(_PARTICIPATION, "PRCP", "primary information recipient"),
                "reference": {"reference": practitioner},
            }
        )
    provision: dict[str, Any] = {
        "actor": actors,
        "action": [
            _concept("http://terminology.hl7.org/CodeSystem/consentaction", "access", "Access")
        ],
        "period": {"start": _day(now), "end": _day(now + timedelta(days=days))},
        "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "DocumentReference"}],
        "purpose": [{"system": _ACT_REASON, "code": "TREAT", "display": "Treatment"}],
    }
    if codes:
        provision["code"] = [_concept(LOINC, code, text) for code, text in codes]
    return {
        "resourceType": "Consent",
        "status": status,
        "scope": _concept(
            "http://terminology.hl7.org/CodeSystem/consentscope",
            "patient-privacy",
            "Privacy Consent",
        ),
        "category": [_concept(LOINC, "59284-0", "Patient Consent")],
        "patient": {"reference": patient},
        "dateTime": _instant(now),
        "organization": [{"reference": organization}],
        "policyRule": _concept(_ACT_CODE, "OPTOUT", "opt-out"),
        "provision": provision,
    }


@dataclass
class Login:
    """One demo login."""

    username: str
    password: str
    fhir_user: str
    role: str


@dataclass
class Demo:
    """What :func:`seed` created."""

    logins: list[Login] = field(default_factory=list)
    patient: str = "peter"
    inquiry: str = ""
    grant: str = ""
    documents: dict[str, str] = field(default_factory=dict)  # name -> DocumentReference id
    app_client_id: str = DEFAULT_CLIENT_ID
    clinic_client_id: str = CLINIC_CLIENT_ID
    clinic_key_file: str = ""
    redirect_uris: list[str] = field(default_factory=list)


@contextmanager
def _acting_as(reference: str) -> Iterator[None]:
    """Writes made as ``reference`` (seen by the ledger and the consent workflow)."""
    from fhir_consent.ledger.service import current_actor
    from fhir_consent.requestctx import current_access

    kind = reference.split("/")[0]
    access = AccessContext(
        scopes=None,
        fhir_user=reference if kind != "Organization" else None,
        patient=reference.split("/")[1] if kind == "Patient" else None,
        client_organization=reference if kind == "Organization" else None,
        subject="fhir-consent-demo",
    )
    a = current_actor.set(reference)
    b = current_access.set(access)
    try:
        yield
    finally:
        current_access.reset(b)
        current_actor.reset(a)


def redirect_uris_for(base_url: str) -> list[str]:
    """The app's redirect URIs for a server reached at ``base_url`` (plus the loopback
    spellings of the same port, so both localhost and 127.0.0.1 work)."""
    base = base_url.rstrip("/")
    uris = [f"{base}/app/"]
    host = base.split("://", 1)[-1].split("/", 1)[0]
    if host.split(":")[0] in ("localhost", "127.0.0.1"):
        port = f":{host.split(':')[1]}" if ":" in host else ""
        for name in ("localhost", "127.0.0.1"):
            uri = f"{base.split('://')[0]}://{name}{port}/app/"
            if uri not in uris:
                uris.append(uri)
    return uris


def seed(
    app: FastAPI,
    *,
    base_url: str = "http://localhost:8000",
    password: str | None = None,
    out_dir: Path = Path("./keys/demo"),
    now: datetime | None = None,
) -> Demo:
    """Write the demo data set into ``app``'s database (see the module docstring)."""
    from smart_on_fhir.clients import create_client
    from smart_on_fhir.keys import generate_signing_key
    from smart_on_fhir.users import create_user

    ctx: FHIRContext = app.state.fhir
    moment = now or datetime.now(UTC).replace(microsecond=0)
    demo = Demo(redirect_uris=redirect_uris_for(base_url))

    def put(resource: dict[str, Any], actor: str = "Organization/lakeside") -> str:
        with _acting_as(actor), ctx.db.write() as conn:
            service = ctx.service(conn)
            if "id" in resource:
                row = service.update(resource["resourceType"], resource["id"], resource).row
            else:
                row = service.create(resource["resourceType"], resource).row
            return row.res_id

    put(
        {
            "resourceType": "Organization",
            "id": "lakeside",
            "active": True,
            "name": "Lakeside General Hospital",
        }
    )
    put(
        {
            "resourceType": "Organization",
            "id": "northgate",
            "active": True,
            "name": "Northgate Family Practice",
        },
        "Organization/northgate",
    )
    for pid, given, family, prefix, org in (
        ("dr-weber", "Anna", "Weber", "Dr.", "lakeside"),
        ("dr-berg", "Jonas", "Berg", "Dr.", "northgate"),
    ):
        put(
            {
                "resourceType": "Practitioner",
                "id": pid,
                "active": True,
                "name": [{"prefix": [prefix], "given": [given], "family": family}],
            }
        )
        put(
            {
                "resourceType": "PractitionerRole",
                "id": f"{pid}-at-{org}",
                "active": True,
                "practitioner": {
                    "reference": f"Practitioner/{pid}",
                    "display": f"{prefix} {given} {family}",
                },
                "organization": {"reference": f"Organization/{org}"},
            }
        )
    put(
        {
            "resourceType": "Patient",
            "id": "peter",
            "active": True,
            "gender": "male",
            "birthDate": "1974-12-25",
            "name": [{"given": ["Peter", "James"], "family": "Chalmers"}],
        }
    )
    put(
        {
            "resourceType": "Patient",
            "id": "maria",
            "active": True,
            "gender": "female",
            "birthDate": "1988-04-02",
            "name": [{"given": ["Maria"], "family": "Lopez"}],
        }
    )

    def document(
        pid: str,
        org: str,
        author: str,
        code: str,
        text: str,
        ctype: str,
        data: bytes,
        title: str,
        days_ago: int,
    ) -> str:
        when = moment - timedelta(days=days_ago)
        return put(
            {
                "resourceType": "DocumentReference",
                "status": "current",
                "type": _concept(LOINC, code, text),
                "subject": {"reference": f"Patient/{pid}"},
                "date": _instant(when),
                "author": [{"reference": f"Practitioner/{author}"}],
                "custodian": {"reference": f"Organization/{org}"},
                "description": title,
                "content": [
                    {
                        "attachment": {
                            "contentType": ctype,
                            "title": title,
                            "data": base64.b64encode(data).decode("ascii"),
                            "creation": _instant(when),
                        }
                    }
                ],
                "context": {"period": {"start": _day(when)}},
            },
            f"Organization/{org}",
        )

    demo.documents["discharge"] = document(
        "peter",
        "lakeside",
        "dr-weber",
        "18842-5",
        "Discharge summary",
        "application/pdf",
        _pdf(
            "Discharge summary",
            [
                "Patient: Peter Chalmers",
                "Admitted for pneumonia;",
                "discharged in good condition after 4 days.",
            ],
        ),
        "Discharge summary, Lakeside",
        40,
    )
    demo.documents["lab"] = document(
        "peter",
        "lakeside",
        "dr-weber",
        "11502-2",
        "Laboratory report",
        "application/pdf",
        _pdf(
            "Laboratory report",
            ["Patient: Peter Chalmers", "CRP 4 mg/L (normal)", "Leukocytes 6.1 G/L (normal)"],
        ),
        "Blood test results",
        38,
    )
    demo.documents["summary"] = document(
        "peter",
        "northgate",
        "dr-berg",
        "34133-9",
        "Summary of episode note",
        "application/hl7-cda+xml",
        _cda(
            "Summary of episode note",
            "Peter Chalmers",
            "Yearly check-up: blood pressure 128/82, no changes to medication.",
        ),
        "Check-up summary, Northgate",
        12,
    )
    document(
        "maria",
        "northgate",
        "dr-berg",
        "34133-9",
        "Summary of episode note",
        "application/hl7-cda+xml",
        _cda("Summary of episode note", "Maria Lopez", "Vaccination booster given."),
        "Vaccination visit",
        5,
    )

    # Northgate asked a month ago and Peter said yes; Lakeside's inquiry is still open.
    grant = inquiry(
        "Patient/peter",
        "Organization/northgate",
        "Practitioner/dr-berg",
        days=365,
        now=moment - timedelta(days=30),
    )
    demo.grant = put(grant, "Organization/northgate")
    with _acting_as("Patient/peter"), ctx.db.write() as conn:
        service = ctx.service(conn)
        current = json.loads(service.read("Consent", demo.grant).content or b"{}")
        service.update("Consent", demo.grant, {**current, "status": "active"})
    demo.inquiry = put(
        inquiry(
            "Patient/peter",
            "Organization/lakeside",
            "Practitioner/dr-weber",
            days=90,
            now=moment,
            codes=(("34133-9", "Summary of episode note"), ("11502-2", "Laboratory report")),
        ),
        "Organization/lakeside",
    )

    def password_for() -> str:
        return password or secrets.token_urlsafe(9)

    stamp = int(time.time())
    key = generate_signing_key("ES384")
    with ctx.db.write() as conn:
        for username, fhir_user, role in (
            ("peter", "Patient/peter", "patient Peter Chalmers"),
            ("maria", "Patient/maria", "patient Maria Lopez"),
            ("dr.weber", "Practitioner/dr-weber", "clinician at Lakeside General Hospital"),
            ("dr.berg", "Practitioner/dr-berg", "clinician at Northgate Family Practice"),
        ):
            secret = password_for()
            create_user(conn, username, secret, fhir_user=fhir_user, now=stamp)
            demo.logins.append(Login(username, secret, fhir_user, role))
        create_client(
            conn,
            client_name="My health records (patient app)",
            client_type="public",
            redirect_uris=demo.redirect_uris,
            scope=WebSettings().scope,
            now=stamp,
            client_id=DEFAULT_CLIENT_ID,
        )
        public_jwk = dict(key.as_dict(private=False))
        create_client(
            conn,
            client_name="Lakeside General Hospital EHR",
            client_type="confidential-asymmetric",
            scope=CLINIC_SCOPE,
            now=stamp,
            jwks={"keys": [public_jwk]},
            organization="Organization/lakeside",
            client_id=CLINIC_CLIENT_ID,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    key_file = out_dir / f"{CLINIC_CLIENT_ID}.jwk.json"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(dict(key.as_dict(private=True)), fh)
    demo.clinic_key_file = str(key_file)
    return demo


# -- acting as the clinic ------------------------------------------------------------------


def clinic_token(
    base_url: str,
    key_file: str | Path,
    *,
    client_id: str = CLINIC_CLIENT_ID,
    scope: str = CLINIC_SCOPE,
) -> str:
    """A SMART backend-services access token for the clinic (client credentials with a
    ``private_key_jwt`` assertion signed by the key in ``key_file``)."""
    import httpx
    from joserfc.jwk import ECKey

    from smart_on_fhir.client_auth import ASSERTION_TYPE, sign_client_assertion

    fhir = base_url.rstrip("/") + "/fhir"
    config = httpx.get(f"{fhir}/.well-known/smart-configuration", timeout=10).json()
    token_url = config["token_endpoint"]
    key = ECKey.import_key(json.loads(Path(key_file).read_text()))
    assertion = sign_client_assertion(key, client_id=client_id, token_url=token_url)
    r = httpx.post(
        token_url,
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
        timeout=10,
    )
    r.raise_for_status()
    token: str = r.json()["access_token"]
    return token


def _clinic(args: argparse.Namespace) -> int:
    import httpx

    base = args.base_url.rstrip("/")
    try:
        token = clinic_token(base, args.key_file)
    except (httpx.HTTPError, OSError, KeyError, ValueError) as exc:
        _say(f"fhir-consent demo clinic: no token: {type(exc).__name__}", error=True)
        return 1
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    r = httpx.get(
        f"{base}/fhir/DocumentReference",
        params={"patient": args.patient},
        headers=headers,
        timeout=10,
    )
    if r.status_code != 200:
        _say(f"Lakeside EHR was refused: HTTP {r.status_code}")
        return 0
    titles = [
        (e["resource"].get("description") or e["resource"].get("id"))
        for e in r.json().get("entry", [])
    ]
    _say(
        f"Lakeside EHR sees {len(titles)} of Patient/{args.patient}'s documents"
        + (": " + "; ".join(titles) if titles else "")
    )
    return 0


# -- the command ---------------------------------------------------------------------------


def _print_demo(demo: Demo, base_url: str, database_url: str) -> None:
    width = max(len(login.username) for login in demo.logins)
    lines = [
        f"Demo data written to {database_url}.",
        "",
        "Start the server:   fhir-consent serve",
        f"Patient app:        {base_url.rstrip('/')}/app/",
        "",
        "Logins (username, password):",
        *(
            f"  {login.username.ljust(width)}  {login.password}   {login.role} ({login.fhir_user})"
            for login in demo.logins
        ),
        "",
        "Peter has one pending inquiry (Lakeside asks for his documents), an active grant to "
        "Northgate, and 3 documents.",
        "",
        "Clients:",
        f"  {demo.app_client_id}   the patient app: public client, PKCE S256",
        f"  {demo.clinic_client_id}   Lakeside's EHR: backend services, Organization/lakeside,"
        f" key in {demo.clinic_key_file}",
        "",
        "Act as Lakeside's EHR (the access appears live in Peter's access log):",
        f"  fhir-consent demo clinic --patient peter --base-url {base_url.rstrip('/')}",
    ]
    _say("\n".join(lines))


def _seed(args: argparse.Namespace) -> int:
    from fhir_consent.app import create_app
    from fhir_consent.store.migrate import upgrade

    if args.password is not None and len(args.password) < 8:
        _say("fhir-consent demo: passwords need at least 8 characters", error=True)
        return 2
    settings = Settings(database_url=args.database_url) if args.database_url else Settings()
    upgrade(settings.database_url)
    app = create_app(settings.model_copy(update={"auto_migrate": False}))
    ctx: FHIRContext = app.state.fhir
    try:
        from fhir_consent.store.repository import Repository

        with ctx.db.read() as conn:
            if Repository(conn).current("Patient", "peter") is not None:
                _say(
                    "fhir-consent demo: this database already holds the demo data; "
                    "use a fresh one (--database-url)",
                    error=True,
                )
                return 2
        demo = seed(app, base_url=args.base_url, password=args.password, out_dir=Path(args.out))
    finally:
        ctx.db.dispose()
    if args.json:
        _say(
            json.dumps(
                {
                    "logins": [login.__dict__ for login in demo.logins],
                    "patient": demo.patient,
                    "inquiry": demo.inquiry,
                    "grant": demo.grant,
                    "documents": demo.documents,
                    "app_client_id": demo.app_client_id,
                    "clinic_client_id": demo.clinic_client_id,
                    "clinic_key_file": demo.clinic_key_file,
                    "redirect_uris": demo.redirect_uris,
                },
                indent=2,
            )
        )
    else:
        _print_demo(demo, args.base_url, settings.database_url)
    return 0


def _run(args: argparse.Namespace) -> int:
    return _clinic(args) if args.action == "clinic" else _seed(args)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``demo`` to the ``fhir-consent`` command's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="seed a demo data set and print the logins (or: demo clinic, act as a clinic)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("action", nargs="?", choices=["seed", "clinic"], default="seed")
    parser.add_argument("--database-url", help="overrides FHIR_CONSENT_DATABASE_URL")
    parser.add_argument(
        "--base-url",
        default="http://localhost:8000",
        help="where the server is reached (the app's redirect URIs; demo clinic calls it)",
    )
    parser.add_argument("--password", help="one password for every login (default: random)")
    parser.add_argument("--out", default="./keys/demo", help="where the clinic's private key goes")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--patient", default="peter", help="demo clinic: whose documents")
    parser.add_argument(
        "--key-file",
        default=f"./keys/demo/{CLINIC_CLIENT_ID}.jwk.json",
        help="demo clinic: the key",
    )
    parser.set_defaults(func=_run)
    return parser
