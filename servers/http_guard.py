"""The door of every Corral HTTP endpoint: Host/Origin checks, then a bearer token.

    421  Host header not one of ours  (DNS rebinding: a foreign name resolving to 127.0.0.1)
    403  Origin header not one of ours (a web page in the user's browser calling us)
    401  no or wrong token (`Authorization: Bearer ...`; the viewer pages also take a cookie)

A browser logs in once with `/sessions?token=...`: the guard answers with an HttpOnly,
SameSite=Strict cookie and a redirect to the same page without the token, so the
token leaves the address bar (and the history) at once. The cookie is NOT the token:
browsers send 127.0.0.1's cookies to every port of 127.0.0.1, so a web app served from a
sandbox on another local port could read it. It is a viewer session instead: random,
kept only in this process's memory, expiring after `VIEWER_TTL_S`, named after the port
(`corral_viewer_8750`: another local server's cookie of the same name does not clobber
it), accepted only on the viewer's paths and only for GET/HEAD, so
whoever holds it can read the log and nothing else. The MCP endpoints take the bearer
token only.

The SDK's own transport check still runs inside each MCP endpoint; this one also
covers the viewer pages and answers before any MCP machinery is touched.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlencode

from mcp.server.transport_security import TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.auth import token_matches

__all__ = ["HTTPGuard", "ViewerSessions", "viewer_cookie"]

VIEWER_TTL_S = 12 * 3600  # a working day: then the link `corral up` printed logs in again
MAX_VIEWER_SESSIONS = 64  # logins need the token, but each adds an entry: keep the newest
READ_METHODS = ("GET", "HEAD")


def viewer_cookie(port: int) -> str:
    return f"corral_viewer_{port}"


class ViewerSessions:
    """The viewer's own credential: random values with an expiry, in this process only."""

    def __init__(self, ttl_s: float = VIEWER_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._expiry: dict[str, float] = {}

    def start(self) -> str:
        now = time.monotonic()
        self._expiry = {v: t for v, t in self._expiry.items() if t > now}
        while len(self._expiry) >= MAX_VIEWER_SESSIONS:
            del self._expiry[next(iter(self._expiry))]  # the oldest (dicts keep insertion order)
        value = secrets.token_urlsafe(32)
        self._expiry[value] = now + self.ttl_s
        return value

    def valid(self, value: str | None) -> bool:
        # A dict lookup by the offered value: its time does not depend on how much of a stored value matches.
        return value is not None and self._expiry.get(value, 0.0) > time.monotonic()


class HTTPGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        security: TransportSecuritySettings,
        token: str | None,
        open_paths: Sequence[str] = (),
        cookie_paths: Sequence[str] = (),
        cookie_name: str = "corral_viewer",
    ) -> None:
        self.app = app
        self.security = security
        self.token = token
        self.open_paths = tuple(open_paths)
        self.cookie_paths = tuple(cookie_paths)
        self.cookie_name = cookie_name
        self.viewers = ViewerSessions()
        # A Corral error that failed the app's start-up (set by its lifespan), for the caller to report.
        self.startup_error: Exception | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        answer = self._check(scope) or self._login(scope)
        if answer is not None:
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _login(self, scope: Scope) -> Response | None:
        """`?token=` on a viewer page: set the cookie and redirect to the page without it."""
        if self.token is None or not self.cookie_paths or not scope["path"].startswith(self.cookie_paths):
            return None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" not in query:
            return None
        if not token_matches(self.token, query["token"][0]):
            return PlainTextResponse("wrong token\n", status_code=401)
        rest = urlencode([(k, v) for k, vs in query.items() if k != "token" for v in vs])
        response = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), status_code=303)
        # Path "/": `/sessions.json` does not path-match a cookie for "/sessions"; only the viewer's paths accept it anyway.
        response.set_cookie(
            self.cookie_name,
            self.viewers.start(),
            max_age=int(self.viewers.ttl_s),
            httponly=True,
            samesite="strict",
            path="/",
        )
        return response

    def _check(self, scope: Scope) -> PlainTextResponse | None:
        headers = Headers(scope=scope)
        if headers.get("host") not in self.security.allowed_hosts:
            return PlainTextResponse("Invalid Host header\n", status_code=421)
        origin = headers.get("origin")
        if origin is not None and origin not in self.security.allowed_origins:
            return PlainTextResponse("Invalid Origin header\n", status_code=403)
        path: str = scope["path"]
        if self.token is None or path in self.open_paths or self._authorized(headers, path, scope["method"]):
            return None
        if (
            path.startswith(self.cookie_paths)
            and self.cookie_paths
            and "token=" in scope.get("query_string", b"").decode("latin-1")
        ):
            return None  # a login attempt: `_login` judges the token
        viewer = bool(self.cookie_paths) and path.startswith(self.cookie_paths)
        how = (
            "open the /sessions?token=... link `corral up` printed"
            if viewer
            else "send 'Authorization: Bearer <token>'"
        )
        return PlainTextResponse(
            f"missing or wrong bearer token: {how} (the token is in $CORRAL_HOME/token)\n",
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="corral"'},
        )

    def _authorized(self, headers: Headers, path: str, method: str) -> bool:
        assert self.token is not None
        scheme, _, offered = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token_matches(self.token, offered.strip()):
            return True
        if path.startswith(self.cookie_paths) and self.cookie_paths and method in READ_METHODS:
            return self.viewers.valid(_cookie(headers, self.cookie_name))
        return False


def _cookie(headers: Headers, name: str) -> str | None:
    try:
        jar = SimpleCookie(headers.get("cookie", ""))
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel else None
