"""The authorization endpoint and the pages a person sees: login, patient picker, consent.

Flow (SMART App Launch 2.2 app-launch.md, RFC 6749 §4.1.1-§4.1.2):

1. ``GET`` or ``POST /authorize`` (``authorize-post``): authlib validates the request
   (client, exact redirect URI, ``response_type=code``, scopes, PKCE S256) and SMART's
   parameters (``aud``, ``state``, ``launch``). Errors go back to the app by redirect, except
   a bad ``client_id`` or ``redirect_uri``, which are shown here and never redirected. A valid
   request is stored server-side as a pending authorization bound to this browser by a
   cookie digest, and the browser is sent to ``/interact``.
2. ``/interact`` shows the next step: the login form (argon2, timing-safe, rate-limited per
   user and IP), then the patient picker when a patient context is needed and not given by
   an EHR launch, then the consent screen listing every requested scope in plain language
   with a checkbox (SAL §"Scopes": the user may grant less).
3. The consent decision goes through authlib (``create_authorization_response``), which
   issues the code and redirects with an exact echo of ``state``.

Pages are plain HTML rendered with :class:`string.Template`; every value is HTML-escaped.
Responses carry ``Cache-Control: no-store`` and forbid framing.
"""

from __future__ import annotations

import html
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from string import Template
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

import sqlalchemy as sa
from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from .clients import Client, get_client, origin_of
from .grants import AuthorizationDecision
from .launches import LaunchContext, get_launch
from .records import purge_expired
from .requests import SmartOAuth2Request
from .scopes import Context, ScopeSet, describe, parse_scopes
from .server import (
    Grantee,
    OAuthResponse,
    SmartAuthorizationServer,
    Urls,
    current_exchange,
    sha256_hex,
)
from .tables import auth_requests
from .users import User, authenticate, get_user

__all__ = [
    "BROWSER_COOKIE",
    "PatientPicker",
    "authorize_endpoint",
    "browser_id",
    "interact_get",
    "interact_post",
    "oauth_request",
    "public_uri",
    "render",
    "set_browser_cookie",
]

BROWSER_COOKIE: Final = "smart_browser"
_PURGE_EVERY: Final = 600
_FORM: Final = "application/x-www-form-urlencoded"

#: ``(conn, user, query) -> [(patient id, display text)]``: the patients *user* may open,
#: filtered by the search text *query* (may be empty).
PatientPicker = Callable[[Connection, User, str], list[tuple[str, str]]]


@lru_cache(maxsize=16)
def _template(name: str) -> Template:
    text = resources.files("smart_on_fhir").joinpath("templates", name).read_text("utf-8")
    return Template(text)


def render(
    name: str, *, title: str, status: int = 200, csp_form: str = "", **values: str
) -> Response:
    """Render ``templates/<name>`` inside ``base.html``. Values are HTML-escaped unless
    their name ends in ``_html`` (those are built from escaped parts by this module)."""
    escaped = {
        k: v if k.endswith("_html") else html.escape(v, quote=True) for k, v in values.items()
    }
    content = _template(name).safe_substitute(escaped)
    page = _template("base.html").safe_substitute(title=html.escape(title), content=content)
    headers = {
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
        f"form-action 'self' {csp_form}".strip()
        + "; frame-ancestors 'none'; base-uri 'none'",
    }
    return HTMLResponse(page, status_code=status, headers=headers)


def error_page(
    message: str, *, status: int = 400, heading: str = "This request cannot go on"
) -> Response:
    return render("error.html", title=heading, status=status, heading=heading, message=message)


async def _form(request: Request) -> list[tuple[str, str]]:
    if request.method != "POST":
        return []
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != _FORM:
        return []
    body = await request.body()
    return parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)


def _has_nul(items: list[tuple[str, str]]) -> bool:
    return any("\x00" in key or "\x00" in value for key, value in items)


def public_uri(request: Request, urls: Urls) -> str:
    """The request's URL as clients see it: the auth base (``public_base_url`` when
    configured, so a TLS-terminating proxy counts as https) plus the endpoint and query."""
    name = request.url.path.rsplit("/", 1)[-1]
    query = request.url.query
    return f"{urls.auth_base}/{name}" + (f"?{query}" if query else "")


async def oauth_request(
    request: Request, urls: Urls, *, insecure_transport: bool
) -> SmartOAuth2Request:
    """Read the query and form (the async part), then build authlib's request object.

    :raises OAuth2Error: ``insecure_transport`` for plain http from a non-loopback host;
        ``invalid_request`` for a parameter with a NUL character (no RFC 6749 value has one,
        and PostgreSQL cannot even look it up)
    """
    form = await _form(request)
    query = request.query_params.multi_items()
    if _has_nul([*query, *form]):
        raise InvalidRequestError("A parameter contains a NUL character.")
    return SmartOAuth2Request(
        request.method,
        public_uri(request, urls),
        request.headers,
        query=query,
        form=form,
        insecure_transport=insecure_transport,
    )


@dataclass(frozen=True, slots=True)
class _Pending:
    id: str
    client_id: str
    params: dict[str, str]
    user_id: str | None
    auth_time: int | None
    patient: str | None


def _load_pending(conn: Connection, txn: str, browser: str | None, now: int) -> _Pending | None:
    if not txn or len(txn) > 64 or not browser:
        return None
    row = conn.execute(
        sa.select(
            auth_requests.c.id,
            auth_requests.c.client_id,
            auth_requests.c.params,
            auth_requests.c.user_id,
            auth_requests.c.auth_time,
            auth_requests.c.patient,
            auth_requests.c.browser_hash,
        ).where(auth_requests.c.id == txn, auth_requests.c.expires_at > now)
    ).first()
    if row is None or not secrets.compare_digest(row[6], sha256_hex(browser)):
        return None
    return _Pending(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])


class AuthFlow:
    """The synchronous part of the flow, run on a worker thread inside one transaction
    and one :func:`~smart_on_fhir.server.exchange`."""

    def __init__(
        self, server: SmartAuthorizationServer, picker: PatientPicker, *, insecure: bool
    ) -> None:
        self.server = server
        self.picker = picker
        self.insecure = insecure
        self._purged = 0

    # -- step 1: /authorize ----------------------------------------------------------------

    def begin(self, oreq: SmartOAuth2Request, browser: str) -> OAuthResponse | str:
        """Validate an authorization request; store it and return its id, or return the
        error response (a redirect to the app, or an error page description)."""
        try:
            self.server.get_consent_grant(oreq)
        except OAuth2Error as error:
            if error.redirect_uri:
                return self.server.handle_error_response(oreq, error)  # type: ignore[no-any-return]
            return OAuthResponse(400, error.description or error.error, ())
        except ValueError:  # authlib refuses to build an error that would echo control chars
            return OAuthResponse(400, "The authorization request is malformed.", ())
        ex = current_exchange()
        if ex.now - self._purged > _PURGE_EVERY:  # housekeeping, at most every few minutes
            purge_expired(ex.conn, now=ex.now)
            self._purged = ex.now
        txn = secrets.token_urlsafe(24)
        params = {k: v[0] for k, v in oreq.payload.datalist.items() if v}
        ex.conn.execute(
            auth_requests.insert().values(
                id=txn,
                browser_hash=sha256_hex(browser),
                client_id=oreq.client.get_client_id(),
                params=json.dumps(params),
                created_at=ex.now,
                expires_at=ex.now + self.server.settings.auth_request_lifetime,
            )
        )
        return txn

    # -- helpers -----------------------------------------------------------------------------

    def _request(self, pending: _Pending, urls: Urls) -> SmartOAuth2Request:
        query = list(pending.params.items())
        return SmartOAuth2Request(
            "GET",
            f"{urls.authorize}?{urlencode(query)}",
            {},
            query=query,
            insecure_transport=True,  # our own stored request, validated when received
        )

    def _offered(self, client: Client, pending: _Pending) -> ScopeSet:
        allowed = client.get_allowed_scope(pending.params.get("scope"))
        return parse_scopes(allowed, on_invalid="ignore") if allowed else ScopeSet()

    def _launch(self, pending: _Pending) -> LaunchContext | None:
        launch_id = pending.params.get("launch")
        if not launch_id:
            return None
        ex = current_exchange()
        return get_launch(ex.conn, launch_id, now=ex.now)

    def needs_picker(self, scopes: ScopeSet, launch: LaunchContext | None) -> bool:
        if launch is not None and launch.patient is not None:
            return False
        return scopes.needs_patient_context

    def finish(
        self,
        pending: _Pending,
        urls: Urls,
        decision: AuthorizationDecision | None,
    ) -> OAuthResponse:
        """Issue the code (or ``access_denied``) through authlib and end the pending request."""
        oreq = self._request(pending, urls)
        ex = current_exchange()
        ex.conn.execute(auth_requests.delete().where(auth_requests.c.id == pending.id))
        try:
            grant = self.server.get_consent_grant(oreq)
        except OAuth2Error as error:
            if error.redirect_uri:
                return self.server.handle_error_response(oreq, error)  # type: ignore[no-any-return]
            return OAuthResponse(400, error.description or error.error, ())
        response: OAuthResponse = self.server.create_authorization_response(
            oreq, grant_user=decision, grant=grant
        )
        return response

    # -- step 2: pages -----------------------------------------------------------------------

    def page(self, pending: _Pending, urls: Urls, query: str) -> Step:
        """Which page to show next for this pending authorization."""
        ex = current_exchange()
        client = get_client(ex.conn, pending.client_id)
        if client is None:
            return Step("error", message="The app is no longer registered.")
        if pending.user_id is None:
            return Step("login", client=client)
        user = get_user(ex.conn, pending.user_id)
        if user is None or not user.active:
            return Step("error", message="This account is not active.")
        offered = self._offered(client, pending)
        launch = self._launch(pending)
        if pending.patient is None and self.needs_picker(offered, launch):
            choices = self.picker(ex.conn, user, query)
            if not choices and not query:
                return Step("done", response=self.finish(pending, urls, None))
            if len(choices) == 1 and not query:
                self._set_patient(pending, choices[0][0])
                pending = replace(pending, patient=choices[0][0])
            else:
                return Step("picker", client=client, choices=choices)
        return Step("consent", client=client, user=user, offered=offered, pending=pending)

    def _set_patient(self, pending: _Pending, patient: str) -> None:
        current_exchange().conn.execute(
            auth_requests.update().where(auth_requests.c.id == pending.id).values(patient=patient)
        )

    def submit(
        self, pending: _Pending, urls: Urls, form: Mapping[str, Sequence[str]], client_ip: str
    ) -> Step:
        """Handle one submitted form; returns the next step (or the final redirect)."""
        ex = current_exchange()
        step = _first(form, "step")
        client = get_client(ex.conn, pending.client_id)
        if client is None:
            return Step("error", message="The app is no longer registered.")
        if step == "login" and pending.user_id is None:
            username = _first(form, "username")[:128]
            settings = self.server.settings
            result = authenticate(
                ex.conn,
                username,
                _first(form, "password")[:1024],
                client_ip=client_ip,
                now=ex.now,
                max_failures=settings.login_max_failures,
                window=settings.login_window,
            )
            if result.user is None:
                message = (
                    "Too many failed attempts. Wait a few minutes and try again."
                    if result.throttled
                    else "Unknown username or wrong password."
                )
                status = 429 if result.throttled else 401
                return Step(
                    "login", client=client, message=message, status=status, username=username
                )
            launch = self._launch(pending)
            if launch is not None and launch.user_id not in (None, result.user.id):
                return Step("error", message="This launch was opened for another user.")
            ex.conn.execute(
                auth_requests.update()
                .where(auth_requests.c.id == pending.id)
                .values(user_id=result.user.id, auth_time=ex.now)
            )
            return Step("next")
        if pending.user_id is None:
            return Step("next")
        user = get_user(ex.conn, pending.user_id)
        if user is None or not user.active:
            return Step("error", message="This account is not active.")
        if step == "patient":
            chosen = _first(form, "patient")
            allowed = {pid for pid, _ in self.picker(ex.conn, user, "")} | {
                pid for pid, _ in self.picker(ex.conn, user, _first(form, "q"))
            }
            if chosen not in allowed:
                return Step("next")
            self._set_patient(pending, chosen)
            return Step("next")
        if step == "consent":
            if _first(form, "decision") != "allow":
                return Step("done", response=self.finish(pending, urls, None))
            offered = self._offered(client, pending)
            ticked = set(form.get("scope", ()))
            granted = ScopeSet(s for s in offered if str(s) in ticked)
            return Step(
                "done", response=self.finish(pending, urls, self._decide(pending, user, granted))
            )
        return Step("next")

    def _decide(
        self, pending: _Pending, user: User, granted: ScopeSet
    ) -> AuthorizationDecision | None:
        if not granted:
            return None
        ex = current_exchange()
        launch = self._launch(pending)
        patient = encounter = intent = None
        banner = True
        if launch is not None:
            patient, encounter, intent = launch.patient, launch.encounter, launch.intent
            banner = launch.need_patient_banner
        elif granted.needs_patient_context:
            patient = pending.patient
        if patient is None and any(s.context is Context.PATIENT for s in granted.resource_scopes):
            return None  # patient/ scopes need a patient in context (SAL app-launch)
        grantee = Grantee(
            user_id=user.id,
            fhir_user=user.fhir_user,
            patient=patient,
            encounter=encounter,
            need_patient_banner=banner,
            auth_time=pending.auth_time or ex.now,
            nonce=pending.params.get("nonce"),
            intent=intent,
        )
        return AuthorizationDecision(grantee, str(granted))


def _first(form: Mapping[str, Sequence[str]], name: str) -> str:
    values = form.get(name)
    return values[0] if values else ""


@dataclass(slots=True)
class Step:
    """What to show next: ``login``, ``picker``, ``consent``, ``error``, ``next`` (redirect
    to the page view) or ``done`` (the final :class:`OAuthResponse`)."""

    kind: str
    client: Client | None = None
    user: User | None = None
    offered: ScopeSet | None = None
    pending: _Pending | None = None
    choices: list[tuple[str, str]] | None = None
    message: str = ""
    status: int = 200
    username: str = ""
    response: OAuthResponse | None = None


# -- async handlers (mounted by smart_on_fhir.routes) ---------------------------------------

RunSync = Callable[..., Any]


def _redirect(response: OAuthResponse, *, after_post: bool) -> Response:
    location = response.location
    if response.status in (301, 302, 303, 307) and location:
        return RedirectResponse(location, status_code=303 if after_post else 302)
    return error_page(str(response.body) if response.body else "The request is not valid.")


def browser_id(request: Request) -> tuple[str, bool]:
    value = request.cookies.get(BROWSER_COOKIE)
    if value and 20 <= len(value) <= 64:
        return value, False
    return secrets.token_urlsafe(32), True


def set_browser_cookie(response: Response, value: str, request: Request, path: str) -> None:
    response.set_cookie(
        BROWSER_COOKIE,
        value,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path=path,
    )


async def authorize_endpoint(
    request: Request, *, flow: AuthFlow, urls: Urls, run: RunSync, cookie_path: str
) -> Response:
    """``GET``/``POST /authorize`` (SMART ``authorize-post``)."""
    try:
        oreq = await oauth_request(request, urls, insecure_transport=flow.insecure)
    except OAuth2Error as error:
        return error_page(error.description or "Use https.")
    browser, new = browser_id(request)
    result = await run_in_threadpool(run, urls, flow.begin, oreq, browser)
    if isinstance(result, OAuthResponse):
        return _redirect(result, after_post=request.method == "POST")
    response: Response = RedirectResponse(
        f"{urls.interact}?{urlencode({'txn': result})}", status_code=303
    )
    if new:
        set_browser_cookie(response, browser, request, cookie_path)
    return response


def _pending_view(flow: AuthFlow, txn: str, browser: str | None, urls: Urls, query: str) -> Step:
    ex = current_exchange()
    pending = _load_pending(ex.conn, txn, browser, ex.now)
    if pending is None:
        return Step("error", message="This sign-in has expired. Start again from the app.")
    return flow.page(pending, urls, query)


def _pending_submit(
    flow: AuthFlow,
    txn: str,
    browser: str | None,
    urls: Urls,
    form: Mapping[str, Sequence[str]],
    client_ip: str,
) -> Step:
    ex = current_exchange()
    pending = _load_pending(ex.conn, txn, browser, ex.now)
    if pending is None:
        return Step("error", message="This sign-in has expired. Start again from the app.")
    return flow.submit(pending, urls, form, client_ip)


def _csp_form(client: Client | None) -> str:
    if client is None:
        return ""
    return " ".join(sorted(o for o in map(origin_of, client.redirect_uris) if o))


def _show(step: Step, txn: str, urls: Urls, query: str = "") -> Response:
    action = urls.interact
    client = step.client
    csp = _csp_form(client)
    if step.kind == "login" and client is not None:
        error_html = f'<p class="error">{html.escape(step.message)}</p>' if step.message else ""
        return render(
            "login.html",
            title="Sign in",
            status=step.status,
            csp_form=csp,
            client_name=client.client_name,
            error_html=error_html,
            action=action,
            txn=txn,
            username=step.username,
        )
    if step.kind == "picker" and client is not None:
        items = [
            f'<li><label><input type="radio" name="patient" value="{html.escape(pid)}"'
            f"{' checked' if i == 0 else ''}> {html.escape(text)}</label></li>"
            for i, (pid, text) in enumerate(step.choices or [])
        ]
        return render(
            "picker.html",
            title="Choose a patient",
            csp_form=csp,
            client_name=client.client_name,
            error_html="" if items else '<p class="error">No patient matches.</p>',
            action=action,
            txn=txn,
            query=query,
            choices_html="\n".join(items),
        )
    if step.kind == "consent" and client is not None and step.user is not None:
        offered = step.offered or ScopeSet()
        items = [
            f'<li><label><input type="checkbox" name="scope" value="{html.escape(str(s))}" checked>'
            f" {html.escape(describe(s))}</label> <code>{html.escape(str(s))}</code></li>"
            for s in offered
        ]
        pending = step.pending
        patient_html = ""
        if pending is not None and pending.patient:
            patient_html = f" Patient record: <strong>{html.escape(pending.patient)}</strong>."
        return render(
            "consent.html",
            title="Allow access",
            csp_form=csp,
            client_name=client.client_name,
            user_name=step.user.display_name or step.user.username,
            patient_html=patient_html,
            action=action,
            txn=txn,
            scopes_html="\n".join(items),
        )
    return error_page(step.message or "This request cannot go on.")


async def interact_get(request: Request, *, flow: AuthFlow, urls: Urls, run: RunSync) -> Response:
    """``GET /interact?txn=…``: the current step's page."""
    txn = request.query_params.get("txn", "")
    query = request.query_params.get("q", "")[:100]
    step = await run_in_threadpool(
        run, urls, _pending_view, flow, txn, request.cookies.get(BROWSER_COOKIE), urls, query
    )
    if step.kind == "done" and step.response is not None:
        return _redirect(step.response, after_post=False)
    return _show(step, txn, urls, query)


async def interact_post(request: Request, *, flow: AuthFlow, urls: Urls, run: RunSync) -> Response:
    """``POST /interact``: a submitted login, patient choice or consent decision."""
    items = await _form(request)
    if _has_nul(items):  # no login, choice or decision has one; PostgreSQL cannot store it
        return error_page("The form contains a NUL character.")
    form: dict[str, list[str]] = {}
    for key, value in items:
        form.setdefault(key, []).append(value)
    txn = _first(form, "txn")
    client_ip = request.client.host if request.client else "?"
    step = await run_in_threadpool(
        run,
        urls,
        _pending_submit,
        flow,
        txn,
        request.cookies.get(BROWSER_COOKIE),
        urls,
        form,
        client_ip,
    )
    if step.kind == "done" and step.response is not None:
        return _redirect(step.response, after_post=True)
    if step.kind == "next":
        return RedirectResponse(f"{urls.interact}?{urlencode({'txn': txn})}", status_code=303)
    return _show(step, txn, urls)
