"""Bad input against the whole server (issue 8 §2), in process, on SQLite and PostgreSQL.

Hypothesis generates malformed and hostile requests to the FHIR API: broken JSON, deep
nesting, huge strings, unicode edge cases, wrong types, injection strings in search
parameters and ids, odd headers. Every answer must keep the same promises: never a 5xx,
every error an OperationOutcome, no stack trace and no echo of the patient data the request
carried, and a refused write changes no row in any table (resources, versions, search
indexes, consent index, ledger, documents). Accepted unicode must come back byte for byte.

The budget is fixed (``max_examples`` per test, no deadline) so the file runs in well under a
minute per database on a busy machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from fuzz_kit import (
    BASE,
    EXAMPLES,
    FHIR_JSON,
    NASTY_STRINGS,
    assert_fhir_error,
    full_app,
    row_counts,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_consent.fhir import searchparams as sp
from fhir_consent.fhir.validation import MAX_JSON_DEPTH, SUPPORTED_TYPES

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: Patient data the seeded records carry: it must never appear in an error.
SECRET_FAMILY = "Quixotewright"
CONTROL = {chr(c) for c in range(0x20)} - {"\t", "\r", "\n"}


class Fuzz:
    def __init__(self, client: TestClient, engine: sa.Engine) -> None:
        self.client = client
        self.engine = engine
        self.counts = row_counts(engine)

    def send(self, method: str, path: str, **kw: Any) -> Any:
        """One request; a refused one must have written nothing."""
        r = self.client.request(method, path, **kw)
        assert_fhir_error(r, [SECRET_FAMILY])
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            now = row_counts(self.engine)
            if r.status_code >= 400:
                assert now == self.counts, (r.status_code, _diff(self.counts, now))
            self.counts = now
        return r


def _dumps(value: Any) -> bytes:
    """JSON with integers of any size (orjson stops at 64 bits; clients need not)."""
    return json.dumps(value).encode()


def _diff(before: dict[str, int], after: dict[str, int]) -> dict[str, tuple[int, int]]:
    return {k: (before[k], after[k]) for k in before if before[k] != after.get(k)}


@pytest.fixture
def fuzz(db_url: str, tmp_path: Path) -> Iterator[Fuzz]:
    app = full_app(db_url, tmp_path)
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    with TestClient(app, base_url=BASE, headers={"accept": "application/fhir+json"}) as client:
        seed = {
            "resourceType": "Patient",
            "id": "p1",
            "name": [{"family": SECRET_FAMILY, "given": ["Ada"]}],
            "birthDate": "1970-01-01",
        }
        assert client.put("/fhir/Patient/p1", json=seed, headers=FHIR_JSON).status_code == 201
        consent = {
            "resourceType": "Consent",
            "status": "proposed",
            "scope": {"coding": [{"code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": "Patient/p1"},
            "policyRule": {"coding": [{"code": "OPTIN"}]},
        }
        assert client.post("/fhir/Consent", json=consent, headers=FHIR_JSON).status_code == 201
        yield Fuzz(client, engine)
    engine.dispose()


def _patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": SECRET_FAMILY}], **extra}


# -- malformed JSON ----------------------------------------------------------------------------

VALID = orjson.dumps(_patient(birthDate="1980-02-03", gender="female"))


@st.composite
def broken_json(draw: st.DrawFn) -> bytes:
    """Valid JSON cut short, with bytes flipped, inserted or removed, or plain random bytes."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "random", "concat"]))
    data = bytearray(VALID)
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "concat":
        return VALID + draw(st.sampled_from([b"{}", b"]", b",", b"\x00", VALID]))
    at = draw(st.integers(0, len(data) - 1))
    if kind == "truncate":
        return bytes(data[:at])
    if kind == "flip":
        data[at] ^= draw(st.integers(1, 255))
    elif kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=8))
    else:
        del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


@FUZZ
@given(body=broken_json(), target=st.sampled_from(["create", "update", "bundle", "patch"]))
def test_malformed_json_is_refused_cleanly(fuzz: Fuzz, body: bytes, target: str) -> None:
    if target == "create":
        fuzz.send("POST", "/fhir/Patient", content=body, headers=FHIR_JSON)
    elif target == "update":
        fuzz.send("PUT", "/fhir/Patient/p1", content=body, headers=FHIR_JSON)
    elif target == "bundle":
        fuzz.send("POST", "/fhir", content=body, headers=FHIR_JSON)
    else:
        headers = {"content-type": "application/json-patch+json"}
        fuzz.send("PATCH", "/fhir/Patient/p1", content=body, headers=headers)


# -- deep nesting ------------------------------------------------------------------------------


def _nested_extension(levels: int) -> dict[str, Any]:
    inner: list[dict[str, Any]] = [{"url": "http://example.org/leaf", "valueString": "x"}]
    for _ in range(levels - 1):
        inner = [{"url": "http://example.org/level", "extension": inner}]
    return _patient(extension=inner)


def _nested_extension_bytes(levels: int) -> bytes:
    """:func:`_nested_extension` serialized by hand (orjson refuses to write past 255 levels)."""
    leaf = b'{"url":"http://example.org/leaf","valueString":"x"}'
    head = b'{"url":"http://example.org/level","extension":[' * (levels - 1)
    inner = b"[" + head + leaf + b"]}" * (levels - 1) + b"]"
    return (
        b'{"resourceType":"Patient","name":[{"family":"'
        + SECRET_FAMILY.encode()
        + b'"}],"extension":'
        + inner
        + b"}"
    )


def _depth(value: Any) -> int:
    """Nesting depth of arrays and objects (iterative: the test must not recurse either)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            stack.extend(
                (v, level + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


def test_nesting_limit_is_exact(fuzz: Fuzz) -> None:
    """The deepest valid resource the limit allows is stored; one level more is a 400 (the
    validator used to die with RecursionError, a 500, at about 150 extension levels)."""
    levels = (MAX_JSON_DEPTH - 2) // 2  # Patient{extension[{…}]}: two levels per extension
    ok = _nested_extension(levels)
    assert _depth(ok) <= MAX_JSON_DEPTH
    r = fuzz.send("POST", "/fhir/Patient", content=orjson.dumps(ok), headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    too_deep = _nested_extension(levels + 1)
    assert _depth(too_deep) > MAX_JSON_DEPTH
    r = fuzz.send("POST", "/fhir/Patient", content=orjson.dumps(too_deep), headers=FHIR_JSON)
    assert r.status_code == 400
    assert "nested deeper" in r.json()["issue"][0]["diagnostics"]
    assert orjson.loads(_nested_extension_bytes(levels)) == ok
    for levels in (150, 400, 2000):  # where the RecursionError was, and past orjson's limit
        body = _nested_extension_bytes(levels)
        assert (
            fuzz.send("POST", "/fhir/Patient", content=body, headers=FHIR_JSON).status_code == 400
        )


@FUZZ
@given(
    depth=st.integers(1, 1200),
    shape=st.sampled_from(["array", "object", "extension", "bundle", "patch"]),
)
def test_deep_nesting_never_crashes(fuzz: Fuzz, depth: int, shape: str) -> None:
    path, ctype = "/fhir/Patient", FHIR_JSON["content-type"]
    if shape == "array":
        body = b'{"resourceType":"Patient","extension":' + b"[" * depth + b"]" * depth + b"}"
    elif shape == "object":
        body = b'{"resourceType":"Patient","a":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
    elif shape == "extension":
        body = _nested_extension_bytes(depth // 2 + 1)
    elif shape == "bundle":
        head = b'{"resourceType":"Bundle","type":"transaction","entry":[{"request":'
        head += b'{"method":"POST","url":"Patient"},"resource":'
        body = head + _nested_extension_bytes(depth // 2 + 1) + b"}]}"
        path = "/fhir"
    else:
        value = _nested_extension_bytes(depth // 2 + 1).split(b'"extension":', 1)[1][:-1]
        body = b'[{"op":"add","path":"/extension","value":' + value + b"}]"
        path, ctype = "/fhir/Patient/p1", "application/json-patch+json"
    method = "PATCH" if shape == "patch" else "POST"
    r = fuzz.send(method, path, content=body, headers={"content-type": ctype})
    try:
        too_deep = _depth(orjson.loads(body)) > MAX_JSON_DEPTH
    except orjson.JSONDecodeError:  # past orjson's own limit (1024): not JSON at all
        too_deep = True
    if too_deep:
        assert r.status_code == 400, r.text[:300]


# -- huge strings ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [100_000, 4_000_000])
def test_huge_strings_round_trip_or_413(fuzz: Fuzz, size: int) -> None:
    big = "é" * (size // 2)  # two UTF-8 bytes each
    body = orjson.dumps(_patient(name=[{"family": big, "given": [big[:600]]}]))
    r = fuzz.send("POST", "/fhir/Patient", content=body, headers=FHIR_JSON)
    assert r.status_code == 201, r.text[:300]
    back = fuzz.client.get(f"/fhir/Patient/{r.json()['id']}")
    assert back.json()["name"][0]["family"] == big
    found = fuzz.client.get("/fhir/Patient", params={"family": big[:300]})
    assert_fhir_error(found)
    over = b'{"resourceType":"Patient","name":[{"family":"' + b"x" * (17 * 2**20) + b'"}]}'
    r = fuzz.send("POST", "/fhir/Patient", content=over, headers=FHIR_JSON)
    assert r.status_code == 413


# -- unicode -----------------------------------------------------------------------------------


@FUZZ
@given(text=st.one_of(st.sampled_from(NASTY_STRINGS), st.text(min_size=1, max_size=80)))
def test_unicode_round_trips_or_is_refused(fuzz: Fuzz, text: str) -> None:
    """Any string without control characters is stored and read back unchanged (whitespace-
    only strings excepted: FHIR requires non-whitespace content); a control character is a
    400 (FHIR R4 datatypes.html#string), never a 500 from the database."""
    body = orjson.dumps(_patient(name=[{"family": text, "given": ["Ada"]}]))
    r = fuzz.send("POST", "/fhir/Patient", content=body, headers=FHIR_JSON)
    if CONTROL & set(text):
        assert r.status_code == 400, r.text[:300]
        return
    if not text.strip():
        assert r.status_code in (201, 400)
        return
    assert r.status_code == 201, r.text[:300]
    rid = r.json()["id"]
    back = fuzz.client.get(f"/fhir/Patient/{rid}")
    assert back.status_code == 200
    assert back.json()["name"][0]["family"] == text
    for name in ("family", "family:exact", "name:contains"):
        found = fuzz.client.get("/fhir/Patient", params={name: text, "_id": rid})
        assert_fhir_error(found)
        assert found.status_code == 200


@pytest.mark.parametrize(
    "escape", ["\\ud800", "\\udfff", "\\ud83d", "x\\ud800y", "\\u0000", "\\u001b", "\\b", "\\f"]
)
def test_lone_surrogates_and_escaped_controls_are_400(fuzz: Fuzz, escape: str) -> None:
    body = ('{"resourceType":"Patient","name":[{"family":"' + escape + '"}]}').encode()
    r = fuzz.send("POST", "/fhir/Patient", content=body, headers=FHIR_JSON)
    assert r.status_code == 400
    key = ('{"resourceType":"Patient","a' + escape + '":1}').encode()
    assert fuzz.send("POST", "/fhir/Patient", content=key, headers=FHIR_JSON).status_code == 400


def test_raw_invalid_utf8_is_400(fuzz: Fuzz) -> None:
    for raw in (b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"):
        body = b'{"resourceType":"Patient","name":[{"family":"' + raw + b'"}]}'
        r = fuzz.send("POST", "/fhir/Patient", content=body, headers=FHIR_JSON)
        assert r.status_code == 400


# -- wrong types -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [
    "id",
    "meta",
    "active",
    "name",
    "gender",
    "birthDate",
    "telecom",
    "address",
    "deceasedBoolean",
    "multipleBirthInteger",
    "extension",
    "contained",
    "managingOrganization",
    "link",
    "resourceType",
    "text",
    "_birthDate",
]


@FUZZ
@given(
    rtype=st.sampled_from(SUPPORTED_TYPES),
    field=st.sampled_from(FIELDS),
    value=json_values,
    how=st.sampled_from(["create", "update", "bundle"]),
)
def test_wrong_types_are_400_not_500(
    fuzz: Fuzz, rtype: str, field: str, value: Any, how: str
) -> None:
    resource: dict[str, Any] = {"resourceType": rtype, field: value}
    if how == "create":
        fuzz.send("POST", f"/fhir/{rtype}", content=_dumps(resource), headers=FHIR_JSON)
    elif how == "update":
        resource.setdefault("id", "w1")
        rid = resource["id"] if isinstance(resource["id"], str) and resource["id"] else "w1"
        path = f"/fhir/{rtype}/{quote(rid, safe='')}"
        fuzz.send("PUT", path, content=_dumps(resource), headers=FHIR_JSON)
    else:
        entry = {"request": {"method": "POST", "url": rtype}, "resource": resource}
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
        fuzz.send("POST", "/fhir", content=_dumps(bundle), headers=FHIR_JSON)


@FUZZ
@given(
    bundle=st.fixed_dictionaries(
        {"resourceType": st.just("Bundle")},
        optional={
            "type": st.sampled_from(["batch", "transaction", "searchset", "x"]) | json_values,
            "entry": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "request": st.fixed_dictionaries(
                            {},
                            optional={
                                "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "X"])
                                | json_values,
                                "url": st.sampled_from(
                                    ["Patient", "Patient/p1", "Patient?name=a", "../x", ""]
                                )
                                | json_values,
                                "ifMatch": json_values,
                                "ifNoneExist": json_values,
                            },
                        )
                        | json_values,
                        "resource": st.just(_patient()) | json_values,
                        "fullUrl": json_values,
                    },
                )
                | json_values,
                max_size=4,
            )
            | json_values,
        },
    )
)
def test_odd_bundles_are_400_not_500(fuzz: Fuzz, bundle: dict[str, Any]) -> None:
    fuzz.send("POST", "/fhir", content=_dumps(bundle), headers=FHIR_JSON)


# -- injection in search parameters and ids --------------------------------------------------

hostile = st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=40))


def _param_names(rtype: str) -> list[str]:
    return sorted(sp.params_for(rtype))


@FUZZ
@given(
    rtype=st.sampled_from(SUPPORTED_TYPES),
    data=st.data(),
    value=hostile,
    modifier=st.sampled_from(["", ":exact", ":contains", ":missing", ":not", ":text", ":x", ":"]),
    prefix=st.sampled_from(["", "eq", "gt", "le", "sa", "ap", "zz"]),
    post=st.booleans(),
)
def test_search_parameters_are_data_not_code(
    fuzz: Fuzz, rtype: str, data: st.DataObject, value: str, modifier: str, prefix: str, post: bool
) -> None:
    names = [*_param_names(rtype), "_id", "_count", "_sort", "_include", "_revinclude", "_has"]
    names += ["_summary", "_elements", "_lastUpdated", "_total", "_format", "nonsense"]
    name = data.draw(st.sampled_from(names))
    params = [(name + modifier, prefix + value)]
    if post:
        form = {"content-type": "application/x-www-form-urlencoded"}
        r = fuzz.send("POST", f"/fhir/{rtype}/_search", data=dict(params), headers=form)
    else:
        r = fuzz.send("GET", f"/fhir/{rtype}", params=params)
    if r.status_code == 200:
        bundle = r.json()
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"


@pytest.mark.parametrize("value", [s for s in NASTY_STRINGS if "'" in s or '"' in s or "%" in s])
def test_sql_injection_matches_nothing(fuzz: Fuzz, value: str) -> None:
    for name in ("family", "name", "_id", "identifier", "birthdate", "general-practitioner"):
        r = fuzz.send("GET", "/fhir/Patient", params={name: value})
        assert r.status_code in (200, 400)
        if r.status_code == 200:
            assert r.json()["total"] == 0, (name, value)
    assert fuzz.client.get("/fhir/Patient/p1").status_code == 200  # the table is still there


@FUZZ
@given(
    rid=hostile,
    method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]),
    rtype=st.sampled_from(
        ["Patient", "Binary", "Consent", "DocumentReference", "Nope", "_history"]
    ),
)
def test_hostile_ids(fuzz: Fuzz, rid: str, method: str, rtype: str) -> None:
    path = f"/fhir/{rtype}/{quote(rid, safe='')}"
    body = orjson.dumps({"resourceType": rtype, "id": rid})
    headers = dict(FHIR_JSON)
    if method == "PATCH":
        headers["content-type"] = "application/json-patch+json"
        body = b'[{"op":"replace","path":"/active","value":true}]'
    r = fuzz.send(
        method, path, content=body if method in ("PUT", "PATCH") else None, headers=headers
    )
    valid = 0 < len(rid) <= 64 and all(c.isascii() and (c.isalnum() or c in "-.") for c in rid)
    if not valid and rtype in SUPPORTED_TYPES and method in ("PUT", "PATCH", "DELETE"):
        assert r.status_code in (400, 404, 405), (rid, r.status_code)
    for suffix in ("/_history", "/_history/" + quote(rid, safe=""), "/$everything"):
        assert_fhir_error(fuzz.client.get(f"/fhir/Patient/{quote(rid, safe='')}{suffix}"))


# -- headers -----------------------------------------------------------------------------------

header_text = st.one_of(
    st.sampled_from(NASTY_STRINGS).filter(lambda s: not any(c in s for c in "\r\n\x00")),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60),
).map(lambda s: s.encode("latin-1", "replace"))


@FUZZ
@given(
    name=st.sampled_from(
        [
            "accept",
            "content-type",
            "if-match",
            "if-none-exist",
            "if-none-match",
            "if-modified-since",
            "prefer",
            "range",
            "if-range",
            "x-security-context",
            "authorization",
            "origin",
            "x-forwarded-proto",
            "x-forwarded-host",
            "content-length",
            "transfer-encoding",
        ]
    ),
    value=header_text,
    request=st.sampled_from(
        ["create", "update", "read", "search", "binary-up", "binary-down", "metadata", "patch"]
    ),
)
def test_odd_headers(fuzz: Fuzz, name: str, value: bytes, request: str) -> None:
    headers: dict[str, Any] = dict(FHIR_JSON)
    if name in ("content-length", "transfer-encoding"):
        value = value.strip() or b"x"
    headers[name] = value
    body = orjson.dumps(_patient())
    try:
        if request == "create":
            fuzz.send("POST", "/fhir/Patient", content=body, headers=headers)
        elif request == "update":
            fuzz.send("PUT", "/fhir/Patient/h1", content=body, headers=headers)
        elif request == "read":
            fuzz.send("GET", "/fhir/Patient/p1", headers=headers)
        elif request == "search":
            fuzz.send("GET", "/fhir/Patient?family=q", headers=headers)
        elif request == "binary-up":
            if name != "content-type":
                headers["content-type"] = "application/pdf"
            fuzz.send("POST", "/fhir/Binary", content=b"%PDF-1.4 fuzz", headers=headers)
        elif request == "binary-down":
            fuzz.send("GET", "/fhir/Binary/nope", headers=headers)
        elif request == "metadata":
            fuzz.send("GET", "/fhir/metadata", headers=headers)
        else:
            headers["content-type"] = "application/json-patch+json"
            ops = b'[{"op":"replace","path":"/birthDate","value":"1970-01-02"}]'
            fuzz.send("PATCH", "/fhir/Patient/p1", content=ops, headers=headers)
    except (ValueError, UnicodeError) as exc:  # the client refused to send it
        if name in ("content-length", "transfer-encoding"):
            return
        raise exc


def test_json_body_of_every_type_rejects_control_characters(fuzz: Fuzz) -> None:
    """The control-character rule holds for every resource type and every write path."""
    for rtype in SUPPORTED_TYPES:
        body = json.dumps({"resourceType": rtype, "id": "c1", "language": "en\u0000"}).encode()
        for method, path in (("POST", f"/fhir/{rtype}"), ("PUT", f"/fhir/{rtype}/c1")):
            r = fuzz.send(method, path, content=body, headers=FHIR_JSON)
            assert r.status_code == 400, (rtype, method, r.text[:200])
    ops = b'[{"op":"add","path":"/name/0/family","value":"a\\u0000"}]'
    r = fuzz.send(
        "PATCH",
        "/fhir/Patient/p1",
        content=ops,
        headers={"content-type": "application/json-patch+json"},
    )
    assert r.status_code == 400
    for query in ("family=a%00", "_id=%00", "a%00b=1", "identifier=x|%00"):
        assert fuzz.send("GET", f"/fhir/Patient?{query}").status_code == 400, query
    nul = {"if-none-exist": "identifier=a%00b", **FHIR_JSON}
    r = fuzz.send("POST", "/fhir/Patient", content=orjson.dumps(_patient()), headers=nul)
    assert r.status_code == 400
