"""Spec §2B-2D: standalone and EHR launch (1.2.xx, 2.2.xx), OpenID Connect (1.3.xx) and
token refresh (1.4/1.5, G10), driven through the real authorization pages."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from fastapi.testclient import TestClient

from fhir_consent.app import create_core_app
from fhir_consent.config import Settings
from smart_on_fhir.scopes import parse_scopes
from smart_on_fhir.tokens import verify_id_token
from smart_on_fhir.users import User

from .kit import APP_ORIGIN, AUTH, FHIR, REDIRECT, World, pkce_pair


def _segments(token: str) -> list[dict[str, Any]]:
    out = []
    for part in token.split(".")[:2]:
        out.append(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))
    return out


def _check_token_body(body: dict[str, Any]) -> None:
    """1.2 ``smart_token_response_body_stu2_2`` / 1.4 ``smart_token_refresh_body``."""
    for name in ("access_token", "token_type", "expires_in", "scope"):
        assert name in body, name
    for name in ("access_token", "token_type", "scope", "refresh_token"):
        assert isinstance(body[name], str), name
    assert body["token_type"].lower() == "bearer"
    assert isinstance(body["expires_in"], int) and 0 < body["expires_in"] <= 3600


def _check_headers(headers: Any) -> None:
    """``smart_token_response_headers``."""
    assert "no-store" in headers["cache-control"]
    assert "no-cache" in headers["pragma"]


# -- standalone launch (1.2.xx) -----------------------------------------------------------


@pytest.mark.parametrize("post", [False, True], ids=["GET", "POST"])
def test_1_2_standalone_launch(world: World, peter: tuple[str, User], post: bool) -> None:
    """``smart_app_redirect_stu2`` (GET and authorize-post), ``smart_code_received``,
    ``smart_token_exchange_stu2_2``, body, headers and the public-client CORS check, then
    G10 ``g10_unauthorized_access``, ``g10_patient_context`` and ``g10_smart_scopes``."""
    pid, _ = peter
    client = world.add_client().client
    state = str(uuid.uuid4())
    flow = world.authorize(client.client_id, username="peter", post=post, state=state)
    assert flow.location.startswith(REDIRECT)
    params = flow.params
    assert "code" in params and "error" not in params  # smart_code_received
    assert params["state"] == state  # exact echo
    r = world.http.post(
        f"{AUTH}/token",
        data={
            "grant_type": "authorization_code",
            "code": flow.code,
            "redirect_uri": REDIRECT,
            "client_id": client.client_id,
            "code_verifier": flow.verifier,
        },
        headers={"origin": APP_ORIGIN},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    _check_token_body(body)
    _check_headers(r.headers)
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN  # smart_cors_token_exchange
    assert body["patient"] == pid
    assert body["need_patient_banner"] is True
    assert "fhirUser" not in body  # an id_token claim, not a token response field
    granted = parse_scopes(body["scope"])  # g10_smart_scopes: well-formed
    assert granted.allows("Patient", "read")
    assert world.get(f"Patient/{pid}", None).status_code == 401  # g10_unauthorized_access
    read = world.get(f"Patient/{pid}", body["access_token"])  # g10_patient_context
    assert read.status_code == 200
    assert read.json()["resourceType"] == "Patient"


def test_token_cors_only_for_registered_origins(world: World, peter: tuple[str, User]) -> None:
    client = world.add_client().client
    flow = world.authorize(client.client_id, username="peter")
    r = world.http.post(
        f"{AUTH}/token",
        data={
            "grant_type": "authorization_code",
            "code": flow.code,
            "redirect_uri": REDIRECT,
            "client_id": client.client_id,
            "code_verifier": flow.verifier,
        },
        headers={"origin": "https://evil.example"},
    )
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    pre = world.http.options(
        f"{AUTH}/token",
        headers={"origin": APP_ORIGIN, "access-control-request-method": "POST"},
    )
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == APP_ORIGIN


def test_confidential_symmetric_client_with_basic_auth(
    world: World, peter: tuple[str, User]
) -> None:
    """client-confidential-symmetric.md: HTTP Basic; PKCE optional for confidential
    clients (fhirclient 4.3 sends none)."""
    pid, _ = peter
    created = world.add_client("confidential-symmetric")
    cid, secret = created.client.client_id, created.client_secret
    assert secret
    params, _ = world.authorize_params(cid)
    del params["code_challenge"], params["code_challenge_method"]
    from .kit import drive_pages

    first = world.http.get(f"{AUTH}/authorize?{urlencode(params)}", follow_redirects=False)
    last = drive_pages(world.http, first, username="peter")
    code = parse_qs(urlsplit(last.headers["location"]).query)["code"][0]
    r = world.http.post(
        f"{AUTH}/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT},
        auth=(cid, secret),
    )
    assert r.status_code == 200, r.text
    assert r.json()["patient"] == pid


def test_smart_tls_plain_http_is_refused(smart_settings: Settings) -> None:
    """``smart_tls``: the authorize and token endpoints refuse plain http from a
    non-loopback host (TLS itself is the proxy's job)."""
    with TestClient(create_core_app(smart_settings), base_url="http://fhir.example") as http:
        r = http.post("/auth/token", data={"grant_type": "client_credentials"})
        assert r.status_code == 400
        assert r.json()["error"] == "insecure_transport"
        r = http.get("/auth/authorize?response_type=code", follow_redirects=False)
        assert r.status_code == 400
        assert "location" not in r.headers
    behind_proxy = smart_settings.model_copy(update={"public_base_url": "https://ehr.example/fhir"})
    with TestClient(create_core_app(behind_proxy), base_url="http://10.0.0.5") as http:
        r = http.post("/auth/token", data={"grant_type": "not_a_grant_type"})
        assert r.status_code == 400
        assert r.json()["error"] == "unsupported_grant_type"  # the public URL is https
        config = http.get("/fhir/.well-known/smart-configuration").json()
        assert config["token_endpoint"] == "https://ehr.example/auth/token"


# -- EHR launch (2.2.xx) --------------------------------------------------------------------


def test_2_2_ehr_launch(world: World) -> None:
    """``smart_app_launch``/``smart_launch_received`` (iss + launch), the launch context in
    the token, EHR-only checks (``smart_style_url`` resolves to JSON,
    ``need_patient_banner`` present) and G10 ``g10_patient_scope``."""
    pid = world.add_patient("Shaw", "Amy")
    doctor = world.add_resource({"resourceType": "Practitioner", "name": [{"family": "Who"}]})
    world.add_user("drwho", f"Practitioner/{doctor}")
    client = world.add_client(
        "public",
        scope="launch openid fhirUser patient/*.rs user/*.rs",
        launch_uri="https://app.example.org/launch",
    ).client
    context = world.add_launch(patient=pid, client_id=client.client_id, need_patient_banner=False)
    from smart_on_fhir.launches import launch_url

    url = launch_url(client.launch_uri or "", iss=FHIR, launch=context.id)
    query = parse_qs(urlsplit(url).query)
    assert query["iss"] == [FHIR] and query["launch"] == [context.id]
    flow = world.authorize(
        client.client_id,
        username="drwho",
        scope="launch openid fhirUser patient/Patient.rs patient/*.rs",
        launch=context.id,
    )
    r = world.exchange(client.client_id, flow)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["patient"] == pid
    assert body["need_patient_banner"] is False
    assert "patient/Patient.rs" in body["scope"].split()  # g10_patient_scope
    style = world.http.get(body["smart_style_url"])
    assert style.status_code == 200 and isinstance(style.json(), dict)
    assert world.get(f"Patient/{pid}", body["access_token"]).status_code == 200


def test_ehr_launch_rejects_unknown_launch_and_foreign_client(world: World) -> None:
    pid = world.add_patient()
    world.add_user("peter", f"Patient/{pid}")
    client = world.add_client().client
    other = world.add_client().client
    context = world.add_launch(patient=pid, client_id=other.client_id)
    for launch in ("no-such-launch", context.id):
        params, _ = world.authorize_params(
            client.client_id, scope="launch patient/*.rs", launch=launch
        )
        r = world.http.get(f"{AUTH}/authorize?{urlencode(params)}", follow_redirects=False)
        location = parse_qs(urlsplit(r.headers["location"]).query)
        assert location["error"] == ["invalid_request"] and "code" not in location
    params, _ = world.authorize_params(client.client_id, scope="launch patient/*.rs")
    r = world.http.get(f"{AUTH}/authorize?{urlencode(params)}", follow_redirects=False)
    assert parse_qs(urlsplit(r.headers["location"]).query)["error"] == ["invalid_request"]


def test_practitioner_picks_a_patient(world: World) -> None:
    """User-level ``launch/patient``: the patient picker lists patients and the choice
    becomes the token's ``patient``."""
    first = world.add_patient("Alpha", "Ann")
    second = world.add_patient("Beta", "Bob")
    doctor = world.add_resource({"resourceType": "Practitioner", "name": [{"family": "House"}]})
    world.add_user("house", f"Practitioner/{doctor}")
    client = world.add_client().client
    params, verifier = world.authorize_params(
        client.client_id, scope="openid fhirUser launch/patient patient/*.rs"
    )
    r = world.http.get(f"{AUTH}/authorize?{urlencode(params)}", follow_redirects=False)
    r = world.http.get(r.headers["location"])
    txn = r.url.params["txn"]
    r = world.http.post(
        f"{AUTH}/interact",
        data={
            "txn": txn,
            "step": "login",
            "username": "house",
            "password": "correct horse battery",
        },
        follow_redirects=True,
    )
    assert 'value="patient"' in r.text and first in r.text and second in r.text
    searched = world.http.get(f"{AUTH}/interact", params={"txn": txn, "q": "bob"})
    assert second in searched.text and first not in searched.text
    from .kit import drive_pages

    last = drive_pages(world.http, searched, username="house", patient=second)
    code = parse_qs(urlsplit(last.headers["location"]).query)["code"][0]
    body = world.http.post(
        f"{AUTH}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": client.client_id,
            "code_verifier": verifier,
        },
    ).json()
    assert body["patient"] == second
    _, claims = _segments(body["id_token"])
    assert claims["fhirUser"].endswith(f"Practitioner/{doctor}")


# -- OpenID Connect (1.3.xx) ----------------------------------------------------------------


def test_1_3_openid_connect(world: World, peter: tuple[str, User]) -> None:
    """1.3.xx: decode, configuration, required fields, JWKS, header, payload, fhirUser."""
    pid, user = peter
    client = world.add_client().client
    body = world.token(client.client_id, username="peter", nonce="n-0S6_WzA2Mj")
    id_token = body["id_token"]
    header, claims = _segments(id_token)  # smart_openid_decode_id_token
    config = world.http.get(f"{claims['iss']}/.well-known/openid-configuration")
    assert config.status_code == 200  # smart_openid_retrieve_configuration
    doc = config.json()
    for name in (
        "issuer",
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "response_types_supported",
        "subject_types_supported",
        "id_token_signing_alg_values_supported",
    ):
        assert name in doc, name  # smart_openid_required_configuration_fields
    assert "RS256" in doc["id_token_signing_alg_values_supported"]
    jwks = world.http.get(doc["jwks_uri"]).json()  # smart_openid_retrieve_jwks
    rsa = [k for k in jwks["keys"] if k["kty"] == "RSA"]
    assert rsa
    assert header["alg"] == "RS256"  # smart_openid_token_header
    assert header["kid"] in {k["kid"] for k in jwks["keys"]}
    verified = verify_id_token(  # smart_openid_token_payload (60 s leeway)
        id_token,
        keyset_or_jwks=jwks,
        issuer=doc["issuer"],
        client_id=client.client_id,
        now=time.time(),
        nonce="n-0S6_WzA2Mj",
    )
    for name in ("iss", "sub", "aud", "exp", "iat"):
        assert name in verified
    assert verified["aud"] == client.client_id
    assert 0 < len(verified["sub"]) < 256
    fhir_user = verified["fhirUser"]  # smart_openid_fhir_user_claim
    rtype, rid = fhir_user.split("/")[-2:]
    assert rtype in ("Patient", "Practitioner", "RelatedPerson", "Person")
    read = world.get(f"{rtype}/{rid}", body["access_token"], headers={"origin": APP_ORIGIN})
    assert read.status_code == 200
    assert read.headers["access-control-allow-origin"] == APP_ORIGIN
    assert rid == pid and verified["sub"] == user.id


# -- refresh (1.4 / 1.5, G10) ----------------------------------------------------------------


def test_1_4_refresh_without_scope(world: World, peter: tuple[str, User]) -> None:
    pid, _ = peter
    client = world.add_client().client
    body = world.token(client.client_id, username="peter")
    r = world.http.post(
        f"{AUTH}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "client_id": client.client_id,
        },
    )
    assert r.status_code == 200  # smart_token_refresh_stu2
    new = r.json()
    _check_token_body(new)  # smart_token_refresh_body
    _check_headers(r.headers)
    assert parse_scopes(new["scope"]).covered_by(parse_scopes(body["scope"]))
    assert new["refresh_token"] != body["refresh_token"]  # rotated
    assert world.get(f"Patient/{pid}", new["access_token"]).status_code == 200


def test_1_5_refresh_with_narrower_scope(world: World, peter: tuple[str, User]) -> None:
    pid, _ = peter
    client = world.add_client().client
    body = world.token(client.client_id, username="peter")
    r = world.http.post(
        f"{AUTH}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "client_id": client.client_id,
            "scope": "patient/Patient.rs offline_access",
        },
    )
    assert r.status_code == 200, r.text
    new = r.json()
    _check_token_body(new)
    assert new["scope"] == "patient/Patient.rs offline_access"
    assert world.get(f"Patient/{pid}", new["access_token"]).status_code == 200
    assert world.get("DocumentReference", new["access_token"]).status_code == 403
    wider = world.http.post(
        f"{AUTH}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": new["refresh_token"],
            "client_id": client.client_id,
            "scope": "patient/*.cruds",
        },
    )
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"


def test_g10_invalid_token_refresh(world: World, peter: tuple[str, User]) -> None:
    """G10 ``g10_invalid_token_refresh``: a random refresh token → 400 or 401."""
    client = world.add_client().client
    r = world.http.post(
        f"{AUTH}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": "INVALID_REFRESH_TOKEN",
            "client_id": client.client_id,
        },
    )
    assert r.status_code in (400, 401)
    assert r.json()["error"] == "invalid_grant"


def test_refresh_token_reuse_revokes_the_family(world: World, peter: tuple[str, User]) -> None:
    """RFC 9700 §4.14.2: a rotated refresh token used again revokes every token of the
    authorization, including the newest."""
    pid, _ = peter
    client = world.add_client().client
    body = world.token(client.client_id, username="peter")
    data = {"grant_type": "refresh_token", "client_id": client.client_id}
    first = world.http.post(f"{AUTH}/token", data={**data, "refresh_token": body["refresh_token"]})
    assert first.status_code == 200
    replay = world.http.post(f"{AUTH}/token", data={**data, "refresh_token": body["refresh_token"]})
    assert replay.status_code == 400
    newest = first.json()
    assert world.get(f"Patient/{pid}", newest["access_token"]).status_code == 401
    assert world.get(f"Patient/{pid}", body["access_token"]).status_code == 401
    again = world.http.post(
        f"{AUTH}/token", data={**data, "refresh_token": newest["refresh_token"]}
    )
    assert again.status_code == 400


def test_no_refresh_token_without_offline_or_online_access(
    world: World, peter: tuple[str, User]
) -> None:
    client = world.add_client().client
    body = world.token(client.client_id, username="peter", scope="launch/patient patient/*.rs")
    assert "refresh_token" not in body and "id_token" not in body
    online = world.token(
        client.client_id, username="peter", scope="launch/patient online_access patient/*.rs"
    )
    assert "refresh_token" not in online  # the client is not registered for online_access


def test_authorization_code_is_single_use(world: World, peter: tuple[str, User]) -> None:
    """RFC 6749 §4.1.2: a second use fails and revokes the tokens of the first."""
    pid, _ = peter
    client = world.add_client().client
    flow = world.authorize(client.client_id, username="peter")
    first = world.exchange(client.client_id, flow)
    assert first.status_code == 200
    second = world.exchange(client.client_id, flow)
    assert second.status_code == 400 and second.json()["error"] == "invalid_grant"
    assert world.get(f"Patient/{pid}", first.json()["access_token"]).status_code == 401


def test_pkce_required_for_public_clients(world: World, peter: tuple[str, User]) -> None:
    client = world.add_client().client
    for drop in (
        {"code_challenge": None, "code_challenge_method": None},
        {"code_challenge_method": "plain"},
    ):
        params, _ = world.authorize_params(client.client_id, **drop)
        r = world.http.get(f"{AUTH}/authorize?{urlencode(params)}", follow_redirects=False)
        query = parse_qs(urlsplit(r.headers["location"]).query)
        assert query["error"] == ["invalid_request"] and "code" not in query


def test_consent_denied(world: World, peter: tuple[str, User]) -> None:
    client = world.add_client().client
    flow = world.authorize(client.client_id, username="peter", deny=True)
    assert flow.params["error"] == "access_denied"
    assert flow.params["state"] == flow.state
    assert "code" not in flow.params


def test_bad_client_or_redirect_is_never_redirected(world: World) -> None:
    """app-launch.md: with an invalid ``redirect_uri`` or ``client_id``, do not redirect."""
    client = world.add_client().client
    for overrides in ({"client_id": "BAD_CLIENT_ID"}, {"redirect_uri": "https://evil.example/cb"}):
        params, _ = world.authorize_params(client.client_id)
        params.update(overrides)
        r = world.http.get(f"{AUTH}/authorize?{urlencode(params)}", follow_redirects=False)
        assert r.status_code == 400
        assert "location" not in r.headers
        assert r.headers["x-frame-options"] == "DENY"


def test_state_and_scope_are_required(world: World) -> None:
    client = world.add_client().client
    for overrides in ({"state": None}, {"scope": "nonsense/x.y"}):
        params, _ = world.authorize_params(client.client_id, **overrides)
        r = world.http.get(f"{AUTH}/authorize?{urlencode(params)}", follow_redirects=False)
        query = parse_qs(urlsplit(r.headers["location"]).query)
        assert query["error"][0] in ("invalid_request", "invalid_scope")
        assert "code" not in query


def test_pending_authorization_is_bound_to_the_browser(
    world: World, peter: tuple[str, User]
) -> None:
    """The login page of one browser cannot be completed from another (login CSRF)."""
    client = world.add_client().client
    params, _ = world.authorize_params(client.client_id)
    r = world.http.get(f"{AUTH}/authorize?{urlencode(params)}", follow_redirects=False)
    location = r.headers["location"]
    with TestClient(world.http.app, base_url="https://testserver") as other:
        page = other.get(location)
        assert page.status_code == 400
        txn = parse_qs(urlsplit(location).query)["txn"][0]
        posted = other.post(
            f"{AUTH}/interact",
            data={
                "txn": txn,
                "step": "login",
                "username": "peter",
                "password": "correct horse battery",
            },
        )
        assert posted.status_code == 400


def test_pkce_pair_helper() -> None:
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128 and len(challenge) == 43


def test_related_person_opens_the_related_patient(world: World) -> None:
    """A RelatedPerson login (a parent, a legal representative) gets the patient they relate
    to as the launch context, without a picker when there is only one."""
    child = world.add_patient("Chalmers", "Tim")
    parent = world.add_resource(
        {"resourceType": "RelatedPerson", "patient": {"reference": f"Patient/{child}"}}
    )
    world.add_user("mum", f"RelatedPerson/{parent}")
    client = world.add_client().client
    body = world.token(client.client_id, username="mum")
    assert body["patient"] == child
    _, claims = _segments(body["id_token"])
    assert claims["fhirUser"].endswith(f"RelatedPerson/{parent}")
    assert world.get(f"Patient/{child}", body["access_token"]).status_code == 200
