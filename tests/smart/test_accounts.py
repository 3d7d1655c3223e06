"""Users (argon2, timing-safe, rate-limited login), clients (SMART client types), launch
contexts, and the admin CLI that provisions them."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from fhir_consent.cli import main
from fhir_consent.store.db import Database
from smart_on_fhir import users as users_module
from smart_on_fhir.clients import ClientError, create_client, get_client
from smart_on_fhir.keys import KeySet, generate_signing_key
from smart_on_fhir.launches import create_launch, get_launch, launch_url
from smart_on_fhir.tables import clients as clients_table
from smart_on_fhir.tables import users as users_table
from smart_on_fhir.users import UserError, authenticate, create_user, set_user_active

REDIRECT = "https://app.example.org/cb"


@pytest.fixture
def db(smart_db: str) -> Any:
    database = Database(smart_db, pool_size=1)
    yield database
    database.dispose()


def test_users_are_created_with_argon2id(db: Database) -> None:
    with db.write() as conn:
        user = create_user(conn, "ann", "long enough password", fhir_user="Patient/1", now=0)
        stored = conn.execute(
            sa.select(users_table.c.password_hash).where(users_table.c.id == user.id)
        ).scalar_one()
    assert stored.startswith("$argon2id$")
    assert "long enough password" not in stored
    assert user.fhir_user_type == "Patient"


@pytest.mark.parametrize(
    ("username", "password", "fhir_user"),
    [
        ("bad name", "long enough", None),
        ("ann", "short", None),
        ("ann", "long enough", "Observation/1"),
        ("ann", "long enough", "Patient/"),
    ],
)
def test_user_validation(db: Database, username: str, password: str, fhir_user: str | None) -> None:
    with db.write() as conn, pytest.raises(UserError):
        create_user(conn, username, password, fhir_user=fhir_user, now=0)


def test_duplicate_username(db: Database) -> None:
    with db.write() as conn:
        create_user(conn, "ann", "long enough", fhir_user=None, now=0)
        with pytest.raises(UserError):
            create_user(conn, "ann", "other password", fhir_user=None, now=0)


def test_login_is_timing_safe_and_rate_limited(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[str] = []
    real = users_module._verify

    def spy(stored: str, password: str) -> bool:
        checked.append(stored)
        return real(stored, password)

    monkeypatch.setattr(users_module, "_verify", spy)
    limits = {"max_failures": 3, "window": 60}
    with db.write() as conn:
        create_user(conn, "ann", "the right one", fhir_user=None, now=0)
        unknown = authenticate(conn, "nobody", "x", client_ip="1.1.1.1", now=100, **limits)
        assert unknown.user is None and not unknown.throttled
        assert checked and checked[-1].startswith("$argon2")  # the dummy hash was verified
        for _ in range(3):
            assert (
                authenticate(conn, "ann", "wrong", client_ip="1.1.1.1", now=100, **limits).user
                is None
            )
        throttled = authenticate(
            conn, "ann", "the right one", client_ip="1.1.1.1", now=101, **limits
        )
        assert throttled.user is None and throttled.throttled
        other_ip = authenticate(
            conn, "ann", "the right one", client_ip="2.2.2.2", now=101, **limits
        )
        assert other_ip.user is not None  # the limit is per user and IP
        later = authenticate(conn, "ann", "the right one", client_ip="1.1.1.1", now=200, **limits)
        assert later.user is not None  # the window passed
        set_user_active(conn, "ann", False)
        assert (
            authenticate(conn, "ann", "the right one", client_ip="3.3.3.3", now=300, **limits).user
            is None
        )


def test_client_types(db: Database) -> None:
    with db.write() as conn:
        public = create_client(
            conn,
            client_name="P",
            client_type="public",
            redirect_uris=[REDIRECT],
            scope="patient/*.rs",
            now=0,
        )
        assert public.client_secret is None
        assert public.client.check_endpoint_auth_method("none", "token")
        symmetric = create_client(
            conn,
            client_name="S",
            client_type="confidential-symmetric",
            redirect_uris=[REDIRECT],
            scope="patient/*.rs",
            now=0,
        )
        secret = symmetric.client_secret
        assert secret and symmetric.client.check_client_secret(secret)
        assert not symmetric.client.check_client_secret(secret + "x")
        stored = conn.execute(
            sa.select(clients_table.c.secret_hash).where(
                clients_table.c.client_id == symmetric.client.client_id
            )
        ).scalar_one()
        assert stored != secret and len(stored) == 64
        key = generate_signing_key("ES384")
        backend = create_client(
            conn,
            client_name="B",
            client_type="confidential-asymmetric",
            scope="system/*.rs",
            jwks={"keys": [dict(key.as_dict(private=False))]},
            organization="Organization/o1",
            now=0,
        )
        assert backend.client.grant_types == ("client_credentials",)
        loaded = get_client(conn, backend.client.client_id)
        assert loaded is not None and loaded.organization == "Organization/o1"


def test_client_scope_narrowing_and_redirects(db: Database) -> None:
    with db.write() as conn:
        client = create_client(
            conn,
            client_name="P",
            client_type="public",
            redirect_uris=[REDIRECT],
            scope="launch/patient patient/*.rs openid",
            now=0,
        ).client
    assert client.get_allowed_scope("patient/Observation.read openid offline_access") == (
        "patient/Observation.read openid"
    )
    assert client.get_allowed_scope("patient/*.cruds") == "patient/*.rs"
    assert client.get_allowed_scope("user/*.rs") is None
    assert client.check_redirect_uri(REDIRECT)
    assert not client.check_redirect_uri(REDIRECT + "/")
    assert client.get_default_redirect_uri() == REDIRECT


@pytest.mark.parametrize(
    "kwargs",
    [
        {"client_type": "nope"},
        {"redirect_uris": ["http://plain.example/cb"]},
        {"redirect_uris": []},
        {"grant_types": ["client_credentials"]},
        {"client_type": "confidential-asymmetric"},  # no keys
        {"jwks": {"keys": []}},
        {"scope": "not a scope at all/"},
        {"organization": "Patient/1"},
    ],
)
def test_client_validation(db: Database, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "client_name": "X",
        "client_type": "public",
        "redirect_uris": [REDIRECT],
        "scope": "patient/*.rs",
        "now": 0,
    }
    args.update(kwargs)
    with db.write() as conn, pytest.raises((ClientError, ValueError)):
        create_client(conn, **args)


def test_private_keys_are_refused_in_jwks(db: Database) -> None:
    key = generate_signing_key("ES384")
    with db.write() as conn, pytest.raises(ClientError, match="public keys only"):
        create_client(
            conn,
            client_name="B",
            client_type="confidential-asymmetric",
            scope="system/*.rs",
            jwks={"keys": [dict(key.as_dict(private=True))]},
            now=0,
        )


def test_launch_contexts(db: Database) -> None:
    with db.write() as conn:
        context = create_launch(conn, now=1000, patient="p1", encounter="e1", lifetime=60)
        assert get_launch(conn, context.id, now=1059) is not None
        assert get_launch(conn, context.id, now=1060) is None
        assert get_launch(conn, "unknown", now=1000) is None
    url = launch_url("https://app.example/launch?x=1", iss="https://h/fhir", launch=context.id)
    assert url.startswith("https://app.example/launch?x=1&iss=https%3A%2F%2Fh%2Ffhir&launch=")


# -- the admin CLI ---------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str, stdin: str = "") -> tuple[int, Any]:
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(argv))
    finally:
        sys.stdin = old
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip().startswith("{") else out


def test_cli_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = str(tmp_path / "keys" / "smart")
    code, out = _run(capsys, "keys", "init", "--smart", "--dir", directory)
    assert code == 0 and len(out["kids"]) == 2
    assert _run(capsys, "keys", "init", "--dir", directory)[0] == 2  # exists already
    code, rotated = _run(capsys, "keys", "rotate", "--smart", "--dir", directory)
    assert code == 0 and len(rotated["kids"]) == 3
    keys = KeySet.load(directory)
    assert keys.signing_key("RS256").kid not in out["kids"]


def test_cli_users_clients_launch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], smart_keys_dir: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    db = ["--database-url", url]
    code, _ = _run(
        capsys,
        "users",
        "add",
        "ann",
        "--fhir-user",
        "Patient/p1",
        "--password-stdin",
        *db,
        stdin="long enough\n",
    )
    assert code == 2  # Patient/p1 does not exist
    code, user = _run(
        capsys,
        "users", "add", "ann", "--fhir-user", "Patient/p1", "--allow-missing",
        "--password-stdin", *db, stdin="long enough\n",
    )  # fmt: skip
    assert code == 0 and user["fhirUser"] == "Patient/p1"
    code, public = _run(
        capsys,
        "clients", "add", "--name", "Phone app", "--type", "public",
        "--redirect-uri", REDIRECT, "--scope", "launch/patient patient/*.rs", *db,
    )  # fmt: skip
    assert code == 0 and "client_secret" not in public
    code, web = _run(
        capsys,
        "clients", "add", "--name", "Web app", "--type", "confidential-symmetric",
        "--redirect-uri", REDIRECT, "--scope", "patient/*.rs",
        "--launch-uri", "https://app.example.org/launch", *db,
    )  # fmt: skip
    assert code == 0 and web["client_secret"]
    key = generate_signing_key("RS384")
    jwks_file = tmp_path / "clinic.jwks.json"
    jwks_file.write_text(json.dumps({"keys": [dict(key.as_dict(private=False))]}))
    code, clinic = _run(
        capsys,
        "clients", "add", "--name", "Clinic", "--type", "confidential-asymmetric",
        "--scope", "system/*.rs", "--jwks", str(jwks_file),
        "--organization", "Organization/clinic", *db,
    )  # fmt: skip
    assert code == 0 and clinic["grant_types"] == ["client_credentials"]
    code, launch = _run(
        capsys, "launch", "create", "--patient", "p1", "--client", web["client_id"],
        "--iss", "https://ehr.example/fhir", *db,
    )  # fmt: skip
    assert code == 0 and launch["patient"] == "p1"
    assert launch["url"].startswith("https://app.example.org/launch?iss=https%3A%2F%2Fehr.example")
    assert _run(capsys, "users", "deactivate", "ann", *db)[0] == 0
    assert _run(capsys, "users", "deactivate", "nobody", *db)[0] == 2
    assert _run(capsys, "clients", "disable", public["client_id"], *db)[0] == 0
    database = Database(url, pool_size=1)
    with database.read() as conn:
        assert get_client(conn, public["client_id"]) is None
    database.dispose()
