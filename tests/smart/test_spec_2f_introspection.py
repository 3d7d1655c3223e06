"""Spec §2F: RFC 7662 token introspection as Inferno's ``token_introspection_*`` tests use it."""

from __future__ import annotations

import base64
import json
import time

import pytest

from smart_on_fhir.scopes import parse_scopes
from smart_on_fhir.users import User

from .kit import AUTH, FHIR, World


def _claims(token: str) -> dict[str, object]:
    part = token.split(".")[1]
    data: dict[str, object] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


def test_2f_30_33_introspection(world: World, peter: tuple[str, User]) -> None:
    """30: POST ``token`` as a form (with an Authorization header) → 200. 31: active, same
    client_id and scope, recent exp. 32: patient, iss/sub and fhirUser match the token
    response and id_token. 33: junk → 200 ``{"active": false}``."""
    pid, _ = peter
    client = world.add_client().client
    body = world.token(client.client_id, username="peter")
    bearer = {"authorization": f"Bearer {body['access_token']}"}
    r = world.http.post(f"{AUTH}/introspect", data={"token": body["access_token"]}, headers=bearer)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    info = r.json()
    assert info["active"] is True
    assert info["client_id"] == client.client_id
    assert parse_scopes(info["scope"]) == parse_scopes(body["scope"])
    assert info["exp"] >= time.time() - 600
    assert info["patient"] == body["patient"] == pid
    for name in ("need_patient_banner", "smart_style_url"):  # every launch-context field
        assert info[name] == body[name], name
    id_claims = _claims(body["id_token"])
    assert info["iss"] == id_claims["iss"] == FHIR
    assert info["sub"] == id_claims["sub"]
    assert info["fhirUser"] == id_claims["fhirUser"]
    junk = world.http.post(
        f"{AUTH}/introspect", data={"token": "invalid_token_value"}, headers=bearer
    )
    assert junk.status_code == 200
    assert junk.json() == {"active": False}


def test_introspection_by_the_client_itself(world: World, peter: tuple[str, User]) -> None:
    """A client authenticates like at the token endpoint and sees only its own tokens."""
    client = world.add_client().client
    other = world.add_client().client
    body = world.token(client.client_id, username="peter")
    own = world.http.post(
        f"{AUTH}/introspect", data={"token": body["access_token"], "client_id": client.client_id}
    )
    assert own.json()["active"] is True
    foreign = world.http.post(
        f"{AUTH}/introspect", data={"token": body["access_token"], "client_id": other.client_id}
    )
    assert foreign.json() == {"active": False}
    refresh = world.http.post(
        f"{AUTH}/introspect",
        data={
            "token": body["refresh_token"],
            "token_type_hint": "refresh_token",
            "client_id": client.client_id,
        },
    )
    assert refresh.json()["active"] is True


@pytest.mark.parametrize("state", ["revoked", "tampered", "no_auth"])
def test_introspection_inactive_or_unauthenticated(
    world: World, peter: tuple[str, User], state: str
) -> None:
    client = world.add_client().client
    body = world.token(client.client_id, username="peter")
    bearer = {"authorization": f"Bearer {body['access_token']}"}
    if state == "no_auth":
        r = world.http.post(f"{AUTH}/introspect", data={"token": body["access_token"]})
        assert r.status_code == 401
        assert r.json()["error"] == "invalid_client"
        return
    if state == "revoked":
        world.http.post(
            f"{AUTH}/revoke", data={"token": body["access_token"], "client_id": client.client_id}
        )
        r = world.http.post(
            f"{AUTH}/introspect",
            data={"token": body["access_token"], "client_id": client.client_id},
        )
    else:
        token = body["access_token"]
        tampered = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
        r = world.http.post(f"{AUTH}/introspect", data={"token": tampered}, headers=bearer)
    assert r.status_code == 200
    assert r.json() == {"active": False}


def test_wrong_hints_only_change_the_search_order(world: World, peter: tuple[str, User]) -> None:
    """RFC 7009 §2.1 / RFC 7662 §2.1: a wrong ``token_type_hint`` still finds the token; a
    refresh token is never accepted as a Bearer credential."""
    pid, _ = peter
    client = world.add_client().client
    body = world.token(client.client_id, username="peter")
    info = world.http.post(
        f"{AUTH}/introspect",
        data={
            "token": body["access_token"],
            "token_type_hint": "refresh_token",
            "client_id": client.client_id,
        },
    ).json()
    assert info["active"] is True
    as_bearer = world.http.post(
        f"{AUTH}/introspect",
        data={"token": body["access_token"]},
        headers={"authorization": f"Bearer {body['refresh_token']}"},
    )
    assert as_bearer.status_code == 401
    world.http.post(
        f"{AUTH}/revoke",
        data={
            "token": body["access_token"],
            "token_type_hint": "refresh_token",
            "client_id": client.client_id,
        },
    )
    assert world.get(f"Patient/{pid}", body["access_token"]).status_code == 401
