"""An OpenAPI 3.0 description of the FHIR REST interactions, for schemathesis.

FastAPI's ``/openapi.json`` lists the FHIR routes as generic paths (``/fhir/{rtype}/{rid}``)
without bodies, query parameters or headers: the handlers read the raw request. This
document describes what those routes take — resource bodies per type (a ``resourceType`` plus
free-form members, so the generator mixes valid and invalid elements), search parameters,
the conditional headers, JSON Patch and Bundles — so that schemathesis can generate requests
that reach the parsers and the store. Responses are described loosely: the test checks its
own invariants (no 5xx, OperationOutcome errors), not response schemas.
"""

from __future__ import annotations

from typing import Any

from fhir_consent.fhir.validation import SUPPORTED_TYPES

__all__ = ["fhir_openapi"]

_FHIR = "application/fhir+json"
_ANY: dict[str, Any] = {"description": "any answer (checked by the test)"}
_SEARCH_PARAMS = (
    "_id",
    "_count",
    "_sort",
    "_include",
    "_revinclude",
    "_lastUpdated",
    "_summary",
    "_elements",
    "_total",
    "name",
    "family",
    "given",
    "identifier",
    "birthdate",
    "gender",
    "patient",
    "subject",
    "status",
    "date",
    "category",
    "type",
    "organization",
    "actor",
)
_HEADERS = ("If-Match", "If-None-Exist", "Prefer", "If-None-Match", "X-Security-Context")

_scalar: dict[str, Any] = {
    "oneOf": [
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
    ]
}
_element: dict[str, Any] = {
    "oneOf": [
        _scalar,
        {"type": "array", "items": _scalar, "maxItems": 3},
        {"type": "object", "additionalProperties": _scalar, "maxProperties": 3},
    ]
}


def _resource(types: tuple[str, ...]) -> dict[str, Any]:
    common = {
        "id": {"type": "string"},
        "meta": {"type": "object"},
        "name": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "family": {"type": "string"},
                    "given": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "status": {"type": "string"},
        "birthDate": {"type": "string"},
        "gender": {"type": "string", "enum": ["male", "female", "other", "unknown", "x"]},
        "patient": {"type": "object", "properties": {"reference": {"type": "string"}}},
        "subject": {"type": "object", "properties": {"reference": {"type": "string"}}},
        "extension": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"url": {"type": "string"}, "valueString": {"type": "string"}},
            },
        },
    }
    return {
        "type": "object",
        "required": ["resourceType"],
        "properties": {"resourceType": {"type": "string", "enum": list(types)}, **common},
        "additionalProperties": _element,
        "maxProperties": 8,
    }


def _param(name: str, where: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema or {"type": "string"},
    }


def fhir_openapi(types: tuple[str, ...] = SUPPORTED_TYPES) -> dict[str, Any]:
    """The document; ``rtype`` is an enum of the served types plus one that is not."""
    rtype = _param("rtype", "path", {"type": "string", "enum": [*types, "Observation"]})
    rid = _param("rid", "path", {"type": "string", "minLength": 1, "maxLength": 70})
    vid = _param("vid", "path", {"type": "string", "minLength": 1})
    headers = [_param(h, "header") for h in _HEADERS]
    search = [_param(p, "query") for p in _SEARCH_PARAMS]
    body = {"required": True, "content": {_FHIR: {"schema": _resource(types)}}}
    patch_op = {
        "type": "object",
        "required": ["op", "path"],
        "properties": {
            "op": {"type": "string", "enum": ["add", "remove", "replace", "move", "copy", "test"]},
            "path": {"type": "string"},
            "from": {"type": "string"},
            "value": _element,
        },
    }
    patch = {
        "required": True,
        "content": {
            "application/json-patch+json": {
                "schema": {"type": "array", "items": patch_op, "maxItems": 3}
            }
        },
    }
    entry = {
        "type": "object",
        "properties": {
            "fullUrl": {"type": "string"},
            "resource": _resource(types),
            "request": {
                "type": "object",
                "required": ["method", "url"],
                "properties": {
                    "method": {"type": "string", "enum": ["GET", "POST", "PUT", "DELETE", "X"]},
                    "url": {"type": "string"},
                    "ifMatch": {"type": "string"},
                    "ifNoneExist": {"type": "string"},
                },
            },
        },
    }
    bundle = {
        "required": True,
        "content": {
            _FHIR: {
                "schema": {
                    "type": "object",
                    "required": ["resourceType", "type"],
                    "properties": {
                        "resourceType": {"type": "string", "enum": ["Bundle"]},
                        "type": {"type": "string", "enum": ["batch", "transaction", "history"]},
                        "entry": {"type": "array", "items": entry, "maxItems": 3},
                    },
                }
            }
        },
    }
    form = {
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {p: {"type": "string"} for p in _SEARCH_PARAMS},
                }
            }
        }
    }
    ok = {"default": _ANY}
    return {
        "openapi": "3.0.3",
        "info": {"title": "fhir-consent FHIR REST (R4 http.html)", "version": "1"},
        "paths": {
            "/fhir/metadata": {"get": {"responses": ok}},
            "/fhir": {"post": {"requestBody": bundle, "responses": ok}},
            "/fhir/{rtype}": {
                "get": {"parameters": [rtype, *search], "responses": ok},
                "post": {"parameters": [rtype, *headers], "requestBody": body, "responses": ok},
            },
            "/fhir/{rtype}/_search": {
                "post": {"parameters": [rtype], "requestBody": form, "responses": ok}
            },
            "/fhir/{rtype}/_history": {
                "get": {
                    "parameters": [
                        rtype,
                        _param("_since", "query"),
                        _param("_count", "query"),
                        _param("_cursor", "query"),
                    ],
                    "responses": ok,
                }
            },
            "/fhir/{rtype}/{rid}": {
                "get": {"parameters": [rtype, rid], "responses": ok},
                "put": {
                    "parameters": [rtype, rid, *headers],
                    "requestBody": body,
                    "responses": ok,
                },
                "patch": {
                    "parameters": [rtype, rid, *headers],
                    "requestBody": patch,
                    "responses": ok,
                },
                "delete": {"parameters": [rtype, rid], "responses": ok},
            },
            "/fhir/{rtype}/{rid}/_history": {"get": {"parameters": [rtype, rid], "responses": ok}},
            "/fhir/{rtype}/{rid}/_history/{vid}": {
                "get": {"parameters": [rtype, rid, vid], "responses": ok}
            },
            "/fhir/Patient/{rid}/$everything": {"get": {"parameters": [rid], "responses": ok}},
        },
    }
