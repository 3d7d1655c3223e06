"""The public root of a request (fhir_consent.forwarded): mount point, trusted proxy headers."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_consent.forwarded import SCOPE_KEY, ProxyPolicy, PublicURLs, public_root, route_path


def scope(
    headers: dict[str, str] | list[tuple[str, str]],
    *,
    client: str = "10.0.0.5",
    root_path: str = "",
    scheme: str = "http",
) -> dict[str, Any]:
    items = headers.items() if isinstance(headers, dict) else headers
    return {
        "type": "http",
        "scheme": scheme,
        "server": ("10.0.0.1", 8000),
        "client": (client, 40000),
        "root_path": root_path,
        "path": root_path + "/fhir/metadata",
        "headers": [(k.lower().encode(), v.encode()) for k, v in items],
    }


POLICY = ProxyPolicy.parse(["10.0.0.0/29", "::1"])
PROXIED = {
    "host": "internal:8000",
    "x-forwarded-proto": "https",
    "x-forwarded-host": "ehr.example",
    "x-forwarded-prefix": "/portal/",
    "x-forwarded-for": "203.0.113.7, 10.0.0.3",
}


def resolve(s: dict[str, Any], policy: ProxyPolicy = POLICY) -> dict[str, Any]:
    return PublicURLs(app=None, policy=policy).resolve(s)  # type: ignore[arg-type]


def test_nothing_is_trusted_by_default() -> None:
    out = resolve(scope(PROXIED, client="10.0.0.5"), ProxyPolicy())
    assert out[SCOPE_KEY] == "http://internal:8000"
    assert out["scheme"] == "http"
    assert out["client"] == ("10.0.0.5", 40000)


def test_untrusted_peer_headers_are_ignored() -> None:
    out = resolve(scope(PROXIED, client="192.0.2.9", root_path="/ehr"))
    assert out[SCOPE_KEY] == "http://internal:8000/ehr"
    assert out["client"] == ("192.0.2.9", 40000)


def test_trusted_proxy_sets_scheme_host_prefix_and_client() -> None:
    out = resolve(scope(PROXIED, client="10.0.0.2", root_path="/ehr"))
    assert out[SCOPE_KEY] == "https://ehr.example/portal/ehr"
    assert out["scheme"] == "https"
    # the right-most address that is not a trusted proxy is the client
    assert out["client"] == ("203.0.113.7", 0)
    assert public_root(out) == "https://ehr.example/portal/ehr"


def test_right_most_value_wins_and_ports() -> None:
    headers = [
        ("host", "internal"),
        ("x-forwarded-host", "forged.example, ehr.example"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-port", "8443"),
    ]
    out = resolve(scope(headers, client="10.0.0.1"))
    assert out[SCOPE_KEY] == "http://ehr.example:8443"
    headers = [("host", "ehr.example:443"), ("x-forwarded-proto", "https")]
    assert resolve(scope(headers, client="10.0.0.1"))[SCOPE_KEY] == "https://ehr.example"


@pytest.mark.parametrize(
    "name,value",
    [
        ("x-forwarded-host", "evil.example/path"),
        ("x-forwarded-host", "evil example"),
        ("x-forwarded-host", "a" * 300),
        ("x-forwarded-host", "ehr.example:99999"),
        ("x-forwarded-prefix", "/../admin"),
        ("x-forwarded-prefix", "relative"),
        ("x-forwarded-prefix", "/a?b=c"),
        ("x-forwarded-proto", "javascript"),
    ],
)
def test_malformed_forwarded_values_are_ignored(name: str, value: str) -> None:
    out = resolve(scope({"host": "internal:8000", name: value}, client="10.0.0.1"))
    assert out[SCOPE_KEY] == "http://internal:8000"


def test_host_header_fallbacks() -> None:
    assert resolve(scope({}, client="10.0.0.1"))[SCOPE_KEY] == "http://10.0.0.1:8000"
    assert resolve(scope({"host": "bad host"}))[SCOPE_KEY] == "http://10.0.0.1:8000"
    assert resolve(scope({"host": "[::1]:8080"}))[SCOPE_KEY] == "http://[::1]:8080"


def test_policy_parse_and_route_path() -> None:
    with pytest.raises(ValueError):
        ProxyPolicy.parse(["not-an-address"])
    assert POLICY.trusts("::1") and POLICY.trusts("10.0.0.7")
    assert (
        not POLICY.trusts("10.0.0.8") and not POLICY.trusts("garbage") and not POLICY.trusts(None)
    )
    assert route_path({"path": "/ehr/fhir/x", "root_path": "/ehr"}) == "/fhir/x"
    assert route_path({"path": "/fhir/x", "root_path": ""}) == "/fhir/x"


def test_settings_refuse_malformed_proxies() -> None:
    from fhir_consent.config import Settings

    with pytest.raises(ValueError):
        Settings(trusted_proxies=["10.0.0.0/33"])
    assert Settings(trusted_proxies=["10.0.0.0/8"]).trusted_proxies == ["10.0.0.0/8"]
