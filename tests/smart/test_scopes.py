"""The SMART App Launch 2.2 scope grammar, decisions, narrowing and wording."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smart_on_fhir import (
    Context,
    ExtensionScope,
    Interaction,
    LaunchScope,
    NamedScope,
    ResourceScope,
    Scope,
    ScopeError,
    ScopeSet,
    SmartError,
    describe,
    describe_all,
    narrow,
    parse_scope,
    parse_scopes,
    scope_from_uri,
    scope_to_uri,
)

LAB = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"

# Every scope string on SMART App Launch 2.2 "Scopes and Launch Context"
# (input/pages/scopes-and-launch-context.md), in page order. The experimental examples are
# written there without a context prefix ("Observation.rs?code:in=..."); here they get one.
SPEC_PAGE_SCOPES = [
    "launch/patient",
    "patient/*.rs",
    "user/*.cruds",
    "openid",
    "fhirUser",
    "launch",
    "offline_access",
    "online_access",
    "system/*.cruds",
    "patient/Observation.cu",
    "patient/Observation.rs",
    "patient/Condition.rs",
    "patient/AllergyIntolerance.rs",
    "patient/Observation.read",
    "patient/Immunization.read",
    f"patient/Observation.rs?category={LAB}",
    "patient/Observation.rs?code:in=http://valueset.example.org/ValueSet/diabetes-codes",
    "patient/Observation.rs?patient.birthdate=1990",
    "patient/Patient.r",
    "patient/Observation.c",
    "patient/*.cruds",
    "user/Observation.rs",
    "user/Appointment.cruds",
    "user/Patient.rs",
    "system/Observation.rs",
    "system/*.rs",
    "system/Encounter.cud",
    "patient/AllergyIntolerance.cruds",
    "patient/AllergyIntolerance.cud",
    "launch/encounter",
    "launch/diagnosticreport",
    "launch/relatedperson?role=friend",
    "launch/relatedperson?role=neighbor",
    "launch/imagingstudy",
    "launch/list?role=https://example.org/med-list-at-home",
    "launch/list?role=https://example.org/med-list-at-hospital",
    "https://ehr.example.org/scopes/profilePhoto.manage",
    "__profilePhoto.manage",
    "patient/*.r",
    # SMART v1 spellings the brief and fhirclient's default scope use
    "patient/*.read",
    "user/*.*",
    "user/DocumentReference.write",
    "system/*.*",
    "profile",
]

INVALID = [
    ("", "printable ASCII"),
    ("patient/Observation.dus", "in-order subset"),  # the page's own example
    ("patient/Observation.rr", "in-order subset"),
    ("patient/Observation.sr", "in-order subset"),
    ("patient/Observation.", "no permissions"),
    ("patient/Observation.rx", "in-order subset"),
    ("patient/Observation.readwrite", "in-order subset"),
    ("patient/Observation", "context/Type.permissions"),
    ("Patient/Observation.read", "lowercase"),
    ("USER/*.rs", "lowercase"),
    ("patient.Immunization.read", "not a SMART scope"),
    ("clinic/Observation.rs", "not a SMART scope"),
    ("patient/observation.rs", "not a FHIR resource type"),
    ("patient/Obs-ervation.rs", "not a FHIR resource type"),
    ("patient/.rs", "not a FHIR resource type"),
    ("patient/**.rs", "not a FHIR resource type"),
    ("patient/*.rs?", "nothing after"),
    ("patient/*.rs?category", "param=value"),
    ("patient/*.rs?category=", "needs a value"),
    ("patient/*.rs?=lab", "search parameter name"),
    ("patient/*.rs?a=1&&b=2", "param=value"),
    ("patient/Observation.read?category=lab", "v2 permissions"),
    ("launch/Patient", "lowercase"),
    ("launch/patient?role=", "non-empty role"),
    ("launch/patient?kind=x", "role"),
    ("launch?role=x", "context type"),
    ("launch/", "lowercase"),
    ("openid fhirUser", "printable ASCII"),
    ('patient/*.rs?x="y"', "printable ASCII"),
    ("patient/*.rs?x=é", "printable ASCII"),
    ("__", "name after"),
    ("offline", "not a SMART scope"),
    ("fhiruser", "not a SMART scope"),
    ("mailto", "not a SMART scope"),
]


# -- grammar ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", SPEC_PAGE_SCOPES)
def test_every_spec_page_scope_parses_and_prints_back(text: str) -> None:
    scope = parse_scope(text)
    assert str(scope) == text
    assert parse_scope(str(scope)) == scope


def test_quick_start_scope_string_parses_as_a_set() -> None:
    scopes = parse_scopes("openid fhirUser launch/patient patient/*.rs offline_access")
    assert [str(s) for s in scopes] == [
        "openid",
        "fhirUser",
        "launch/patient",
        "patient/*.rs",
        "offline_access",
    ]
    assert scopes.has("openid") and scopes.has("fhirUser") and scopes.requests_refresh_token


def test_resource_scope_parts() -> None:
    scope = parse_scope(f"patient/Observation.rs?category={LAB}&status=final")
    assert scope == ResourceScope(
        Context.PATIENT, "Observation", "rs", (("category", LAB), ("status", "final"))
    )
    assert isinstance(scope, ResourceScope)
    assert scope.interactions == {Interaction.READ, Interaction.SEARCH}
    assert scope.is_granular and not scope.is_wildcard and not scope.is_v1
    assert scope.filters() == {"category": [LAB], "status": ["final"]}


def test_wildcards_in_every_context() -> None:
    for context in ("patient", "user", "system"):
        scope = parse_scope(f"{context}/*.cruds")
        assert isinstance(scope, ResourceScope)
        assert scope.is_wildcard and scope.context is Context(context)
        assert scope.interactions == frozenset(Interaction)


def test_launch_identity_and_extension_scopes() -> None:
    assert parse_scope("launch") == LaunchScope()
    assert parse_scope("launch/patient") == LaunchScope("patient")
    assert parse_scope("launch/list?role=https://example.org/r") == LaunchScope(
        "list", "https://example.org/r"
    )
    for name in ("openid", "fhirUser", "profile", "offline_access", "online_access"):
        assert parse_scope(name) == NamedScope(name)
    assert parse_scope("__darkMode") == ExtensionScope("__darkMode")
    assert parse_scope("urn:example:scope") == ExtensionScope("urn:example:scope")


@pytest.mark.parametrize(("text", "reason"), INVALID)
def test_invalid_scopes_raise_a_typed_error(text: str, reason: str) -> None:
    with pytest.raises(ScopeError) as caught:
        parse_scope(text)
    assert reason in caught.value.reason
    assert caught.value.scope == text
    assert isinstance(caught.value, SmartError) and isinstance(caught.value, ValueError)


def test_non_string_is_a_scope_error() -> None:
    with pytest.raises(ScopeError):
        parse_scope(42)  # type: ignore[arg-type]


def test_invalid_scopes_in_a_string_raise_or_are_ignored() -> None:
    text = "openid patient/Observation.dus patient/*.rs launch/Patient"
    with pytest.raises(ScopeError) as caught:
        parse_scopes(text)
    assert caught.value.scope == "patient/Observation.dus"
    lenient = parse_scopes(text, on_invalid="ignore")
    assert str(lenient) == "openid patient/*.rs"
    assert lenient.invalid == ("patient/Observation.dus", "launch/Patient")
    with pytest.raises(ValueError):
        parse_scopes(text, on_invalid="skip")  # type: ignore[arg-type]


def test_constructors_validate_too() -> None:
    with pytest.raises(ScopeError):
        ResourceScope("clinic", "Observation", "rs")  # type: ignore[arg-type]
    with pytest.raises(ScopeError):
        ResourceScope(Context.USER, "Observation", "sr")
    with pytest.raises(ScopeError):
        LaunchScope(None, "https://example.org/role")
    with pytest.raises(ScopeError):
        NamedScope("email_verified")
    with pytest.raises(ScopeError):
        ExtensionScope("not-a-uri")


def test_empty_and_none_scope_strings() -> None:
    assert len(parse_scopes("")) == 0
    assert len(parse_scopes(None)) == 0
    assert not parse_scopes("   ")
    assert str(parse_scopes("openid   profile")) == "openid profile"


def test_scope_set_is_ordered_deduplicated_and_compares_as_a_set() -> None:
    a = parse_scopes("openid patient/*.rs openid")
    assert str(a) == "openid patient/*.rs"
    assert a == parse_scopes("patient/*.rs openid")
    assert hash(a) == hash(parse_scopes("patient/*.rs openid"))
    assert "openid" in a and "patient/*.rs" in a and "not a scope" not in a
    assert parse_scope("openid") in a
    assert str(a | parse_scopes("profile openid")) == "openid patient/*.rs profile"
    assert ScopeSet(["openid", NamedScope("profile")]) == parse_scopes("profile openid")


# -- v1 / v2 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("v1", "v2"),
    [
        ("patient/*.read", "patient/*.rs"),
        ("patient/Observation.write", "patient/Observation.cud"),
        ("user/*.*", "user/*.cruds"),
        ("system/*.*", "system/*.cruds"),
        ("user/DocumentReference.write", "user/DocumentReference.cud"),
    ],
)
def test_v1_suffixes_mean_their_v2_equivalents(v1: str, v2: str) -> None:
    old, new = parse_scope(v1), parse_scope(v2)
    assert isinstance(old, ResourceScope) and isinstance(new, ResourceScope)
    assert old.is_v1 and not new.is_v1
    assert old.interactions == new.interactions
    assert old != new  # the spelling is kept, so a v1 grant can be returned as v1
    assert old.to_v2() == new
    assert parse_scopes(v1).to_v2() == parse_scopes(v2)


def test_to_v2_factors_scopes_to_their_shortest_form() -> None:
    scopes = parse_scopes(
        "openid patient/Observation.r patient/Observation.s patient/*.read patient/*.write "
        f"patient/Observation.r?category={LAB} launch/patient"
    )
    assert str(scopes.to_v2()) == (
        f"openid patient/Observation.rs patient/*.cruds patient/Observation.r?category={LAB} "
        "launch/patient"
    )


def test_v1_and_v2_can_be_mixed() -> None:
    scopes = parse_scopes("patient/Patient.read patient/Observation.c user/Appointment.cruds")
    assert scopes.allows("Patient", Interaction.READ)
    assert scopes.allows("Patient", Interaction.SEARCH)
    assert not scopes.allows("Patient", Interaction.UPDATE)
    assert scopes.allows("Observation", Interaction.CREATE)
    assert not scopes.allows("Observation", Interaction.READ)  # write does not imply read
    assert scopes.allows("Appointment", Interaction.DELETE)


# -- decisions -------------------------------------------------------------------------------


def test_allows_every_interaction_of_v1_read_and_write() -> None:
    read = parse_scopes("patient/*.read")
    write = parse_scopes("user/DocumentReference.write")
    for interaction in Interaction:
        expected_read = interaction in (Interaction.READ, Interaction.SEARCH)
        assert read.allows("Observation", interaction) is expected_read
        assert write.allows("DocumentReference", interaction) is not expected_read
        assert not write.allows("Observation", interaction)


def test_interactions_accept_their_string_values() -> None:
    scopes = parse_scopes("patient/Observation.rs")
    assert scopes.allows("Observation", "read") and scopes.allows("Observation", "search")
    assert not scopes.allows("Observation", "create")
    with pytest.raises(ValueError):
        scopes.allows("Observation", "r")


def test_level_is_the_most_permissive_context() -> None:
    scopes = parse_scopes("patient/*.rs user/Observation.r system/Patient.s")
    assert scopes.level("Observation", Interaction.READ) is Context.USER
    assert scopes.level("Observation", Interaction.SEARCH) is Context.PATIENT
    assert scopes.level("Patient", Interaction.SEARCH) is Context.SYSTEM
    assert scopes.level("Patient", Interaction.READ) is Context.PATIENT
    assert scopes.level("Patient", Interaction.DELETE) is None
    assert Context.PATIENT.rank < Context.USER.rank < Context.SYSTEM.rank


def test_system_wide_search_needs_a_wildcard() -> None:
    assert parse_scopes("system/*.rs").allows("*", Interaction.SEARCH)
    assert not parse_scopes("system/Patient.rs").allows("*", Interaction.SEARCH)
    granular = parse_scopes(f"system/*.rs?category={LAB}&x=1").decide("*", "search")
    assert granular.allowed and granular.restricted
    assert granular.query_restrictions() == [{"category": [LAB], "x": ["1"]}]


def test_granular_scope_restricts_search_to_its_filter() -> None:
    scopes = parse_scopes(f"patient/Observation.rs?category={LAB}")
    decision = scopes.decide("Observation", Interaction.SEARCH)
    assert decision.allowed and decision.restricted
    assert decision.context is Context.PATIENT
    assert scopes.query_restrictions("Observation", Interaction.SEARCH) == [{"category": [LAB]}]
    assert scopes.query_restrictions("Observation", Interaction.READ) == [{"category": [LAB]}]
    assert not scopes.allows("Observation", Interaction.CREATE)
    assert not scopes.allows("Condition", Interaction.SEARCH)


def test_any_full_type_scope_lifts_the_granular_restriction() -> None:
    scopes = parse_scopes(f"patient/Observation.rs?category={LAB} patient/Observation.s")
    assert scopes.query_restrictions("Observation", Interaction.SEARCH) == []
    assert scopes.decide("Observation", Interaction.SEARCH).restricted is False
    # read is still only granted through the granular scope
    assert scopes.query_restrictions("Observation", Interaction.READ) == [{"category": [LAB]}]
    # a wildcard also counts as a full-type scope
    wildcard = parse_scopes(f"patient/Observation.rs?category={LAB} patient/*.rs")
    assert wildcard.query_restrictions("Observation", Interaction.SEARCH) == []


def test_restrictions_are_the_union_of_granular_filters() -> None:
    vital = "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"
    scopes = parse_scopes(
        f"patient/Observation.rs?category={LAB} patient/Observation.rs?category={vital}"
        f" patient/Observation.s?category={LAB}&status=final"
    )
    assert scopes.query_restrictions("Observation", Interaction.SEARCH) == [
        {"category": [LAB]},
        {"category": [vital]},
        {"category": [LAB], "status": ["final"]},
    ]
    assert scopes.query_restrictions("Observation", Interaction.READ) == [
        {"category": [LAB]},
        {"category": [vital]},
    ]


def test_restrictions_keep_the_most_permissive_granular_context_only() -> None:
    scopes = parse_scopes(f"patient/Observation.rs?category={LAB} user/Observation.s?status=final")
    decision = scopes.decide("Observation", Interaction.SEARCH)
    assert decision.context is Context.USER
    assert decision.query_restrictions() == [{"status": ["final"]}]


def test_granular_values_are_percent_decoded_and_repeatable() -> None:
    scopes = parse_scopes("patient/Observation.rs?code=http://loinc.org%7C1234-5&code=x,y")
    assert scopes.query_restrictions("Observation", "search") == [
        {"code": ["http://loinc.org|1234-5", "x,y"]}
    ]


def test_query_restrictions_return_fresh_copies() -> None:
    scopes = parse_scopes(f"patient/Observation.rs?category={LAB}")
    scopes.query_restrictions("Observation", "search")[0]["category"].append("tampered")
    assert scopes.query_restrictions("Observation", "search") == [{"category": [LAB]}]


def test_context_helpers() -> None:
    ehr = parse_scopes("launch launch/patient launch/encounter openid fhirUser user/*.rs")
    assert ehr.ehr_launch and ehr.launch_contexts == {"patient", "encounter"}
    assert ehr.needs_patient_context
    assert not parse_scopes("user/*.rs openid").needs_patient_context
    assert parse_scopes("patient/Patient.r").needs_patient_context
    assert parse_scopes("online_access").requests_refresh_token
    assert not parse_scopes("openid").requests_refresh_token
    assert not parse_scopes("openid").has("not-a-scope")
    assert len(ehr.launch_scopes) == 3 and len(ehr.resource_scopes) == 1


def test_fhir_interaction_codes_map_to_permissions() -> None:
    expected = {
        "read": "read",
        "vread": "read",
        "history-instance": "read",
        "search-type": "search",
        "history-type": "search",
        "search-system": "search",
        "history-system": "search",
        "create": "create",
        "update": "update",
        "patch": "update",
        "delete": "delete",
    }
    for code, interaction in expected.items():
        assert Interaction.for_fhir_interaction(code) is Interaction(interaction)
    for code in ("transaction", "batch"):
        with pytest.raises(KeyError):
            Interaction.for_fhir_interaction(code)
    assert [i.letter for i in Interaction] == list("crud" + "s")
    assert Interaction.from_letter("u") is Interaction.UPDATE


# -- narrowing -------------------------------------------------------------------------------


def _narrow(requested: str, allowed: str) -> str:
    return str(narrow(parse_scopes(requested), parse_scopes(allowed)))


@pytest.mark.parametrize(
    ("requested", "allowed", "granted"),
    [
        # the brief: a client registered for patient/*.rs asking patient/Observation.read
        ("patient/Observation.read", "patient/*.rs", "patient/Observation.read"),
        ("patient/Observation.cruds", "patient/*.rs", "patient/Observation.rs"),
        ("patient/Observation.write", "patient/*.rs", ""),
        ("patient/*.*", "patient/*.rs", "patient/*.rs"),
        (
            "patient/*.rs",
            "patient/Observation.rs patient/Condition.r",
            "patient/Observation.rs patient/Condition.r",
        ),
        ("patient/*.read", "patient/*.r patient/*.s", "patient/*.read"),
        ("patient/Observation.rs", "user/*.cruds", ""),  # contexts never cross
        ("user/*.cruds", "user/*.*", "user/*.cruds"),
        (
            "system/*.rs",
            "system/Patient.rs system/Observation.r",
            "system/Patient.rs system/Observation.r",
        ),
        (
            f"patient/Observation.rs?category={LAB}",
            "patient/Observation.rs",
            f"patient/Observation.rs?category={LAB}",
        ),
        (
            "patient/Observation.rs",
            f"patient/Observation.rs?category={LAB}",
            f"patient/Observation.rs?category={LAB}",
        ),
        (
            f"patient/Observation.rs?category={LAB}",
            "patient/Observation.rs?status=final",
            f"patient/Observation.rs?category={LAB}&status=final",
        ),
        (
            "patient/Observation.rs",
            f"patient/*.s patient/Observation.r?category={LAB}",
            f"patient/Observation.s patient/Observation.r?category={LAB}",
        ),
        (
            "patient/Observation.rs",
            f"patient/*.rs patient/Observation.r?category={LAB}",
            "patient/Observation.rs",
        ),
        ("openid fhirUser profile", "openid fhirUser", "openid fhirUser"),
        ("launch launch/patient launch/encounter", "launch/patient", "launch/patient"),
        (
            "launch/list?role=https://example.org/a",
            "launch/list",
            "launch/list?role=https://example.org/a",
        ),
        ("launch/list", "launch/list?role=https://example.org/a", ""),
        ("__dark offline_access", "__dark online_access", "__dark"),
        ("", "patient/*.cruds openid", ""),
    ],
)
def test_narrow(requested: str, allowed: str, granted: str) -> None:
    assert _narrow(requested, allowed) == granted


def test_narrow_keeps_requested_order_and_covered_by() -> None:
    requested = parse_scopes("offline_access patient/Condition.rs openid launch/patient")
    allowed = parse_scopes("launch/patient openid offline_access patient/*.cruds")
    assert str(requested.narrow(allowed)) == str(requested)
    assert requested.covered_by(allowed)
    assert not parse_scopes("patient/*.cruds").covered_by(parse_scopes("patient/*.rs"))
    assert parse_scopes("patient/Observation.rs").covered_by(parse_scopes("patient/*.read"))


# -- wording ---------------------------------------------------------------------------------


def test_describe_examples_from_the_brief() -> None:
    assert (
        describe("patient/DocumentReference.rs")
        == "Read and search your documents (DocumentReference)"
    )
    assert describe_all(parse_scopes("openid fhirUser")) == ["Know who you are (openid/fhirUser)"]
    assert describe("openid") == "Know who you are (openid)"


def test_describe_wording() -> None:
    assert describe("user/DocumentReference.write") == (
        "Create, update and delete documents you have access to (DocumentReference)"
    )
    assert describe("system/Observation.rs") == (
        "Read and search all lab results, vital signs and other observations on this server"
        " (Observation)"
    )
    assert describe("patient/Patient.r") == "Read your demographics (Patient)"
    assert "now and in the future" in describe("patient/*.rs")  # SAL §"Wildcard scopes"
    assert describe(f"patient/Observation.rs?category={LAB}").endswith(
        "(Observation), only where category is laboratory"
    )
    assert describe("patient/ImagingStudy.r") == "Read your imaging study records (ImagingStudy)"
    assert describe("launch/patient") == "Know which patient record is selected (launch/patient)"
    assert "offline_access" in describe("offline_access")
    assert describe("__dark") == "Use the custom permission __dark"


@pytest.mark.parametrize("text", SPEC_PAGE_SCOPES)
def test_every_spec_scope_has_a_description(text: str) -> None:
    line = describe(parse_scope(text))
    assert line and line[0].isupper()


def test_describe_all_removes_duplicate_lines() -> None:
    lines = describe_all(parse_scopes("patient/*.read patient/*.rs openid"))
    assert len(lines) == 2


# -- URI representation (SAL appendix) ---------------------------------------------------------


def test_uri_representation() -> None:
    assert scope_to_uri("patient/*.r") == "http://smarthealthit.org/fhir/scopes/patient/*.r"
    assert scope_to_uri("openid") == "http://openid.net/specs/openid-connect-core-1_0#openid"
    assert scope_to_uri("https://ehr.example.org/s") == "https://ehr.example.org/s"
    for text in SPEC_PAGE_SCOPES:
        assert scope_from_uri(scope_to_uri(text)) == parse_scope(text)


# -- properties ------------------------------------------------------------------------------

_VALUE_CHARS = "".join(
    c for c in string.printable if 0x21 <= ord(c) <= 0x7E and c not in '"\\&' and c != " "
)
_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,12}", fullmatch=True)
_values = st.text(alphabet=_VALUE_CHARS, min_size=1, max_size=20)
_types = st.one_of(st.just("*"), st.from_regex(r"[A-Z][A-Za-z]{0,20}", fullmatch=True))
_v2_perms = st.sets(st.sampled_from("cruds"), min_size=1).map(
    lambda s: "".join(c for c in "cruds" if c in s)
)


@st.composite
def resource_scopes(draw: st.DrawFn) -> ResourceScope:
    context = draw(st.sampled_from(list(Context)))
    resource_type = draw(_types)
    if draw(st.booleans()):
        return ResourceScope(context, resource_type, draw(st.sampled_from(["read", "write", "*"])))
    query = tuple(draw(st.lists(st.tuples(_names, _values), max_size=3)))
    return ResourceScope(context, resource_type, draw(_v2_perms), query)


scopes_strategy: st.SearchStrategy[Scope] = st.one_of(
    resource_scopes(),
    st.builds(
        LaunchScope,
        st.one_of(st.none(), st.from_regex(r"[a-z][a-z0-9]{0,15}", fullmatch=True)),
    ),
    st.builds(
        LaunchScope,
        st.from_regex(r"[a-z][a-z0-9]{0,15}", fullmatch=True),
        st.text(alphabet=_VALUE_CHARS, min_size=1, max_size=20),
    ),
    st.sampled_from([NamedScope(n) for n in ("openid", "fhirUser", "profile", "online_access")]),
    st.from_regex(r"__[A-Za-z0-9.]{1,10}", fullmatch=True).map(ExtensionScope),
    st.from_regex(r"https://[a-z]{1,8}\.example/[a-z]{0,8}", fullmatch=True).map(ExtensionScope),
)


@given(scopes_strategy)
def test_parse_of_str_is_identity(scope: Scope) -> None:
    assert parse_scope(str(scope)) == scope


@given(st.lists(scopes_strategy, max_size=6))
def test_scope_set_string_round_trips(scopes: list[Scope]) -> None:
    scope_set = ScopeSet(scopes)
    again = parse_scopes(str(scope_set))
    assert again == scope_set
    assert list(again) == list(scope_set)


@given(st.text(max_size=40))
@settings(max_examples=300)
def test_parser_only_ever_raises_scope_error(text: str) -> None:
    try:
        parse_scope(text)
    except ScopeError:
        pass


@given(st.lists(resource_scopes(), max_size=4), st.lists(resource_scopes(), max_size=4))
def test_narrowing_is_idempotent_and_never_widens(
    requested: list[ResourceScope], allowed: list[ResourceScope]
) -> None:
    want, may = ScopeSet(requested), ScopeSet(allowed)
    granted = narrow(want, may)
    assert narrow(granted, may) == granted
    assert narrow(want, want) == want
    for resource_type in ("Observation", "Patient", "*"):
        for interaction in Interaction:
            decision = granted.decide(resource_type, interaction)
            if decision.allowed and not decision.restricted:
                assert want.decide(resource_type, interaction).allowed
                assert may.decide(resource_type, interaction).allowed
