"""The read-only session viewer `corral up` serves at `/sessions`.

    GET /sessions                     the list of sessions (refreshes itself)
    GET /sessions/{id}                one session's timeline, live (polls for new events)
    GET /sessions.json                the list as JSON
    GET /sessions/{id}/events.json    the newest events with their one-line summaries;
                                      `?after=N`: the oldest after N (following live),
                                      `?before=N`: the newest before N (paging back)

Every answer is at most PAGE_LIMIT events read through the store's position index, so a
session of a million events opens at its tail as fast as one of ten (issue 15).

Read-only by construction: the routes only call the store's read verbs. The page builds
its DOM with `textContent` (event data is untrusted: a model wrote it) under a strict
Content-Security-Policy; authentication is the guard's (`servers/http_guard.py`).
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from corral.errors import CorralError, NotFound
from corral.servers.session import EventStore
from corral.viewer.summary import compact, summarize

__all__ = ["COOKIE_PATHS", "viewer_routes"]

COOKIE_PATHS = ("/sessions",)
PAGE_LIMIT = 500
HEADERS = {
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


def _page() -> str:
    return resources.files("corral.viewer").joinpath("page.html").read_text(encoding="utf-8")


def _csp(page: str) -> str:
    """Only the page's own inline script may run (pinned by its hash), and it may only fetch from us."""
    script = re.search(r"<script>(.*?)</script>", page, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode() if script else ""
    return (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _session_json(info: Any) -> dict[str, Any]:
    return {
        "session_id": info.session_id,
        "created_at": info.created_at.isoformat(),
        "length": info.length,
        "status": info.status
        if info.status is None or isinstance(info.status, str)
        else compact(info.status),  # stored data: any JSON
        "parent": info.parent,
        "title": _title(info.metadata),
    }


def _title(metadata: dict[str, Any]) -> str:
    for key in ("title", "task", "name", "label"):
        if isinstance(metadata.get(key), str):
            return metadata[key][:120]
    return ""


def _event_json(event: Any) -> dict[str, Any]:
    line = summarize(event.type, event.data)
    return {
        "position": event.position,
        "type": event.type,
        "created_at": event.created_at.isoformat(),
        "kind": line.kind,
        "title": line.title,
        "text": line.text,
        "usage": line.usage,
        # a checkpoint's id: the page marks its row and gives it an anchor (#checkpoint-ID)
        "checkpoint": _checkpoint_of(event),
    }


def _checkpoint_of(event: Any) -> str | None:
    if event.type != "sandbox.checkpoint" or not isinstance(event.data, dict):
        return None
    cid = event.data.get("checkpoint_id")
    return cid if isinstance(cid, str) else None


def _window(query: Any) -> dict[str, Any]:
    """The store's select arguments for `?after=N`, `?before=N` or neither (the tail)."""
    if "after" in query and "before" in query:
        raise ValueError("give after or before, not both")
    for name in ("after", "before"):
        if name in query:
            try:
                value = int(query[name])
            except ValueError:
                raise ValueError(f"{name} must be an integer") from None
            if name == "after":
                return {"gte": max(value + 1, 0)}
            if value < 0:
                raise ValueError("before must not be negative")
            return {"lt": value, "desc": True}
    return {"desc": True}


def viewer_routes(store: EventStore) -> list[Route]:
    html = _page()
    page_headers = {**HEADERS, "Content-Security-Policy": _csp(html)}

    async def page(_: Request) -> Response:
        return HTMLResponse(html, headers=page_headers)

    async def sessions_json(_: Request) -> Response:
        infos = await run_in_threadpool(store.sessions, 200)
        return JSONResponse({"sessions": [_session_json(i) for i in infos]}, headers=HEADERS)

    async def events_json(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        try:
            window = _window(request.query_params)
        except ValueError as err:
            return JSONResponse({"error": f"invalid_argument: {err}"}, status_code=400, headers=HEADERS)
        try:
            info = await run_in_threadpool(store.get, session_id)
            events = await run_in_threadpool(lambda: store.select(session_id, limit=PAGE_LIMIT, **window))
        except NotFound as err:
            return JSONResponse({"error": str(err)}, status_code=404, headers=HEADERS)
        except CorralError as err:
            return JSONResponse({"error": str(err)}, status_code=503, headers=HEADERS)
        events.sort(key=lambda e: e.position)  # always oldest first, whichever end was read
        return JSONResponse(
            {"session": _session_json(info), "events": [_event_json(e) for e in events]}, headers=HEADERS
        )

    return [
        Route("/sessions", page),
        Route("/sessions.json", sessions_json),
        Route("/sessions/{session_id}/events.json", events_json),
        Route("/sessions/{session_id}", page),
    ]
