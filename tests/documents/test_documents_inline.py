"""Binary.data where a Binary is served as FHIR JSON outside ``GET Binary/{id}``
(fhir_consent/documents/inline.py): write responses, search and history bundles, batch
responses — with the read's access rule and download audit, and a size cap above which
``data`` is left out and the Binary is tagged SUBSETTED."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from documents_kit import FHIR_JSON, DocEnv, b64, doc_settings, document, make_env, pdf_bytes

from fhir_consent.config import Settings

CAP = 6000  # bytes: one small content fits, a large one does not


@pytest.fixture
def env(settings: Settings, tmp_path: Path) -> Iterator[DocEnv]:
    documents = doc_settings(
        tmp_path, "db", inline_data_max_bytes=CAP, inline_data_budget_bytes=2 * CAP
    )
    with make_env(settings, documents, tmp_path, whole=False) as e:
        yield e


def subsetted(resource: dict[str, Any]) -> bool:
    return any(t.get("code") == "SUBSETTED" for t in resource.get("meta", {}).get("tag", []))


def upload(env: DocEnv, content: bytes) -> dict[str, Any]:
    r = env.client.post(
        "/fhir/Binary",
        content=content,
        headers={"content-type": "application/pdf", "accept": "application/fhir+json"},
    )
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def search(env: DocEnv, query: str) -> dict[str, dict[str, Any]]:
    r = env.client.get(f"/fhir/{query}", headers=FHIR_JSON)
    assert r.status_code == 200, r.text
    return {e["resource"]["id"]: e["resource"] for e in r.json().get("entry", [])}


def test_small_content_is_inline_large_is_subsetted_and_read_streams_it(env: DocEnv) -> None:
    small, large = pdf_bytes("s", 4000), pdf_bytes("l", 3 * CAP)
    created_small, created_large = upload(env, small), upload(env, large)
    assert created_small["data"] == b64(small) and not subsetted(created_small)
    assert "data" not in created_large and subsetted(created_large)
    ids = f"{created_small['id']},{created_large['id']}"
    for bundle in (search(env, f"Binary?_id={ids}"), search(env, "Binary/_history")):
        assert bundle[created_small["id"]]["data"] == b64(small)
        assert "data" not in bundle[created_large["id"]]
        assert subsetted(bundle[created_large["id"]])
    # GET Binary/{id} as FHIR JSON streams the content whatever its size, untagged.
    r = env.client.get(f"/fhir/Binary/{created_large['id']}", headers=FHIR_JSON)
    assert r.status_code == 200 and r.json()["data"] == b64(large)
    assert not subsetted(r.json())


def test_every_version_in_history_carries_its_own_content(env: DocEnv) -> None:
    v1, v2 = pdf_bytes("one", 2000), pdf_bytes("two", 2500)
    bid = upload(env, v1)["id"]
    r = env.client.put(f"/fhir/Binary/{bid}", content=v2, headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.json()["data"] == b64(v2)
    r = env.client.get(f"/fhir/Binary/{bid}/_history", headers=FHIR_JSON)
    got = {e["resource"]["meta"]["versionId"]: e["resource"]["data"] for e in r.json()["entry"]}
    assert got == {"1": b64(v1), "2": b64(v2)}


def test_the_response_budget_bounds_a_page(env: DocEnv) -> None:
    ids = [upload(env, pdf_bytes(str(i), 5000))["id"] for i in range(3)]
    found = search(env, f"Binary?_id={','.join(ids)}")
    inline = [b for b in found.values() if "data" in b]
    assert len(inline) == 2  # 2 × 5000 fit in the budget of 2 × CAP; the third does not
    assert [subsetted(b) for b in found.values()].count(True) == 1


def test_refused_access_leaves_data_out_and_only_disclosures_are_audited(env: DocEnv) -> None:
    content = pdf_bytes("secret", 3000)
    bid = upload(env, content)["id"]
    assert env.audit == []  # the create echoed what the caller sent: no download
    assert search(env, f"Binary?_id={bid}")[bid]["data"] == b64(content)
    assert [(e.binary_id, e.representation, e.outcome) for e in env.audit] == [
        (bid, "resource", "success")
    ]
    env.audit.clear()
    env.docs.access = lambda conn, access, binary_id, interaction: False
    shown = search(env, f"Binary?_id={bid}")[bid]
    assert "data" not in shown and subsetted(shown)
    r = env.client.request(
        "PATCH",
        f"/fhir/Binary/{bid}",
        content=b'[{"op": "add", "path": "/language", "value": "en"}]',
        headers={"content-type": "application/json-patch+json"},
    )
    assert r.status_code == 404  # the same rule as a read: the Binary is not revealed
    assert env.audit == []


def test_search_scope_without_read_scope_gets_no_content(env: DocEnv) -> None:
    content = pdf_bytes("scoped", 3000)
    bid = upload(env, content)["id"]
    env.caller.user("user/Binary.s")
    shown = search(env, f"Binary?_id={bid}")[bid]
    assert "data" not in shown and subsetted(shown)
    env.caller.user("user/Binary.rs")
    assert search(env, f"Binary?_id={bid}")[bid]["data"] == b64(content)


def test_batch_responses_and_minimal_writes(env: DocEnv) -> None:
    pid = env.post_json("Patient", {"resourceType": "Patient"})["id"]
    content = pdf_bytes("batch", 2000)
    bid = env.post_json("DocumentReference", document(pid, content))["content"][0]["attachment"][
        "url"
    ].split("/")[1]
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": f"Binary?_id={bid}"}}],
    }
    r = env.client.post("/fhir", json=batch, headers=FHIR_JSON)
    assert r.status_code == 200, r.text
    inner = r.json()["entry"][0]["resource"]
    assert inner["entry"][0]["resource"]["data"] == b64(content)
    r = env.client.post(
        "/fhir/Binary",
        content=content,
        headers={"content-type": "application/pdf", "prefer": "return=minimal"},
    )
    assert r.status_code == 201 and r.content == b""
