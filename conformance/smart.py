"""SMART App Launch 2.2 checks against any server, named by the ids of
``shared/specs/smart-app-launch.md`` (Inferno SMART App Launch kit v1.0.0 and ONC (g)(10)).

Without credentials it runs discovery (§2A), the OpenID documents (§2C), the
CapabilityStatement ``oauth-uris`` extension, and the token and resource-server negatives
that need none (§2D-2H). With a backend-services client (``--backend-client-id`` and
``--backend-key``, a private JWK) it also runs the backend-services checks (§2G), the
introspection checks (§2F) with that token, and an authorized search. With an app's
``--client-id`` and ``--redirect-uri`` it adds the invalid-``aud`` check (G10 9.4).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from .report import Recorder, Result

__all__ = ["SmartOptions", "TokenError", "backend_token", "run_smart"]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
G10_CAPABILITIES = (
    "launch-standalone",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "sso-openid-connect",
    "context-standalone-patient",
    "permission-offline",
    "permission-patient",
    "authorize-post",
    "permission-v1",
    "permission-v2",
)
ORIGIN = "https://conformance.invalid"


@dataclass(frozen=True)
class SmartOptions:
    """What the caller can offer beyond the base URL."""

    client_id: str | None = None
    redirect_uri: str | None = None
    backend_client_id: str | None = None
    backend_key: str | None = None  # path of a private JWK (RS384 or ES384)
    backend_scope: str = "system/Patient.rs"
    denied_type: str | None = None  # a type outside backend_scope, for the 403 check


class _Checks:
    def __init__(self, http: httpx.Client, base: str, options: SmartOptions) -> None:
        self.http = http
        self.base = base.rstrip("/")
        self.options = options
        self.recorder = Recorder()
        self.results: list[Result] = self.recorder.results
        self.config: dict[str, Any] = {}
        self.token: str | None = None

    def check(self, section: str, test_id: str, name: str, fn: Callable[[], str | None]) -> None:
        """Run one check: ``fn`` returns ``None`` (pass), ``"skip: why"``, or raises."""
        self.recorder.check(section, test_id, name, fn)

    # -- §2A discovery --------------------------------------------------------------------

    def well_known(self) -> None:
        url = f"{self.base}/.well-known/smart-configuration"

        def endpoint() -> None:
            r = self.http.get(url, headers={"accept": "application/json"})
            assert r.status_code == 200, f"status {r.status_code}"
            assert r.headers.get("content-type", "").startswith("application/json"), "not JSON"
            self.config = r.json()
            assert isinstance(self.config, dict), "not a JSON object"

        def capabilities() -> None:
            doc = self.config
            for name in ("authorization_endpoint", "token_endpoint"):
                assert isinstance(doc.get(name), str) and doc[name], f"{name} missing"
            for name in (
                "capabilities",
                "grant_types_supported",
                "code_challenge_methods_supported",
            ):
                assert isinstance(doc.get(name), list) and doc[name], f"{name} missing"
            assert "authorization_code" in doc["grant_types_supported"], "no authorization_code"
            assert "S256" in doc["code_challenge_methods_supported"], "no S256"
            assert "plain" not in doc["code_challenge_methods_supported"], "plain offered"
            if "sso-openid-connect" in doc["capabilities"]:
                assert isinstance(doc.get("issuer"), str), "issuer missing"
                assert isinstance(doc.get("jwks_uri"), str), "jwks_uri missing"
            assert all(isinstance(c, str) for c in doc["capabilities"]), "non-string capability"

        def cors(path: str) -> Callable[[], None]:
            def run() -> None:
                r = self.http.get(path, headers={"origin": ORIGIN, "accept": "application/json"})
                allow = r.headers.get("access-control-allow-origin")
                assert allow in (ORIGIN, "*"), f"Access-Control-Allow-Origin: {allow}"

            return run

        def g10() -> None:
            missing = [c for c in G10_CAPABILITIES if c not in self.config.get("capabilities", [])]
            assert not missing, f"missing {', '.join(missing)}"

        self.check("discovery", "1.1.01", "well_known_endpoint", endpoint)
        self.check("discovery", "1.1.02", "well_known_capabilities_stu2", capabilities)
        self.check("discovery", "1.1.03", "cors_well_known_endpoint", cors(url))
        self.check("discovery", "1.1.04", "cors_metadata_request", cors(f"{self.base}/metadata"))
        self.check("discovery", "g10_smart_well_known_capabilities", "G10 capabilities", g10)

        def oauth_uris() -> None:
            r = self.http.get(f"{self.base}/metadata", headers={"accept": "application/fhir+json"})
            assert r.status_code == 200, f"/metadata status {r.status_code}"
            security = r.json()["rest"][0]["security"]
            uris = {}
            for ext in security.get("extension", []):
                if ext.get("url", "").endswith("/oauth-uris"):
                    uris = {e["url"]: e["valueUri"] for e in ext.get("extension", [])}
            assert uris.get("authorize") and uris.get("token"), "no oauth-uris extension"
            assert uris["token"] == self.config.get("token_endpoint"), "token URL differs"

        self.check("discovery", "cs-oauth-uris", "CapabilityStatement oauth-uris", oauth_uris)

    # -- §2C OpenID -------------------------------------------------------------------------

    def openid(self) -> None:
        doc: dict[str, Any] = {}

        def configuration() -> str | None:
            issuer = self.config.get("issuer")
            if not issuer:
                return "skip no issuer (no sso-openid-connect)"
            r = self.http.get(f"{issuer.rstrip('/')}/.well-known/openid-configuration")
            assert r.status_code == 200, f"status {r.status_code}"
            doc.update(r.json())
            return None

        def fields() -> str | None:
            if not doc:
                return "skip no configuration"
            required = (
                "issuer",
                "authorization_endpoint",
                "token_endpoint",
                "jwks_uri",
                "response_types_supported",
                "subject_types_supported",
                "id_token_signing_alg_values_supported",
            )
            missing = [name for name in required if name not in doc]
            assert not missing, f"missing {', '.join(missing)}"
            assert "RS256" in doc["id_token_signing_alg_values_supported"], "no RS256"
            return None

        def jwks() -> str | None:
            if not doc:
                return "skip no configuration"
            keys = self.http.get(doc["jwks_uri"]).json()["keys"]
            assert any(k.get("kty") == "RSA" and k.get("n") and k.get("e") for k in keys), (
                "no RSA key"
            )
            assert not any("d" in k for k in keys), "private key material published"
            return None

        self.check("openid", "1.3.02", "smart_openid_retrieve_configuration", configuration)
        self.check("openid", "1.3.03", "smart_openid_required_configuration_fields", fields)
        self.check("openid", "1.3.04", "smart_openid_retrieve_jwks", jwks)

    # -- §2D/2E/2G/2H negatives without credentials --------------------------------------------

    def _token(self, data: dict[str, str], **kwargs: Any) -> httpx.Response:
        return self.http.post(self.config["token_endpoint"], data=data, **kwargs)

    def negatives(self) -> None:
        def no_token() -> None:
            r = self.http.get(f"{self.base}/Patient", headers={"accept": "application/fhir+json"})
            assert r.status_code == 401, f"status {r.status_code}"
            assert r.headers.get("www-authenticate", "").startswith("Bearer"), "no Bearer challenge"

        def bad_token() -> None:
            r = self.http.get(
                f"{self.base}/Patient",
                headers={"accept": "application/fhir+json", "authorization": "Bearer bogus.x.y"},
            )
            assert r.status_code == 401, f"status {r.status_code}"
            assert 'error="invalid_token"' in r.headers.get("www-authenticate", ""), (
                "no invalid_token challenge"
            )

        client_id = self.options.client_id or "BAD_CLIENT_ID"

        def bad_code() -> None:
            r = self._token(
                {
                    "grant_type": "authorization_code",
                    "code": "BAD_CODE",
                    "redirect_uri": self.options.redirect_uri or "https://app.invalid/cb",
                    "client_id": client_id,
                    "code_verifier": secrets.token_urlsafe(48),
                }
            )
            allowed = (400,) if self.options.client_id else (400, 401)
            assert r.status_code in allowed, f"status {r.status_code}"
            assert "no-store" in r.headers.get("cache-control", ""), "no Cache-Control: no-store"

        def bad_client() -> None:
            r = self._token(
                {"grant_type": "authorization_code", "code": "x", "client_id": "BAD_CLIENT_ID"}
            )
            assert r.status_code in (400, 401), f"status {r.status_code}"
            assert r.json().get("error") == "invalid_client", f"error {r.json().get('error')}"

        def bad_refresh() -> None:
            r = self._token(
                {
                    "grant_type": "refresh_token",
                    "refresh_token": secrets.token_urlsafe(32),
                    "client_id": client_id,
                }
            )
            assert r.status_code in (400, 401), f"status {r.status_code}"

        def bad_grant_type() -> None:
            r = self._token({"grant_type": "not_a_grant_type"})
            assert r.status_code == 400, f"status {r.status_code}"

        def bad_assertion_type() -> None:
            r = self._token(
                {
                    "grant_type": "client_credentials",
                    "client_assertion_type": "not_an_assertion_type",
                    "client_assertion": "x.y.z",
                }
            )
            assert r.status_code in (400, 401), f"status {r.status_code}"

        self.check("resource", "g10_unauthorized_access", "no token -> 401 Bearer", no_token)
        self.check("resource", "2H.39", "invalid token -> 401 invalid_token", bad_token)
        self.check("token", "9.5-Test03", "invalid code -> 400", bad_code)
        self.check("token", "9.5-Test04", "invalid client -> 400/401", bad_client)
        self.check("token", "g10_invalid_token_refresh", "random refresh_token", bad_refresh)
        self.check("backend", "3.2.01", "invalid_grant_type", bad_grant_type)
        self.check("backend", "3.2.02", "invalid_client_assertion", bad_assertion_type)

        def invalid_aud() -> str | None:
            if not (self.options.client_id and self.options.redirect_uri):
                return "skip needs --client-id and --redirect-uri"
            params = {
                "response_type": "code",
                "client_id": self.options.client_id,
                "redirect_uri": self.options.redirect_uri,
                "scope": "launch/patient patient/*.rs",
                "state": secrets.token_hex(8),
                "aud": "https://invalid.example/fhir",
                "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
                "code_challenge_method": "S256",
            }
            r = self.http.get(
                f"{self.config['authorization_endpoint']}?{urlencode(params)}",
                follow_redirects=False,
            )
            location = r.headers.get("location", "")
            query = parse_qs(urlsplit(location).query)
            assert "code" not in query, "a code was issued for an invalid aud"
            assert query.get("error") or r.status_code >= 400, "no error"
            return None

        self.check("token", "9.4", "invalid aud -> no code", invalid_aud)

    # -- §2G/2F with a backend client ----------------------------------------------------------

    def backend(self) -> None:
        options = self.options
        skip = "skip needs --backend-client-id and --backend-key"
        signer = (
            _Signer.load(options) if options.backend_client_id and options.backend_key else None
        )

        def assertion(**kwargs: Any) -> str:
            assert signer is not None
            return signer.sign(self.config["token_endpoint"], **kwargs)

        def request(assert_value: str) -> httpx.Response:
            return self._token(
                {
                    "grant_type": "client_credentials",
                    "scope": options.backend_scope,
                    "client_assertion_type": ASSERTION_TYPE,
                    "client_assertion": assert_value,
                }
            )

        body: dict[str, Any] = {}
        used: list[str] = []

        def success() -> str | None:
            if signer is None:
                return skip
            value = assertion()
            used.append(value)
            r = request(value)
            assert r.status_code in (200, 201), f"status {r.status_code}: {r.text[:120]}"
            body.update(r.json())
            return None

        def response_body() -> str | None:
            if not body:
                return "skip no token"
            assert isinstance(body.get("access_token"), str), "access_token"
            assert str(body.get("token_type", "")).lower() == "bearer", "token_type"
            assert isinstance(body.get("expires_in"), int), "expires_in"
            assert body["expires_in"] <= 300, "expires_in over 5 minutes"
            assert isinstance(body.get("scope"), str), "scope"
            self.token = body["access_token"]
            return None

        def replay() -> str | None:
            if not used:
                return "skip no token"
            r = request(used[0])
            assert r.status_code in (400, 401), f"replayed jti accepted ({r.status_code})"
            return None

        def expired() -> str | None:
            if signer is None:
                return skip
            r = request(assertion(now=int(time.time()) - 900, lifetime=120))
            assert r.status_code in (400, 401), f"expired assertion accepted ({r.status_code})"
            return None

        def wrong_aud() -> str | None:
            if signer is None:
                return skip
            r = request(signer.sign(self.base))
            assert r.status_code in (400, 401), f"wrong aud accepted ({r.status_code})"
            return None

        self.check("backend", "3.2.04", "auth_request_success", success)
        self.check("backend", "3.2.05", "auth_response_body", response_body)
        self.check("backend", "3.2.03-jti", "invalid_jwt: replayed jti", replay)
        self.check("backend", "3.2.03-exp", "invalid_jwt: expired", expired)
        self.check("backend", "3.2.03-aud", "invalid_jwt: wrong aud", wrong_aud)

        def introspect_active() -> str | None:
            endpoint = self.config.get("introspection_endpoint")
            if not self.token or not endpoint:
                return "skip no token or no introspection_endpoint"
            r = self.http.post(
                endpoint,
                data={"token": self.token},
                headers={"authorization": f"Bearer {self.token}"},
            )
            assert r.status_code == 200, f"status {r.status_code}"
            info = r.json()
            assert info.get("active") is True, "not active"
            assert info.get("client_id") == options.backend_client_id, "client_id"
            assert set(str(info.get("scope", "")).split()) == set(body["scope"].split()), "scope"
            assert info.get("exp", 0) >= time.time() - 600, "exp"
            return None

        def introspect_junk() -> str | None:
            endpoint = self.config.get("introspection_endpoint")
            if not self.token or not endpoint:
                return "skip no token or no introspection_endpoint"
            r = self.http.post(
                endpoint,
                data={"token": "invalid_token_value"},
                headers={"authorization": f"Bearer {self.token}"},
            )
            assert r.status_code == 200, f"status {r.status_code}"
            assert r.json().get("active") is False, "junk token reported active"
            return None

        def authorized_search() -> str | None:
            if not self.token:
                return "skip no token"
            rtype = options.backend_scope.split()[0].split("/")[1].split(".")[0]
            rtype = "Patient" if rtype == "*" else rtype
            r = self.http.get(
                f"{self.base}/{rtype}",
                params={"_count": "1"},
                headers={
                    "authorization": f"Bearer {self.token}",
                    "accept": "application/fhir+json",
                },
            )
            assert r.status_code == 200, f"status {r.status_code}"
            return None

        def insufficient_scope() -> str | None:
            if not self.token or not options.denied_type:
                return "skip needs a token and --denied-type"
            r = self.http.get(
                f"{self.base}/{options.denied_type}",
                headers={
                    "authorization": f"Bearer {self.token}",
                    "accept": "application/fhir+json",
                },
            )
            assert r.status_code == 403, f"status {r.status_code}"
            assert r.json().get("resourceType") == "OperationOutcome", "no OperationOutcome"
            return None

        self.check(
            "introspection", "2F.30-31", "introspection of an active token", introspect_active
        )
        self.check("introspection", "2F.33", "introspection of a junk token", introspect_junk)
        self.check("resource", "3.2-search", "search with the backend token", authorized_search)
        self.check("resource", "2H.40", "insufficient scope -> 403", insufficient_scope)


class _Signer:
    """Signs client assertions with the backend client's private JWK (RS384 or ES384)."""

    def __init__(self, client_id: str, key: Any, alg: str) -> None:
        self.client_id = client_id
        self.key = key
        self.alg = alg

    @classmethod
    def load(cls, options: SmartOptions) -> _Signer:
        return cls.from_file(str(options.backend_client_id), str(options.backend_key))

    @classmethod
    def from_file(cls, client_id: str, key_path: str) -> _Signer:
        from joserfc.jwk import ECKey, RSAKey

        data = json.loads(Path(key_path).read_text(encoding="utf-8"))
        key = (RSAKey if data.get("kty") == "RSA" else ECKey).import_key(data)
        alg = data.get("alg") or ("RS384" if data.get("kty") == "RSA" else "ES384")
        return cls(client_id, key, alg)

    def sign(self, audience: str, *, now: int | None = None, lifetime: int = 240) -> str:
        from joserfc import jwt

        issued = int(time.time()) if now is None else now
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "iat": issued,
            "exp": issued + lifetime,
            "jti": secrets.token_urlsafe(16),
        }
        header = {"alg": self.alg, "kid": self.key.kid, "typ": "JWT"}
        return jwt.encode(header, claims, self.key, algorithms=[self.alg])


class TokenError(Exception):
    """No backend-services token could be obtained (the message says why)."""


def backend_token(
    base: str, client_id: str, key_path: str, scope: str, *, http: httpx.Client
) -> str:
    """A SMART backend-services access token (``client_credentials`` with a signed
    ``private_key_jwt`` assertion) for the FHIR base *base*: the token endpoint comes from its
    ``.well-known/smart-configuration``."""
    try:
        config = http.get(
            f"{base.rstrip('/')}/.well-known/smart-configuration",
            headers={"accept": "application/json"},
        ).json()
        endpoint = config["token_endpoint"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
        raise TokenError(f"no token_endpoint in smart-configuration ({error})") from error
    try:
        signer = _Signer.from_file(client_id, key_path)
    except (OSError, ValueError, KeyError) as error:
        raise TokenError(f"cannot load the private key {key_path}: {error}") from error
    r = http.post(
        endpoint,
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": signer.sign(endpoint),
        },
    )
    if r.status_code != 200:
        raise TokenError(f"token endpoint answered {r.status_code}: {r.text[:160]}")
    token = r.json().get("access_token")
    if not isinstance(token, str):
        raise TokenError("token response has no access_token")
    return token


def run_smart(
    base: str, options: SmartOptions, *, http: httpx.Client | None = None
) -> list[Result]:
    """Run every SMART check against the FHIR base *base*; returns the results in order."""
    own = http is None
    client = http or httpx.Client(timeout=15.0)
    try:
        checks = _Checks(client, base, options)
        checks.well_known()
        if not checks.config.get("token_endpoint"):
            return checks.results  # nothing else can run
        checks.openid()
        checks.negatives()
        checks.backend()
        return checks.results
    finally:
        if own:
            client.close()
