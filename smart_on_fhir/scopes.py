"""SMART App Launch 2.2 scope grammar, v1 and v2, as pure functions and immutable values.

Everything here follows SMART App Launch 2.2.0, "Scopes and Launch Context"
(https://hl7.org/fhir/smart-app-launch/STU2.2/scopes-and-launch-context.html), cited below
as *SAL §name*, and RFC 6749 §3.3 for the scope-token character set.

One scope token parses to one of four immutable values (together, :data:`Scope`):

``ResourceScope``
    ``(patient|user|system)/(Type|*).(cruds-subset|read|write|*)[?param=value(&param=value)*]``
    (SAL §"FHIR Resource Scope Syntax"). v1 suffixes keep their spelling, so a v1 request can
    be granted back as v1 (SAL: servers "SHOULD return v1 scopes when v1 scopes are
    requested and granted"), and map to ``.rs``, ``.cud`` and ``.cruds``.
``LaunchScope``
    ``launch``, ``launch/patient``, ``launch/encounter`` and ``launch/<lowercase type>``
    with at most one ``?role=<uri>`` (SAL §"Scopes for requesting context data").
``NamedScope``
    ``openid``, ``fhirUser``, ``profile``, ``offline_access``, ``online_access`` and the
    other OpenID Connect Core §5.4 scopes (SAL §"Scopes for requesting identity data",
    §"Scopes for requesting a refresh token").
``ExtensionScope``
    A full URI or a string starting with ``__`` (SAL §"Extensibility").

:class:`ScopeSet` answers the resource server's question per request:
:meth:`ScopeSet.decide` (or :meth:`~ScopeSet.allows`, :meth:`~ScopeSet.level`,
:meth:`~ScopeSet.query_restrictions`) for one resource type and one :class:`Interaction`.
:func:`narrow` intersects what a client asks for with what it may have, and
:func:`describe` words a scope for the authorization screen.

Invalid tokens raise :class:`~smart_on_fhir.errors.ScopeError`, or are dropped and
recorded in :attr:`ScopeSet.invalid` with ``on_invalid="ignore"`` (SAL: undefined or
out-of-order suffixes "MAY be ignored, replaced with server default scopes, or rejected").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from types import MappingProxyType
from typing import Final, Literal, TypeAlias
from urllib.parse import unquote, urlsplit

from .errors import ScopeError

__all__ = [
    "FHIR_INTERACTION_MAP",
    "IDENTITY_SCOPES",
    "NAMED_SCOPES",
    "SMART_SCOPE_URI_PREFIX",
    "Context",
    "ExtensionScope",
    "Interaction",
    "LaunchScope",
    "NamedScope",
    "ResourceScope",
    "Scope",
    "ScopeDecision",
    "ScopeSet",
    "describe",
    "describe_all",
    "narrow",
    "parse_scope",
    "parse_scopes",
    "scope_from_uri",
    "scope_to_uri",
]


class Interaction(StrEnum):
    """The five SMART v2 permissions (SAL §"Scopes for requesting FHIR Resources").

    ``read`` covers read, vread and instance history; ``search`` covers type search, type
    history and system search and history; ``update`` covers update and patch (and upsert).
    Batch and transaction are checked entry by entry (SAL §"Batches and Transactions").
    """

    CREATE = "create"
    READ = "read"
    UPDATE = "update"
    DELETE = "delete"
    SEARCH = "search"

    @property
    def letter(self) -> str:
        """The one-letter v2 permission code: ``c``, ``r``, ``u``, ``d`` or ``s``."""
        return self.value[0]

    @classmethod
    def from_letter(cls, letter: str) -> Interaction:
        """The interaction for a v2 permission letter; :class:`KeyError` if unknown."""
        return _BY_LETTER[letter]

    @classmethod
    def for_fhir_interaction(cls, code: str) -> Interaction:
        """Map an R4 ``TypeRestfulInteraction``/``SystemRestfulInteraction`` code.

        ``transaction`` and ``batch`` raise :class:`KeyError`: check their entries instead.
        """
        return FHIR_INTERACTION_MAP[code]


_BY_LETTER: Final[dict[str, Interaction]] = {i.letter: i for i in Interaction}
_LETTERS: Final = "cruds"

#: R4 restful interaction codes (http://hl7.org/fhir/R4/valueset-type-restful-interaction.html
#: and system-restful-interaction) to the SMART permission that covers them.
FHIR_INTERACTION_MAP: Final[Mapping[str, Interaction]] = {
    "read": Interaction.READ,
    "vread": Interaction.READ,
    "history-instance": Interaction.READ,
    "update": Interaction.UPDATE,
    "patch": Interaction.UPDATE,
    "delete": Interaction.DELETE,
    "create": Interaction.CREATE,
    "search-type": Interaction.SEARCH,
    "history-type": Interaction.SEARCH,
    "search-system": Interaction.SEARCH,
    "history-system": Interaction.SEARCH,
}


class Context(StrEnum):
    """The context prefix of a resource scope, ordered from narrowest to broadest."""

    PATIENT = "patient"
    USER = "user"
    SYSTEM = "system"

    @property
    def rank(self) -> int:
        """0 for ``patient``, 1 for ``user``, 2 for ``system``: higher is more permissive."""
        return _CONTEXT_RANK[self]


_CONTEXT_RANK: Final[dict[Context, int]] = {Context.PATIENT: 0, Context.USER: 1, Context.SYSTEM: 2}

_V1_SUFFIXES: Final[dict[str, frozenset[Interaction]]] = {
    "read": frozenset({Interaction.READ, Interaction.SEARCH}),
    "write": frozenset({Interaction.CREATE, Interaction.UPDATE, Interaction.DELETE}),
    "*": frozenset(Interaction),
}

#: OAuth scope-token characters, RFC 6749 §3.3: NQCHAR = %x21 / %x23-5B / %x5D-7E.
_NQCHARS_RE: Final = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]+")
_RESOURCE_TYPE_RE: Final = re.compile(r"[A-Z][A-Za-z]{0,63}")
_PARAM_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]*")
_LAUNCH_TYPE_RE: Final = re.compile(r"[a-z][a-z0-9]{0,63}")
_URI_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")

#: The identity scopes of SAL §"Scopes for requesting identity data" and OIDC Core §5.4.
IDENTITY_SCOPES: Final = frozenset({"openid", "fhirUser", "profile", "email", "address", "phone"})
#: Every scope that is a bare word: identity scopes plus the two refresh-token scopes.
NAMED_SCOPES: Final = IDENTITY_SCOPES | {"offline_access", "online_access"}


def _check_chars(text: str, scope: str, what: str) -> None:
    if not _NQCHARS_RE.fullmatch(text):
        raise ScopeError(
            scope, f"{what} must be printable ASCII without spaces, '\"' or '\\' (RFC 6749 §3.3)"
        )


def _letters(interactions: Iterable[Interaction]) -> str:
    chosen = {i.letter for i in interactions}
    return "".join(ch for ch in _LETTERS if ch in chosen)


def _interactions_for(permissions: str, scope: str) -> frozenset[Interaction]:
    if permissions in _V1_SUFFIXES:
        return _V1_SUFFIXES[permissions]
    if not permissions:
        raise ScopeError(scope, "no permissions after '.' (expected a subset of 'cruds')")
    position = -1
    for ch in permissions:
        found = _LETTERS.find(ch, position + 1)
        if found < 0:
            reason = (
                f"permissions {permissions!r} are not an in-order subset of 'cruds' "
                "nor a v1 suffix (read, write, *)"
            )
            raise ScopeError(scope, reason)
        position = found
    return frozenset(_BY_LETTER[ch] for ch in permissions)


@dataclass(frozen=True)
class ResourceScope:
    """A FHIR resource scope such as ``patient/Observation.rs?category=...|laboratory``.

    :param context: ``patient``, ``user`` or ``system``
    :param resource_type: a FHIR resource type name, or ``"*"`` for every type, now and
        in the future (SAL §"Wildcard scopes")
    :param permissions: the suffix as written: an in-order subset of ``cruds``, or the v1
        ``read``, ``write`` or ``*``
    :param query: ``(param, value)`` pairs of the granular query string in their written
        order, values not percent-decoded (SAL §"Finer-grained resource constraints").
        They combine like a FHIR query string: every pair must match.
    :raises ScopeError: if any part is outside the grammar; a value can never be invalid
    """

    context: Context
    resource_type: str
    permissions: str
    query: tuple[tuple[str, str], ...] = ()
    interactions: frozenset[Interaction] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        raw = f"{self.context}/{self.resource_type}.{self.permissions}"
        if self.query:
            raw += "?" + "&".join(f"{name}={value}" for name, value in self.query)
        try:
            context = Context(self.context)
        except ValueError:
            raise ScopeError(raw, "context must be 'patient', 'user' or 'system'") from None
        object.__setattr__(self, "context", context)
        if self.resource_type != "*" and not _RESOURCE_TYPE_RE.fullmatch(self.resource_type):
            raise ScopeError(raw, f"{self.resource_type!r} is not a FHIR resource type or '*'")
        object.__setattr__(self, "interactions", _interactions_for(self.permissions, raw))
        query = tuple((str(name), str(value)) for name, value in self.query)
        object.__setattr__(self, "query", query)
        if query and self.is_v1:
            raise ScopeError(raw, "granular '?param=value' constraints need v2 permissions")
        for name, value in query:
            if not _PARAM_NAME_RE.fullmatch(name):
                raise ScopeError(raw, f"{name!r} is not a search parameter name")
            if not value or "&" in value:
                raise ScopeError(raw, f"search parameter {name!r} needs a value without '&'")
            _check_chars(value, raw, "a search parameter value")

    @property
    def is_v1(self) -> bool:
        """True for the SMART v1 suffixes ``.read``, ``.write`` and ``.*``."""
        return self.permissions in _V1_SUFFIXES

    @property
    def is_wildcard(self) -> bool:
        """True when the resource type is ``*``."""
        return self.resource_type == "*"

    @property
    def is_granular(self) -> bool:
        """True when a ``?param=value`` query restricts the scope."""
        return bool(self.query)

    def filters(self) -> dict[str, list[str]]:
        """The granular query as ``urllib.parse.parse_qs`` would give it, values decoded."""
        out: dict[str, list[str]] = {}
        for name, value in self.query:
            out.setdefault(name, []).append(unquote(value))
        return out

    def to_v2(self) -> ResourceScope:
        """The same scope with v1 permissions spelled as v2 letters (SAL v1 mapping)."""
        if not self.is_v1:
            return self
        return ResourceScope(self.context, self.resource_type, _letters(self.interactions))

    def allows(self, resource_type: str, interaction: Interaction | str) -> bool:
        """Whether this scope permits *interaction* on *resource_type*, ignoring its query."""
        return (self.resource_type in ("*", resource_type)) and (
            Interaction(interaction) in self.interactions
        )

    def __str__(self) -> str:
        text = f"{self.context.value}/{self.resource_type}.{self.permissions}"
        if self.query:
            text += "?" + "&".join(f"{name}={value}" for name, value in self.query)
        return text


@dataclass(frozen=True)
class LaunchScope:
    """A launch context scope: ``launch``, ``launch/patient``, ``launch/list?role=<uri>``.

    :param context_type: ``None`` for the EHR-launch scope ``launch``; otherwise a resource
        type in all lowercase, e.g. ``patient``, ``encounter``, ``imagingstudy``
    :param role: an optional role URI; each scope carries at most one (SAL §"Scopes for
        requesting context data", "When using ?role=")
    """

    context_type: str | None = None
    role: str | None = None

    def __post_init__(self) -> None:
        raw = str(self)
        if self.context_type is None:
            if self.role is not None:
                raise ScopeError(raw, "'?role=' needs a context type, as in launch/list?role=")
            return
        if not _LAUNCH_TYPE_RE.fullmatch(self.context_type):
            raise ScopeError(raw, "launch context types are lowercase resource type names")
        if self.role is not None:
            if not self.role or "&" in self.role:
                raise ScopeError(raw, "a launch scope takes exactly one non-empty role")
            _check_chars(self.role, raw, "a role")

    def __str__(self) -> str:
        if self.context_type is None:
            return "launch"
        text = f"launch/{self.context_type}"
        if self.role is not None:
            text += f"?role={self.role}"
        return text


@dataclass(frozen=True)
class NamedScope:
    """A bare-word scope such as ``openid``, ``fhirUser`` or ``offline_access``."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in NAMED_SCOPES:
            raise ScopeError(self.name, "not a SMART or OpenID Connect scope name")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class ExtensionScope:
    """A server-specific scope: a full URI, or a string starting with ``__``."""

    value: str

    def __post_init__(self) -> None:
        _check_chars(self.value, self.value, "a scope")
        if self.value.startswith("__"):
            if len(self.value) == 2:
                raise ScopeError(self.value, "an extension scope needs a name after '__'")
            return
        if not _is_absolute_uri(self.value):
            raise ScopeError(self.value, "extension scopes are full URIs or start with '__'")

    def __str__(self) -> str:
        return self.value


Scope: TypeAlias = ResourceScope | LaunchScope | NamedScope | ExtensionScope


def _is_absolute_uri(text: str) -> bool:
    if not _URI_SCHEME_RE.match(text):
        return False
    parts = urlsplit(text)
    return bool(parts.scheme) and (bool(parts.netloc) or parts.scheme.lower() == "urn")


_RESOURCE_RE: Final = re.compile(
    r"(?P<context>[^/]+)/(?P<type>[^.?]*)\.(?P<perms>[^?]*)(?:\?(?P<query>.*))?", re.DOTALL
)


def _parse_query(query: str, scope: str) -> tuple[tuple[str, str], ...]:
    if not query:
        raise ScopeError(scope, "nothing after '?'")
    pairs = []
    for item in query.split("&"):
        name, sep, value = item.partition("=")
        if not sep:
            raise ScopeError(scope, f"{item!r} is not a param=value pair")
        pairs.append((name, value))
    return tuple(pairs)


def _parse_launch(text: str) -> LaunchScope:
    if text == "launch":
        return LaunchScope()
    if not text.startswith("launch/"):
        raise ScopeError(text, "'?role=' needs a context type, as in launch/list?role=")
    body, sep, query = text[len("launch/") :].partition("?")
    if not sep:
        return LaunchScope(body)
    name, eq, role = query.partition("=")
    if name != "role" or not eq:
        raise ScopeError(text, "the only launch context parameter is '?role='")
    return LaunchScope(body, role)


def parse_scope(text: str) -> Scope:
    """Parse one scope token (SAL §"Scopes and Launch Context"; RFC 6749 §3.3).

    :raises ScopeError: for anything outside the grammar, with a reason to show the client
    """
    if not isinstance(text, str):
        raise ScopeError(repr(text), "a scope must be a string")
    _check_chars(text, text, "a scope")
    if text in NAMED_SCOPES:
        return NamedScope(text)
    if text == "launch" or text.startswith(("launch/", "launch?")):
        return _parse_launch(text)
    if text.startswith("__"):
        return ExtensionScope(text)
    head = text.split("/", 1)[0]
    if head in ("patient", "user", "system"):
        match = _RESOURCE_RE.fullmatch(text)
        if match is None:
            raise ScopeError(text, "expected context/Type.permissions, e.g. patient/Patient.rs")
        query = _parse_query(match["query"], text) if match["query"] is not None else ()
        return ResourceScope(Context(match["context"]), match["type"], match["perms"], query)
    if head.lower() in ("patient", "user", "system", "launch"):
        raise ScopeError(text, f"the prefix must be lowercase ({head.lower()!r})")
    if _is_absolute_uri(text):
        return ExtensionScope(text)
    raise ScopeError(text, "not a SMART scope")


#: SAL §"Appendix: URI representation of scopes".
SMART_SCOPE_URI_PREFIX: Final = "http://smarthealthit.org/fhir/scopes/"
_OPENID_URI_PREFIX: Final = "http://openid.net/specs/openid-connect-core-1_0#"


def scope_to_uri(scope: Scope | str) -> str:
    """The URI form of a scope (SAL §"Appendix: URI representation of scopes").

    OpenID scopes take the OpenID Connect Core prefix; extension scopes that are already
    URIs stay as they are.
    """
    value = parse_scope(scope) if isinstance(scope, str) else scope
    if isinstance(value, ExtensionScope) and not value.value.startswith("__"):
        return value.value
    if isinstance(value, NamedScope) and value.name in IDENTITY_SCOPES - {"fhirUser"}:
        return _OPENID_URI_PREFIX + value.name
    return SMART_SCOPE_URI_PREFIX + str(value)


def scope_from_uri(uri: str) -> Scope:
    """Inverse of :func:`scope_to_uri`; any other URI parses as an extension scope."""
    for prefix in (SMART_SCOPE_URI_PREFIX, _OPENID_URI_PREFIX):
        if uri.startswith(prefix):
            return parse_scope(uri[len(prefix) :])
    return parse_scope(uri)


@dataclass(frozen=True)
class ScopeDecision:
    """The answer to "may this token do *interaction* on *resource type*?".

    :param allowed: whether any scope permits it at all
    :param context: the most permissive context that permits it (``None`` when denied);
        ``patient`` means: only inside the token's patient compartment
    :param restrictions: empty when a scope without a query permits it; otherwise the
        alternatives (OR) of granular filters, each shaped like ``parse_qs`` output and
        ANDed like a FHIR query string
    """

    allowed: bool
    context: Context | None
    restrictions: tuple[Mapping[str, tuple[str, ...]], ...] = ()

    @property
    def restricted(self) -> bool:
        """True when the access is limited to the :attr:`restrictions` filters."""
        return bool(self.restrictions)

    def query_restrictions(self) -> list[dict[str, list[str]]]:
        """A fresh, mutable copy of :attr:`restrictions`."""
        return [{k: list(v) for k, v in r.items()} for r in self.restrictions]


_DENIED: Final = ScopeDecision(False, None)


class ScopeSet:
    """An immutable, ordered, duplicate-free set of scopes, as granted to one token.

    Equality ignores order. Build one with :func:`parse_scopes`, or from scope values and
    strings directly (strings are parsed strictly). Decisions are cached per
    ``(resource_type, interaction)``, so :meth:`decide` is a dictionary look-up after the
    first request of each kind.
    """

    __slots__ = ("_decisions", "_full", "_granular", "_key", "_scopes", "invalid")

    _scopes: tuple[Scope, ...]
    _key: frozenset[Scope]
    invalid: tuple[str, ...]

    def __init__(self, scopes: Iterable[Scope | str] = (), *, invalid: Iterable[str] = ()) -> None:
        seen: dict[Scope, None] = {}
        for item in scopes:
            seen.setdefault(parse_scope(item) if isinstance(item, str) else item, None)
        self._scopes = tuple(seen)
        self._key = frozenset(self._scopes)
        #: Tokens dropped by ``parse_scopes(..., on_invalid="ignore")``, for logging.
        self.invalid = tuple(invalid)
        self._decisions: dict[tuple[str, Interaction], ScopeDecision] = {}
        self._full: dict[tuple[str, Interaction], Context] = {}
        self._granular: dict[tuple[str, Interaction], list[ResourceScope]] = {}
        for scope in self._scopes:
            if not isinstance(scope, ResourceScope):
                continue
            for interaction in scope.interactions:
                key = (scope.resource_type, interaction)
                if scope.query:
                    self._granular.setdefault(key, []).append(scope)
                elif key not in self._full or self._full[key].rank < scope.context.rank:
                    self._full[key] = scope.context

    # -- container protocol ------------------------------------------------------------

    def __iter__(self) -> Iterator[Scope]:
        return iter(self._scopes)

    def __len__(self) -> int:
        return len(self._scopes)

    def __bool__(self) -> bool:
        return bool(self._scopes)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            try:
                item = parse_scope(item)
            except ScopeError:
                return False
        return item in self._key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ScopeSet):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __str__(self) -> str:
        """The space-separated ``scope`` string of RFC 6749 §3.3, in grant order."""
        return " ".join(str(s) for s in self._scopes)

    def __repr__(self) -> str:
        return f"ScopeSet({str(self)!r})"

    def __or__(self, other: ScopeSet) -> ScopeSet:
        return ScopeSet((*self._scopes, *other._scopes))

    # -- views ---------------------------------------------------------------------------

    @property
    def resource_scopes(self) -> tuple[ResourceScope, ...]:
        """Only the FHIR resource scopes, in order."""
        return tuple(s for s in self._scopes if isinstance(s, ResourceScope))

    @property
    def launch_scopes(self) -> tuple[LaunchScope, ...]:
        """Only the launch context scopes, in order."""
        return tuple(s for s in self._scopes if isinstance(s, LaunchScope))

    def has(self, name: str) -> bool:
        """Whether the bare-word scope *name* (``openid``, ``offline_access`` …) is present."""
        return NamedScope(name) in self._key if name in NAMED_SCOPES else False

    @property
    def ehr_launch(self) -> bool:
        """The ``launch`` scope: the request carries an EHR ``launch`` parameter."""
        return LaunchScope() in self._key

    @property
    def launch_contexts(self) -> frozenset[str]:
        """Lowercase context types requested with ``launch/<type>``, e.g. ``{"patient"}``."""
        return frozenset(s.context_type for s in self.launch_scopes if s.context_type)

    @property
    def requests_refresh_token(self) -> bool:
        """``offline_access`` or ``online_access`` (SAL §"Scopes for requesting a refresh
        token")."""
        return self.has("offline_access") or self.has("online_access")

    @property
    def needs_patient_context(self) -> bool:
        """A ``patient/`` scope is present: the server SHALL establish a patient in context
        (SAL §"Apps that launch from the EHR"), or ``launch/patient`` asks for one."""
        return "patient" in self.launch_contexts or any(
            s.context is Context.PATIENT for s in self.resource_scopes
        )

    # -- decisions -------------------------------------------------------------------------

    def decide(self, resource_type: str, interaction: Interaction | str) -> ScopeDecision:
        """Decide one request (SAL §"Scopes for requesting FHIR Resources").

        A scope without a query allows the interaction outright; among those the most
        permissive context wins. Only when none exists do granular scopes apply: the
        request is then restricted to the union of their filters, at the most permissive
        context among them. (Filters granted at a less permissive context than the
        chosen one are left out, which can under-grant but never over-grant.)

        Pass ``"*"`` as *resource_type* for a system-wide search without ``_type``: only a
        wildcard scope allows it.
        """
        key = (resource_type, Interaction(interaction))
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(*key)
            self._decisions[key] = decision
        return decision

    def _decide(self, resource_type: str, interaction: Interaction) -> ScopeDecision:
        contexts = [
            self._full[k]
            for k in ((resource_type, interaction), ("*", interaction))
            if k in self._full
        ]
        if contexts:
            return ScopeDecision(True, max(contexts, key=lambda c: c.rank))
        granular = [
            *self._granular.get((resource_type, interaction), ()),
            *(self._granular.get(("*", interaction), ()) if resource_type != "*" else ()),
        ]
        if not granular:
            return _DENIED
        best = max((s.context for s in granular), key=lambda c: c.rank)
        restrictions: list[Mapping[str, tuple[str, ...]]] = []
        for scope in granular:
            if scope.context is best:
                item = MappingProxyType({k: tuple(v) for k, v in scope.filters().items()})
                if item not in restrictions:
                    restrictions.append(item)
        return ScopeDecision(True, best, tuple(restrictions))

    def allows(self, resource_type: str, interaction: Interaction | str) -> bool:
        """Whether any scope permits *interaction* on *resource_type* (maybe restricted)."""
        return self.decide(resource_type, interaction).allowed

    def level(self, resource_type: str, interaction: Interaction | str) -> Context | None:
        """The most permissive context that permits it, or ``None`` when nothing does."""
        return self.decide(resource_type, interaction).context

    def query_restrictions(
        self, resource_type: str, interaction: Interaction | str
    ) -> list[dict[str, list[str]]]:
        """The granular filters that bound the request (SAL §"Finer-grained resource
        constraints using search parameters").

        ``[]`` when a full-type scope allows it, *and* when nothing allows it: call
        :meth:`allows` (or use :meth:`decide`) to tell the two apart.
        """
        return self.decide(resource_type, interaction).query_restrictions()

    # -- transformations -----------------------------------------------------------------

    def to_v2(self) -> ScopeSet:
        """v1 suffixes rewritten as v2 letters, and resource scopes that differ only in
        permissions merged into one (SAL §"Scope Equivalence": "factored to their
        shortest form"). Other scopes are kept as they are."""
        merged: dict[tuple[Context, str, tuple[tuple[str, str], ...]], set[Interaction]] = {}
        slots: list[Scope | tuple[Context, str, tuple[tuple[str, str], ...]]] = []
        for scope in self._scopes:
            if isinstance(scope, ResourceScope):
                key = (scope.context, scope.resource_type, scope.query)
                if key not in merged:
                    merged[key] = set()
                    slots.append(key)
                merged[key] |= scope.interactions
            else:
                slots.append(scope)
        out: list[Scope] = []
        for slot in slots:
            if isinstance(slot, tuple):
                context, resource_type, query = slot
                out.append(ResourceScope(context, resource_type, _letters(merged[slot]), query))
            else:
                out.append(slot)
        return ScopeSet(out)

    def narrow(self, allowed: ScopeSet) -> ScopeSet:
        """See :func:`narrow`."""
        return narrow(self, allowed)

    def covered_by(self, other: ScopeSet) -> bool:
        """Whether *other* grants everything in this set, e.g. a refresh request's scope
        against the original grant (SAL app-launch §"Refresh access token")."""
        return narrow(self, other) == self


def parse_scopes(
    value: str | Iterable[str] | None, *, on_invalid: Literal["raise", "ignore"] = "raise"
) -> ScopeSet:
    """Parse a space-separated ``scope`` string (RFC 6749 §3.3) or a list of tokens.

    :param on_invalid: ``"raise"`` raises :class:`ScopeError` at the first bad token;
        ``"ignore"`` drops bad tokens and lists them in :attr:`ScopeSet.invalid`
    """
    if on_invalid not in ("raise", "ignore"):
        raise ValueError("on_invalid must be 'raise' or 'ignore'")
    if value is None:
        return ScopeSet()
    if isinstance(value, str):
        return _parse_scope_string(value, on_invalid)
    return _parse_tokens(tuple(value), on_invalid)


@lru_cache(maxsize=2048)
def _parse_scope_string(value: str, on_invalid: Literal["raise", "ignore"]) -> ScopeSet:
    return _parse_tokens(tuple(value.split()), on_invalid)


def _parse_tokens(tokens: tuple[str, ...], on_invalid: Literal["raise", "ignore"]) -> ScopeSet:
    scopes: list[Scope] = []
    invalid: list[str] = []
    for token in tokens:
        try:
            scopes.append(parse_scope(token))
        except ScopeError:
            if on_invalid == "raise":
                raise
            invalid.append(token)
    return ScopeSet(scopes, invalid=invalid)


# -- narrowing ---------------------------------------------------------------------------


def _intersect(requested: ResourceScope, allowed: ResourceScope) -> ResourceScope | None:
    if requested.context is not allowed.context:
        return None
    if requested.resource_type == "*":
        resource_type = allowed.resource_type
    elif allowed.resource_type in ("*", requested.resource_type):
        resource_type = requested.resource_type
    else:
        return None
    common = requested.interactions & allowed.interactions
    if not common:
        return None
    query = requested.query + tuple(p for p in allowed.query if p not in requested.query)
    return ResourceScope(requested.context, resource_type, _letters(common), query)


def _covers(wide: ResourceScope, narrow_: ResourceScope) -> bool:
    return (
        wide.context is narrow_.context
        and wide.resource_type in ("*", narrow_.resource_type)
        and narrow_.interactions <= wide.interactions
        and set(wide.query) <= set(narrow_.query)
    )


def _narrow_resource(
    requested: ResourceScope, allowed: tuple[ResourceScope, ...]
) -> list[ResourceScope]:
    merged: dict[tuple[str, tuple[tuple[str, str], ...]], set[Interaction]] = {}
    for candidate in allowed:
        piece = _intersect(requested, candidate)
        if piece is not None:
            merged.setdefault((piece.resource_type, piece.query), set()).update(piece.interactions)
    pieces = [
        ResourceScope(requested.context, resource_type, _letters(perms), query)
        for (resource_type, query), perms in merged.items()
    ]
    for piece in pieces:
        if _covers(piece, requested):
            return [requested]  # granted in full: keep the client's own spelling (v1 too)
    kept: list[ResourceScope] = []
    for index, piece in enumerate(pieces):
        subsumed = any(
            _covers(other, piece) and (not _covers(piece, other) or other_index < index)
            for other_index, other in enumerate(pieces)
            if other_index != index
        )
        if not subsumed:
            kept.append(piece)
    return kept


def _launch_allowed(requested: LaunchScope, allowed: ScopeSet) -> bool:
    if requested in allowed:
        return True
    return requested.role is not None and LaunchScope(requested.context_type) in allowed


def narrow(requested: ScopeSet, allowed: ScopeSet) -> ScopeSet:
    """The part of *requested* that *allowed* permits, in the requested order.

    Use it for the consent screen and against a client's registered scopes. A resource
    scope granted in full keeps its spelling, so a client registered for ``patient/*.rs``
    asking ``patient/Observation.read`` gets ``patient/Observation.read``; one granted in
    part comes back in v2 letters (``patient/Observation.cruds`` → ``patient/Observation.rs``).
    Wildcards narrow to the allowed types, and granular queries of both sides are ANDed.
    Contexts never cross (``user/`` does not grant ``patient/``). Launch, identity and
    extension scopes need an exact match, except that ``launch/<type>`` allows any
    ``launch/<type>?role=...``.
    """
    allowed_resources = allowed.resource_scopes
    out: list[Scope] = []
    for scope in requested:
        if isinstance(scope, ResourceScope):
            out.extend(_narrow_resource(scope, allowed_resources))
        elif isinstance(scope, LaunchScope):
            if _launch_allowed(scope, allowed):
                out.append(scope)
        elif scope in allowed:
            out.append(scope)
    return ScopeSet(out)


# -- plain-language descriptions -----------------------------------------------------------

_LABELS: Final[Mapping[str, str]] = {
    "AllergyIntolerance": "allergies and intolerances",
    "Appointment": "appointments",
    "AuditEvent": "access and activity logs",
    "Binary": "attached files",
    "CarePlan": "care plans",
    "CareTeam": "care teams",
    "Condition": "conditions and health problems",
    "Consent": "consent and privacy choices",
    "Coverage": "insurance coverage",
    "Device": "medical devices",
    "DiagnosticReport": "test and imaging reports",
    "DocumentReference": "documents",
    "Encounter": "visits",
    "FamilyMemberHistory": "family health history",
    "Goal": "health goals",
    "Immunization": "immunizations",
    "Location": "locations",
    "Medication": "medications",
    "MedicationDispense": "dispensed medications",
    "MedicationRequest": "prescriptions and medication orders",
    "MedicationStatement": "medication lists",
    "Observation": "lab results, vital signs and other observations",
    "Organization": "healthcare organizations",
    "Patient": "demographics",
    "Person": "person records",
    "Practitioner": "care providers",
    "PractitionerRole": "care provider roles",
    "Procedure": "procedures",
    "Provenance": "record origins and history",
    "Questionnaire": "questionnaires",
    "QuestionnaireResponse": "questionnaire answers",
    "RelatedPerson": "related people",
    "ServiceRequest": "orders and referrals",
    "Specimen": "specimens",
}

_VERBS: Final = (
    (Interaction.READ, "read"),
    (Interaction.SEARCH, "search"),
    (Interaction.CREATE, "create"),
    (Interaction.UPDATE, "update"),
    (Interaction.DELETE, "delete"),
)

_NAMED_TEXT: Final[Mapping[str, str]] = {
    "openid": "Know who you are (openid)",
    "fhirUser": "Know who you are (fhirUser)",
    "profile": "See your name and basic profile (profile)",
    "email": "See your email address (email)",
    "phone": "See your phone number (phone)",
    "address": "See your postal address (address)",
    "offline_access": "Stay connected after you log out, until you revoke access (offline_access)",
    "online_access": "Stay connected while you are logged in (online_access)",
}


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _label(resource_type: str) -> str:
    if resource_type in _LABELS:
        return _LABELS[resource_type]
    return re.sub(r"(?<!^)(?=[A-Z])", " ", resource_type).lower() + " records"


def _describe_value(value: str) -> str:
    alternatives = []
    for item in unquote(value).split(","):
        system, bar, code = item.rpartition("|")
        alternatives.append(code if bar and code else item)
    return " or ".join(alternatives)


def _describe_resource(scope: ResourceScope) -> str:
    verbs = _join([word for interaction, word in _VERBS if interaction in scope.interactions])
    if scope.is_wildcard:
        what = {
            Context.PATIENT: "all of your health records",
            Context.USER: "all records you have access to",
            Context.SYSTEM: "all records on this server",
        }[scope.context]
        text = f"{verbs.capitalize()} {what} (every type of data, now and in the future)"
    else:
        label = _label(scope.resource_type)
        what = {
            Context.PATIENT: f"your {label}",
            Context.USER: f"{label} you have access to",
            Context.SYSTEM: f"all {label} on this server",
        }[scope.context]
        text = f"{verbs.capitalize()} {what} ({scope.resource_type})"
    if scope.query:
        conditions = [f"{name} is {_describe_value(value)}" for name, value in scope.query]
        text += ", only where " + _join(conditions)
    return text


def _describe_launch(scope: LaunchScope) -> str:
    if scope.context_type is None:
        return "Open with the patient and visit you are working on in this system (launch)"
    if scope.context_type == "patient":
        text = "Know which patient record is selected"
    elif scope.context_type == "encounter":
        text = "Know which visit is open"
    else:
        text = f"Know which {scope.context_type} is selected"
    if scope.role is not None:
        text += f", for the role {scope.role}"
    return f"{text} ({scope})"


def describe(scope: Scope | str) -> str:
    """Plain-English wording of one scope, for the authorization (consent) screen.

    Wildcards say "now and in the future", as SAL §"Wildcard scopes" asks servers to tell
    the user. Example: ``patient/DocumentReference.rs`` → "Read and search your documents
    (DocumentReference)".
    """
    value = parse_scope(scope) if isinstance(scope, str) else scope
    if isinstance(value, ResourceScope):
        return _describe_resource(value)
    if isinstance(value, LaunchScope):
        return _describe_launch(value)
    if isinstance(value, NamedScope):
        return _NAMED_TEXT[value.name]
    return f"Use the custom permission {value.value}"


def describe_all(scopes: ScopeSet) -> list[str]:
    """One line per scope in grant order, duplicates removed, with ``openid`` and
    ``fhirUser`` merged into "Know who you are (openid/fhirUser)"."""
    both = scopes.has("openid") and scopes.has("fhirUser")
    lines: list[str] = []
    for scope in scopes:
        if both and isinstance(scope, NamedScope) and scope.name in ("openid", "fhirUser"):
            line = "Know who you are (openid/fhirUser)"
        else:
            line = describe(scope)
        if line not in lines:
            lines.append(line)
    return lines
