"""Issue 3 acceptance: real clients, end to end, against a real uvicorn server with SMART on.

* ``fhirclient`` completes a standalone launch: it discovers the endpoints from
  ``/metadata``, builds the authorize URL (PKCE S256), the real login and consent pages are
  driven over HTTP with httpx like a browser, ``handle_callback`` exchanges the code, and
  the app reads the patient's Patient and DocumentReferences, then refreshes.
* ``fhirpy`` uses a token from that flow.
* A backend-services client generates its own keys (RS384 and ES384), signs its own
  assertion and searches as a clinic system (plain httpx, and ``fhirclient``'s
  ``jwt_token`` mode).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from smart_on_fhir.client_auth import ASSERTION_TYPE, sign_client_assertion
from smart_on_fhir.keys import generate_signing_key

from .kit import FHIR_JSON, REDIRECT, World, drive_pages

SCOPE = "launch/patient openid fhirUser offline_access patient/*.read"


def _seed(world: World) -> tuple[str, list[str]]:
    pid = world.add_patient("Chalmers", "Peter")
    other = world.add_patient("Someone", "Else")
    docs = []
    for subject, title in ((pid, "Discharge summary"), (pid, "Lab report"), (other, "Other")):
        doc = world.add_resource(
            {
                "resourceType": "DocumentReference",
                "status": "current",
                "description": title,
                "subject": {"reference": f"Patient/{subject}"},
                "content": [{"attachment": {"contentType": "text/plain", "data": "aGVsbG8="}}],
            }
        )
        if subject == pid:
            docs.append(doc)
    world.add_user("peter", f"Patient/{pid}")
    return pid, docs


def test_fhirclient_standalone_launch_then_fhirpy(world: World, smart_server: str) -> None:
    from fhirclient import client as fhirclient_client
    from fhirclient.models.documentreference import DocumentReference
    from fhirpy import SyncFHIRClient

    pid, docs = _seed(world)
    app = world.add_client(
        "public", scope=SCOPE + " patient/*.rs", client_name="fhirclient app"
    ).client
    base = f"{smart_server}/fhir"
    smart = fhirclient_client.FHIRClient(
        settings={
            "app_id": app.client_id,
            "api_base": base,
            "redirect_uri": REDIRECT,
            "scope": "openid fhirUser offline_access patient/*.read",
        }
    )
    authorize_url = smart.authorize_url  # GET /metadata → oauth-uris → authorize URL
    assert authorize_url.startswith(f"{smart_server}/auth/authorize?")
    assert "code_challenge_method=S256" in authorize_url
    with httpx.Client() as browser:
        first = browser.get(authorize_url, follow_redirects=False)
        callback = drive_pages(browser, first, username="peter")
    location = callback.headers["location"]
    assert location.startswith(REDIRECT)
    smart.handle_callback(location)  # POST /auth/token (public client, PKCE)
    assert smart.ready and smart.patient_id == pid
    patient = smart.patient
    assert patient is not None and patient.id == pid
    assert patient.name[0].family == "Chalmers"
    found = DocumentReference.where(struct={"patient": pid}).perform_resources(smart.server)
    assert sorted(d.id for d in found) == sorted(docs)
    everything = DocumentReference.where(struct={}).perform_resources(smart.server)
    assert sorted(d.id for d in everything) == sorted(docs)  # the compartment, nothing else

    token = smart.server.auth.access_token
    fhirpy = SyncFHIRClient(base, authorization=f"Bearer {token}")
    fetched = fhirpy.resources("DocumentReference").search(patient=pid).fetch()
    assert sorted(r["id"] for r in fetched) == sorted(docs)
    assert fhirpy.reference("Patient", pid).to_resource()["id"] == pid

    assert smart.reauthorize()  # refresh_token grant, rotated
    assert smart.server.auth.access_token != token
    assert smart.patient_id == pid

    with httpx.Client() as http:  # the earlier access token lives on; no token is 401
        r = http.get(f"{base}/Patient/{pid}", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200
        r = http.get(f"{base}/Patient/{pid}")
        assert r.status_code == 401


def _grant(world: World, patient: str, organization: str) -> None:
    """The patient's active Consent letting ``organization`` see their records (consent.md
    §2): without it the server's consent layer hides them from the clinic's system."""
    world.add_resource(
        {
            "resourceType": "Consent",
            "status": "active",
            "scope": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                        "code": "patient-privacy",
                    }
                ]
            },
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{patient}"},
            "policyRule": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}
                ]
            },
            "provision": {
                "actor": [
                    {
                        "role": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                    "code": "PRCP",
                                }
                            ]
                        },
                        "reference": {"reference": organization},
                    }
                ],
                "action": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                "code": "access",
                            }
                        ]
                    }
                ],
            },
        }
    )


def _backend_client(world: World) -> tuple[str, dict[str, Any]]:
    rs = generate_signing_key("RS384")
    es = generate_signing_key("ES384")
    jwks = {"keys": [dict(k.as_dict(private=False)) for k in (rs, es)]}
    created = world.add_client(
        "confidential-asymmetric",
        scope="system/Patient.rs system/DocumentReference.rs",
        redirect_uris=(),
        jwks=jwks,
        organization="Organization/clinic",
        client_name="Clinic EHR",
    )
    return created.client.client_id, {"RS384": rs, "ES384": es}


def test_backend_services_clinic_system(world: World, smart_server: str) -> None:
    """The clinic's system discovers the token URL, signs its own RS384 and ES384
    assertions with keys it generated, and searches."""
    from fhirclient import client as fhirclient_client
    from fhirclient.models.patient import Patient

    pid, docs = _seed(world)
    _grant(world, pid, "Organization/clinic")
    cid, keys = _backend_client(world)
    base = f"{smart_server}/fhir"
    with httpx.Client() as http:
        config = http.get(f"{base}/.well-known/smart-configuration").json()
        token_url = config["token_endpoint"]
        assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
        for alg, key in keys.items():
            assertion = sign_client_assertion(key, client_id=cid, token_url=token_url)
            r = http.post(
                token_url,
                data={
                    "grant_type": "client_credentials",
                    "scope": "system/Patient.rs system/DocumentReference.rs",
                    "client_assertion_type": ASSERTION_TYPE,
                    "client_assertion": assertion,
                },
            )
            assert r.status_code == 200, (alg, r.text)
            body = r.json()
            assert body["expires_in"] <= 300
            headers = {"authorization": f"Bearer {body['access_token']}", **FHIR_JSON}
            bundle = http.get(f"{base}/DocumentReference", params={"patient": pid}, headers=headers)
            assert bundle.status_code == 200
            assert sorted(e["resource"]["id"] for e in bundle.json()["entry"]) == sorted(docs)

    smart = fhirclient_client.FHIRClient(
        settings={
            "app_id": cid,
            "api_base": base,
            "scope": "system/Patient.rs",
            "jwt_token": sign_client_assertion(keys["ES384"], client_id=cid, token_url=token_url),
        }
    )
    smart.wants_patient = False
    smart.prepare()
    smart.authorize()  # client_credentials with the signed assertion
    assert smart.ready
    patients = Patient.where(struct={"family": "chalmers"}).perform_resources(smart.server)
    assert [p.id for p in patients] == [pid]


def test_live_server_revocation_reaches_other_requests(world: World, smart_server: str) -> None:
    """Revocation in one request is seen by the next FHIR request (token check per call)."""
    pid, _ = _seed(world)
    app = world.add_client("public", scope=SCOPE).client
    base = f"{smart_server}/fhir"
    with httpx.Client() as browser:
        params, verifier = world.authorize_params(app.client_id, scope=SCOPE)
        params["aud"] = base
        first = browser.get(
            f"{smart_server}/auth/authorize?{urlencode(params)}", follow_redirects=False
        )
        code = parse_qs(
            urlsplit(drive_pages(browser, first, username="peter").headers["location"]).query
        )["code"][0]
        token = browser.post(
            f"{smart_server}/auth/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT,
                "client_id": app.client_id,
                "code_verifier": verifier,
            },
        ).json()
        headers = {"authorization": f"Bearer {token['access_token']}"}
        assert browser.get(f"{base}/Patient/{pid}", headers=headers).status_code == 200
        revoked = browser.post(
            f"{smart_server}/auth/revoke",
            data={"token": token["refresh_token"], "client_id": app.client_id},
        )
        assert revoked.status_code == 200
        started = time.monotonic()
        assert browser.get(f"{base}/Patient/{pid}", headers=headers).status_code == 401
        assert time.monotonic() - started < 5
