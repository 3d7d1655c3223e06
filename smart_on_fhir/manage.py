"""The ``management_endpoint`` (SMART 2.2 conformance.md, RECOMMENDED): a page where a person
sees the apps they connected and revokes them.

The person logs in (same argon2, timing-safe and rate-limited check as the authorization
flow); the session is a short-lived, browser-bound row like a pending authorization.
Revoking an app revokes its whole authorization (token family): its access tokens get 401
at their next FHIR call and its refresh token stops working.
"""

from __future__ import annotations

import html
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from .login import BROWSER_COOKIE, browser_id, render, set_browser_cookie
from .records import revoke_family
from .scopes import describe, parse_scopes
from .server import SmartAuthorizationServer, Urls, current_exchange, sha256_hex
from .tables import auth_requests, clients, tokens
from .users import authenticate, get_user

__all__ = ["MANAGE_CLIENT", "manage_get", "manage_post"]

#: The ``client_id`` under which management sessions are stored (never a real client id).
MANAGE_CLIENT: Final = "__manage__"
_SESSION: Final = 900


@dataclass(frozen=True, slots=True)
class _Grant:
    family_id: str
    client_name: str
    scope: str
    issued_at: int


def _session_user(conn: Connection, session: str, browser: str | None, now: int) -> str | None:
    if not session or not browser or len(session) > 64:
        return None
    row = conn.execute(
        sa.select(auth_requests.c.user_id, auth_requests.c.browser_hash).where(
            auth_requests.c.id == session,
            auth_requests.c.client_id == MANAGE_CLIENT,
            auth_requests.c.expires_at > now,
        )
    ).first()
    if row is None or row[0] is None or not secrets.compare_digest(row[1], sha256_hex(browser)):
        return None
    return str(row[0])


def _grants(conn: Connection, user_id: str, now: int) -> list[_Grant]:
    rows = conn.execute(
        sa.select(tokens.c.family_id, clients.c.client_name, tokens.c.scope, tokens.c.issued_at)
        .select_from(tokens.join(clients, clients.c.client_id == tokens.c.client_id))
        .where(
            tokens.c.user_id == user_id,
            tokens.c.revoked_at.is_(None),
            sa.or_(
                tokens.c.expires_at > now,
                sa.and_(tokens.c.refresh_expires_at > now, tokens.c.refresh_used_at.is_(None)),
            ),
        )
        .order_by(tokens.c.issued_at.desc())
    )
    latest: dict[str, _Grant] = {}
    for family, name, scope, issued in rows:
        latest.setdefault(family, _Grant(family, name, scope, int(issued)))
    return list(latest.values())


def _page(
    server: SmartAuthorizationServer, session: str, browser: str | None, urls: Urls
) -> dict[str, Any]:
    ex = current_exchange()
    user_id = _session_user(ex.conn, session, browser, ex.now)
    if user_id is None:
        return {"login": True}
    user = get_user(ex.conn, user_id)
    if user is None or not user.active:
        return {"login": True}
    return {"user": user.display_name or user.username, "grants": _grants(ex.conn, user_id, ex.now)}


def _submit(
    server: SmartAuthorizationServer,
    form: dict[str, str],
    browser: str,
    client_ip: str,
) -> dict[str, Any]:
    ex = current_exchange()
    if form.get("step") == "login":
        result = authenticate(
            ex.conn,
            form.get("username", "")[:128],
            form.get("password", "")[:1024],
            client_ip=client_ip,
            now=ex.now,
            max_failures=server.settings.login_max_failures,
            window=server.settings.login_window,
        )
        if result.user is None:
            if result.throttled:
                return {"error": "Too many failed attempts. Try again later.", "status": 429}
            return {"error": "Unknown username or wrong password.", "status": 401}
        session = secrets.token_urlsafe(24)
        ex.conn.execute(
            auth_requests.insert().values(
                id=session,
                browser_hash=sha256_hex(browser),
                client_id=MANAGE_CLIENT,
                params="{}",
                user_id=result.user.id,
                auth_time=ex.now,
                created_at=ex.now,
                expires_at=ex.now + _SESSION,
            )
        )
        return {"session": session}
    session = form.get("session", "")
    user_id = _session_user(ex.conn, session, browser, ex.now)
    if user_id is None:
        return {"error": "Your session has expired; sign in again.", "status": 401}
    if form.get("step") == "revoke":
        family = form.get("family", "")
        owned = {g.family_id for g in _grants(ex.conn, user_id, ex.now)}
        if family in owned:
            revoke_family(ex.conn, family, now=ex.now)
    return {"session": session}


def _login_page(urls: Urls, message: str = "", status: int = 200) -> Response:
    error = f'<p class="error">{html.escape(message)}</p>' if message else ""
    content = (
        f'{error}<form method="post" action="{html.escape(urls.manage)}">'
        '<input type="hidden" name="step" value="login">'
        '<label for="username">Username</label>'
        '<input type="text" id="username" name="username" autocomplete="username" required>'
        '<label for="password">Password</label>'
        '<input type="password" id="password" name="password" required>'
        '<button type="submit">Sign in</button></form>'
    )
    return render(
        "manage.html",
        title="Connected apps",
        status=status,
        user_name="(not signed in)",
        notice_html=content,
        grants_html="",
    )


def _grants_page(urls: Urls, session: str, user: str, grants: list[_Grant]) -> Response:
    items = []
    for grant in grants:
        when = datetime.fromtimestamp(grant.issued_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
        scopes = "".join(
            f"<li>{html.escape(describe(s))}</li>"
            for s in parse_scopes(grant.scope, on_invalid="ignore")
        )
        items.append(
            f"<li><strong>{html.escape(grant.client_name)}</strong> "
            f'<span class="muted">since {when}</span><ul>{scopes}</ul>'
            f'<form method="post" action="{html.escape(urls.manage)}">'
            f'<input type="hidden" name="session" value="{html.escape(session)}">'
            '<input type="hidden" name="step" value="revoke">'
            f'<input type="hidden" name="family" value="{html.escape(grant.family_id)}">'
            '<button type="submit">Revoke access</button></form></li>'
        )
    notice = "" if items else '<p class="muted">No app has access to your records.</p>'
    return render(
        "manage.html",
        title="Connected apps",
        user_name=user,
        notice_html=notice,
        grants_html="\n".join(items),
    )


async def manage_get(
    request: Request, *, server: SmartAuthorizationServer, urls: Urls, run: Any
) -> Response:
    """``GET /manage[?session=…]``: the login form, or the list of connected apps."""
    session = request.query_params.get("session", "")
    view = await run_in_threadpool(
        run, urls, _page, server, session, request.cookies.get(BROWSER_COOKIE), urls
    )
    if view.get("login"):
        return _login_page(urls)
    return _grants_page(urls, session, view["user"], view["grants"])


async def manage_post(
    request: Request, *, server: SmartAuthorizationServer, urls: Urls, run: Any, cookie_path: str
) -> Response:
    """``POST /manage``: sign in, or revoke one app."""
    body = (await request.body()).decode("utf-8", "replace")
    form = dict(parse_qsl(body, keep_blank_values=True))
    if any("\x00" in key or "\x00" in value for key, value in form.items()):
        return _login_page(urls, "The form contains a NUL character.", 400)
    browser, new = browser_id(request)
    client_ip = request.client.host if request.client else "?"
    outcome = await run_in_threadpool(run, urls, _submit, server, form, browser, client_ip)
    if "error" in outcome:
        return _login_page(urls, outcome["error"], outcome["status"])
    response = RedirectResponse(
        f"{urls.manage}?{urlencode({'session': outcome['session']})}", status_code=303
    )
    if new:
        set_browser_cookie(response, browser, request, cookie_path)
    return response
