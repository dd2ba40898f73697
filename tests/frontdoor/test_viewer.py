"""The session viewer: the web page in real headless Chromium, the timeline in a terminal."""

from __future__ import annotations

import os
import re

import httpx
import pytest

from corral.servers.http_guard import ViewerSessions
from tests.frontdoor.conftest import CORRAL, UpProcess, corral, token_of
from tests.frontdoor.test_up import mcp_client
from tests.parts import CHROMIUM

pytestmark = pytest.mark.anyio
# Headless, and nothing but loopback: every other host fails to resolve and goes to a dead proxy.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
XSS = "<img src=x onerror=\"document.title='pwned'\">"


async def emit(client, session_id: str, type_: str, data: dict) -> int:
    result = await client.call_tool("emit_event", {"session_id": session_id, "type": type_, "data": data})
    assert not result.is_error, result
    return result.structured_content["position"]


@pytest.mark.requires("chromium")
async def test_web_viewer_lists_sessions_and_follows_one_live(up: UpProcess) -> None:
    from playwright.async_api import async_playwright, expect

    token = token_of(up.env)
    async with mcp_client(f"{up.base}/session/mcp", token) as client:
        created = await client.call_tool("create_session", {"metadata": {"title": "seen in a browser"}})
        sid = created.structured_content["session_id"]
        await emit(client, sid, "user.message", {"text": "count the files"})

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page()
                landed = await page.goto(f"{up.base}/sessions?token={token}")
                assert page.url == f"{up.base}/sessions"  # the token left the address bar
                cookies = await page.context.cookies()
                assert [c["name"] for c in cookies] == [f"corral_viewer_{up.port}"]  # bound to the port
                assert token not in cookies[0]["value"] and cookies[0]["httpOnly"]  # the browser never holds the token
                csp = (await landed.all_headers())["content-security-policy"]
                scripts = re.search(r"script-src ([^;]*)", csp).group(1)
                assert scripts.startswith("'sha256-") and "unsafe" not in scripts  # only our own script runs
                row = page.locator(f"tr.session[data-id='{sid}']")
                await expect(row).to_contain_text("seen in a browser", timeout=10_000)
                await row.locator("a").click()
                await expect(page).to_have_url(f"{up.base}/sessions/{sid}")
                await expect(page.locator("tr.event[data-position='0']")).to_contain_text(
                    "count the files", timeout=10_000
                )

                # Appended while the page is open: it shows up without a reload.
                await emit(
                    client,
                    sid,
                    "span.model_request",
                    {
                        "usage": {
                            "input_tokens": 1200,
                            "output_tokens": 80,
                            "cache_read_input_tokens": 900,
                            "cache_creation_input_tokens": 300,
                        }
                    },
                )
                await emit(
                    client,
                    sid,
                    "agent.message",
                    {
                        "content": [
                            {"type": "text", "text": "Let me look."},
                            {"type": "tool_use", "id": "tu1", "name": "execute", "input": {"command": "ls | wc -l"}},
                        ]
                    },
                )
                await emit(
                    client, sid, "agent.tool_use", {"id": "tu1", "name": "execute", "input": {"command": "ls | wc -l"}}
                )
                await emit(client, sid, "sandbox.provisioned", {"sandbox_id": "sbx_1", "backend": "bubblewrap"})
                await emit(
                    client,
                    sid,
                    "agent.tool_result",
                    {"tool_use_id": "tu1", "content": "sandbox_lost: gone", "is_error": True},
                )
                await emit(client, sid, "agent.message", {"text": XSS})
                await expect(page.locator("tr.event")).to_have_count(7, timeout=10_000)
                await expect(page.locator("tr.event.usage")).to_contain_text("input 1200")
                await expect(page.locator("tr.event.tool")).to_contain_text("ls | wc -l")
                await expect(page.locator("tr.event.sandbox")).to_contain_text("sbx_1")
                await expect(page.locator("tr.event.error")).to_contain_text("sandbox_lost: gone")
                await expect(page.locator("#figures")).to_contain_text(
                    "in 1200 · out 80 · cache read 900 · cache write 300"
                )
                # Event data is shown as text, never run as markup.
                await expect(page.locator("tr.event[data-position='6']")).to_contain_text(XSS)
                assert await page.locator("#rows img").count() == 0
                assert await page.title() != "pwned"

                # A browser without the cookie is turned away.
                stranger = await browser.new_page()
                response = await stranger.goto(f"{up.base}/sessions/{sid}")
                assert response is not None and response.status == 401
                wrong = await stranger.goto(f"{up.base}/sessions?token=not-the-token")
                assert wrong is not None and wrong.status == 401
            finally:
                await browser.close()


async def test_terminal_timeline_of_a_session(up: UpProcess) -> None:
    token = token_of(up.env)
    async with mcp_client(f"{up.base}/session/mcp", token) as client:
        sid = (await client.call_tool("create_session", {})).structured_content["session_id"]
        await emit(client, sid, "user.message", {"text": "hello"})
        await emit(client, sid, "agent.tool_use", {"id": "t", "name": "execute", "input": {"command": "make test"}})
        await emit(client, sid, "agent.tool_result", {"tool_use_id": "t", "content": "exit 2", "is_error": True})
        await emit(client, sid, "span.model_request", {"usage": {"input_tokens": 50, "output_tokens": 7}})
    env = {**up.env, "COLUMNS": "120"}
    done = corral("sessions", "show", sid, env=env)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"⚙\s+agent.tool_use\s+execute \{\"command\": \"make test\"\}", out), out
    assert re.search(r"✗\s+agent.tool_result\s+exit 2", out), out
    assert "tokens: in 50  out 7" in out
    assert os.environ.get("CORRAL_HOME") != up.env["CORRAL_HOME"]
    assert os.access(CORRAL, os.X_OK)


MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}


def viewer_login(up: UpProcess, http: httpx.Client) -> str:
    """Open the `?token=` link; return the viewer cookie's value (checking how it is set)."""
    token = token_of(up.env)
    login = http.get(f"/sessions?token={token}")
    assert login.status_code == 303 and login.headers["location"] == "/sessions"
    set_cookie = login.headers["set-cookie"]
    name, _, rest = set_cookie.partition("=")
    value = rest.split(";", 1)[0]
    assert name == f"corral_viewer_{up.port}", set_cookie
    assert token not in set_cookie and len(value) >= 32, "the cookie must not carry the bearer token"
    assert all(flag in set_cookie.lower() for flag in ("httponly", "samesite=strict", "max-age=")), set_cookie
    http.cookies.clear()  # each request below says which cookie it sends
    return value


def cookie(name: str, value: str) -> dict[str, str]:
    return {"Cookie": f"{name}={value}"}


def test_the_viewer_cookie_is_its_own_read_only_credential(up: UpProcess) -> None:
    token = token_of(up.env)
    with httpx.Client(base_url=up.base, timeout=10) as http:
        value = viewer_login(up, http)
        jar = cookie(f"corral_viewer_{up.port}", value)
        assert http.get("/sessions.json", headers=jar).status_code == 200
        assert http.get("/sessions", headers=jar).status_code == 200
        assert value != viewer_login(up, http)  # each login is a fresh random value
        for name in ("session", "sandbox", "credentials"):  # the MCP endpoints never take it, in any form
            assert http.post(f"/{name}/mcp", json=INIT, headers={**MCP_HEADERS, **jar}).status_code == 401
            assert (
                http.post(
                    f"/{name}/mcp", json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {value}"}
                ).status_code
                == 401
            )
        # Read-only: only GET/HEAD pass with it.
        assert http.post("/sessions.json", headers=jar).status_code == 401
        # The token itself in a cookie (what the old viewer set) is no credential, under any name.
        for name in (f"corral_viewer_{up.port}", "corral_token"):
            assert http.get("/sessions.json", headers=cookie(name, token)).status_code == 401
        # Another port's cookie does not open this viewer.
        assert http.get("/sessions.json", headers=cookie(f"corral_viewer_{up.port + 1}", value)).status_code == 401


def test_viewer_sessions_expire() -> None:
    sessions = ViewerSessions(ttl_s=0.2)
    value = sessions.start()
    assert sessions.valid(value) and not sessions.valid(value[:-1] + "x") and not sessions.valid(None)
    import time

    time.sleep(0.3)
    assert not sessions.valid(value)
