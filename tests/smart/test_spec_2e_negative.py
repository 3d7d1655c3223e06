"""Spec §2E: the G10 group 9 negative tests and the limited-scope tests (G10 2.x), with the
statuses the spec names; plus user deactivation and client disabling."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from fastapi.testclient import TestClient

from smart_on_fhir.scopes import parse_scopes
from smart_on_fhir.users import User, set_user_active

from .kit import AUTH, REDIRECT, World


def test_9_4_invalid_aud_gets_no_code(world: World, peter: tuple[str, User]) -> None:
    """9.4: an ``aud`` that is not this FHIR base gets an error redirect, never a code."""
    client = world.add_client().client
    for aud in ("https://evil.example/fhir", "https://testserver/other", None):
        params, _ = world.authorize_params(client.client_id, aud=aud)
        r = world.http.get(f"{AUTH}/authorize?{urlencode(params)}", follow_redirects=False)
        assert r.status_code in (302, 303)
        query = parse_qs(urlsplit(r.headers["location"]).query)
        assert "code" not in query
        assert query["error"] == ["invalid_request"]
        assert query["state"] == [params["state"]]


def test_aud_trailing_slash_and_resource_synonym(world: World, peter: tuple[str, User]) -> None:
    """fhirclient sends its configured base as-is: a trailing slash is the same base; SMART
    servers MAY accept ``resource`` as a synonym of ``aud``."""
    client = world.add_client().client
    flow = world.authorize(client.client_id, username="peter", aud="https://testserver/fhir/")
    assert "code" in flow.params
    flow = world.authorize(
        client.client_id, username="peter", aud=None, resource="https://testserver/fhir"
    )
    assert "code" in flow.params


def test_9_5_bad_code(world: World, peter: tuple[str, User]) -> None:
    """9.5/9.6/9.17 Test03: ``code=BAD_CODE`` → 400."""
    client = world.add_client().client
    flow = world.authorize(client.client_id, username="peter")
    r = world.exchange(client.client_id, flow, code="BAD_CODE")
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"


def test_9_5_bad_client_id(world: World, peter: tuple[str, User]) -> None:
    """Test04: ``client_id=BAD_CLIENT_ID`` → 400 or 401 ``invalid_client``."""
    client = world.add_client().client
    flow = world.authorize(client.client_id, username="peter")
    r = world.exchange(client.client_id, flow, client_id="BAD_CLIENT_ID")
    assert r.status_code in (400, 401)
    assert r.json()["error"] == "invalid_client"


def test_9_5_bad_basic_credentials(world: World, peter: tuple[str, User]) -> None:
    """Test04 for a confidential client: wrong Basic credentials → 401 with a challenge."""
    created = world.add_client("confidential-symmetric")
    cid = created.client.client_id
    flow = world.authorize(cid, username="peter")
    r = world.exchange(cid, flow, secret="wrong-secret", client_id=None)
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_client"
    assert r.headers["www-authenticate"].lower().startswith("basic")
    ok = world.exchange(cid, flow, secret=created.client_secret, client_id=None)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("case", ["missing", "blank", "wrong", "plain"])
@pytest.mark.parametrize("client_type", ["public", "confidential-symmetric"])
def test_9_7_pkce_verifier(
    world: World, peter: tuple[str, User], case: str, client_type: str
) -> None:
    """9.7/9.18: a missing, blank, wrong, or ``code_challenge``-equal verifier → 400/401,
    each with a fresh authorization code."""
    created = world.add_client(client_type)
    cid = created.client.client_id
    params, verifier = world.authorize_params(cid)
    from .kit import drive_pages

    first = world.http.get(f"{AUTH}/authorize?{urlencode(params)}", follow_redirects=False)
    last = drive_pages(world.http, first, username="peter")
    code = parse_qs(urlsplit(last.headers["location"]).query)["code"][0]
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    if case == "blank":
        data["code_verifier"] = ""
    elif case == "wrong":
        data["code_verifier"] = verifier[:-4] + "AAAA"
    elif case == "plain":
        data["code_verifier"] = params["code_challenge"]
    if client_type == "public":
        data["client_id"] = cid
        r = world.http.post(f"{AUTH}/token", data=data)
    else:
        r = world.http.post(f"{AUTH}/token", data=data, auth=(cid, created.client_secret or ""))
    assert r.status_code in (400, 401)
    assert r.json()["error"] in ("invalid_request", "invalid_grant")
    data["code_verifier"] = verifier  # the code itself is still good for the right verifier
    if client_type == "public":
        ok = world.http.post(f"{AUTH}/token", data=data)
    else:
        ok = world.http.post(f"{AUTH}/token", data=data, auth=(cid, created.client_secret or ""))
    assert ok.status_code == 200


@pytest.mark.parametrize("which", ["access_token", "refresh_token"])
def test_9_3_revocation(world: World, peter: tuple[str, User], which: str) -> None:
    """9.3: after revocation the Patient read → 401 and the refresh → 400/401, at once."""
    pid, _ = peter
    client = world.add_client().client
    body = world.token(client.client_id, username="peter")
    assert world.get(f"Patient/{pid}", body["access_token"]).status_code == 200
    r = world.http.post(
        f"{AUTH}/revoke",
        data={"token": body[which], "token_type_hint": which, "client_id": client.client_id},
    )
    assert r.status_code == 200
    assert world.get(f"Patient/{pid}", body["access_token"]).status_code in (401, 403, 404)
    refresh = world.http.post(
        f"{AUTH}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "client_id": client.client_id,
        },
    )
    assert refresh.status_code in (400, 401)


def test_revoking_an_unknown_token_is_fine(world: World) -> None:
    """RFC 7009 §2.2: invalid tokens do not cause an error."""
    client = world.add_client().client
    r = world.http.post(f"{AUTH}/revoke", data={"token": "nope", "client_id": client.client_id})
    assert r.status_code == 200


def test_deactivated_user_and_disabled_client_get_401(
    world: World, peter: tuple[str, User]
) -> None:
    """Deactivation takes effect on the next FHIR call (the per-request token check)."""
    pid, _ = peter
    client = world.add_client().client
    body = world.token(client.client_id, username="peter")
    with world.db.write() as conn:
        set_user_active(conn, "peter", False)
    r = world.get(f"Patient/{pid}", body["access_token"])
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    with world.db.write() as conn:
        set_user_active(conn, "peter", True)
    assert world.get(f"Patient/{pid}", body["access_token"]).status_code == 200
    from smart_on_fhir.clients import set_client_active

    with world.db.write() as conn:
        set_client_active(conn, client.client_id, False)
    assert world.get(f"Patient/{pid}", body["access_token"]).status_code == 401


def test_g10_limited_scope_grant(world: World, peter: tuple[str, User]) -> None:
    """G10 ``g10_limited_scope_grant`` and ``g10_restricted_access_test``: the user unticks
    scopes; the grant is exactly the selection; a denied type → 403, an allowed one → 200."""
    pid, _ = peter
    world.add_resource(
        {
            "resourceType": "DocumentReference",
            "status": "current",
            "subject": {"reference": f"Patient/{pid}"},
            "content": [{"attachment": {"contentType": "text/plain", "data": "aGk="}}],
        }
    )
    client = world.add_client(
        scope="openid fhirUser launch/patient offline_access patient/Patient.rs "
        "patient/DocumentReference.rs patient/Encounter.rs"
    ).client
    requested = (
        "launch/patient openid fhirUser patient/Patient.rs patient/DocumentReference.rs "
        "patient/Encounter.rs"
    )
    untick = ["patient/DocumentReference.rs", "openid", "fhirUser"]
    flow = world.authorize(client.client_id, username="peter", scope=requested, untick=untick)
    r = world.exchange(client.client_id, flow)
    assert r.status_code == 200, r.text
    body = r.json()
    selected = [s for s in requested.split() if s not in untick]
    assert parse_scopes(body["scope"]) == parse_scopes(" ".join(selected))
    assert "id_token" not in body
    token = body["access_token"]
    denied = world.get(f"DocumentReference?patient={pid}", token)
    assert denied.status_code in (401, 403)
    assert denied.json()["resourceType"] == "OperationOutcome"
    allowed = world.get(f"Encounter?patient={pid}", token)
    assert allowed.status_code == 200
    assert world.get(f"Patient/{pid}", token).status_code == 200


def test_untick_everything_is_a_denial(world: World, peter: tuple[str, User]) -> None:
    client = world.add_client().client
    params, _ = world.authorize_params(client.client_id)
    flow = world.authorize(client.client_id, username="peter", untick=params["scope"].split())
    assert flow.params["error"] == "access_denied"


def test_patient_scope_without_patient_context_is_refused(world: World) -> None:
    """SAL app-launch: patient/ scopes need a patient in context; a user with no patient
    to choose gets ``access_denied`` rather than an unbounded token."""
    practitioner = world.add_resource({"resourceType": "Practitioner"})
    world.add_user("nurse", f"Practitioner/{practitioner}")
    client = world.add_client().client
    flow = world.authorize(client.client_id, username="nurse", scope="patient/*.rs")
    assert flow.params["error"] == "access_denied"


def test_login_failures_are_rate_limited(world: World, peter: tuple[str, User]) -> None:
    """Five wrong passwords from one IP lock that username for the window, even for the
    right password; the page never says which part was wrong."""
    client = world.add_client().client
    params, _ = world.authorize_params(client.client_id)
    r = world.http.get(f"{AUTH}/authorize?{urlencode(params)}", follow_redirects=True)
    txn = r.url.params["txn"]
    statuses = []
    for password in ["wrong"] * 5 + ["correct horse battery"]:
        r = world.http.post(
            f"{AUTH}/interact",
            data={"txn": txn, "step": "login", "username": "peter", "password": password},
            follow_redirects=False,
        )
        statuses.append(r.status_code)
    assert statuses == [401] * 5 + [429]
    assert (
        "Unknown username or wrong password"
        in world.http.post(
            f"{AUTH}/interact",
            data={"txn": txn, "step": "login", "username": "nobody", "password": "whatever!"},
        ).text
    )


def test_management_page_revokes_an_app(world: World, peter: tuple[str, User]) -> None:
    """SMART ``management_endpoint``: the patient sees the connected app and revokes it; the
    app's token gets 401 at its next call."""
    pid, _ = peter
    client = world.add_client(client_name="Sleep tracker").client
    body = world.token(client.client_id, username="peter")
    config = world.http.get("/fhir/.well-known/smart-configuration").json()
    manage = config["management_endpoint"]
    assert "Sign in" in world.http.get(manage).text
    wrong = world.http.post(manage, data={"step": "login", "username": "peter", "password": "no"})
    assert wrong.status_code == 401
    page = world.http.post(
        manage,
        data={"step": "login", "username": "peter", "password": "correct horse battery"},
        follow_redirects=True,
    )
    assert "Sleep tracker" in page.text
    import re

    session = re.search(r'name="session" value="([^"]+)"', page.text)
    family = re.search(r'name="family" value="([^"]+)"', page.text)
    assert session and family
    done = world.http.post(
        manage,
        data={"step": "revoke", "session": session[1], "family": family[1]},
        follow_redirects=True,
    )
    assert "No app has access" in done.text
    assert world.get(f"Patient/{pid}", body["access_token"]).status_code == 401
    with TestClient(world.http.app, base_url="https://testserver") as stranger:
        stolen = stranger.get(f"{manage}?session={session[1]}")
        assert "Sign in" in stolen.text  # the session is bound to the browser
