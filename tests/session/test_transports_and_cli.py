"""End to end: `corral serve session` over real stdio and streamable HTTP; `corral sessions` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from mcp import StdioServerParameters
from mcp.client import Client

from corral.servers.session import open_store
from tests.conftest import bearer_client, free_port, wait_listening

pytestmark = pytest.mark.anyio


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    monkeypatch.delenv("CORRAL_SESSION_STORE", raising=False)
    return tmp_path


def corral(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral.cli", *args], capture_output=True, text=True, timeout=timeout)


async def exercise(client: Client) -> str:
    sid = json.loads((await client.call_tool("create_session", {"metadata": {"via": "e2e"}})).content[0].text)[
        "session_id"
    ]
    for i in range(3):
        r = await client.call_tool("emit_event", {"session_id": sid, "type": "user.message", "data": {"i": i}})
        assert not r.is_error
    page = json.loads((await client.call_tool("get_events", {"session_id": sid})).content[0].text)
    assert [e["data"]["i"] for e in page["events"]] == [0, 1, 2]
    bad = await client.call_tool("slice", {"session_id": sid, "start": 2, "end": 1})
    assert bad.is_error and "invalid_argument" in bad.content[0].text
    return sid


async def test_over_stdio(home):
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "corral.cli", "serve", "session"], env={**os.environ}
    )
    async with Client(params) as client:
        sid = await exercise(client)
    store = open_store(str(home / "sessions.db"))
    assert store.get(sid).length == 3 and store.get(sid).metadata == {"via": "e2e"}


async def test_over_streamable_http(home):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "serve", "session", "--http", f"127.0.0.1:{port}"], stderr=subprocess.PIPE
    )
    try:
        wait_listening(port, proc)
        async with bearer_client(f"http://127.0.0.1:{port}/mcp", home) as client:
            sid = await exercise(client)
        assert open_store(str(home / "sessions.db")).get(sid).length == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_http_refuses_no_token_and_a_foreign_host_or_origin(home):
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "serve", "session", "--http", f"127.0.0.1:{port}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, proc)
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "0"},
            },
        }
        headers = {"Accept": "application/json, text/event-stream"}
        anonymous = httpx.post(f"http://127.0.0.1:{port}/mcp", json=body, headers=headers)
        assert anonymous.status_code == 401
        headers["Authorization"] = f"Bearer {(home / 'token').read_text().strip()}"
        assert httpx.post(f"http://127.0.0.1:{port}/mcp", json=body, headers=headers).status_code == 200
        rebinding = httpx.post(
            f"http://127.0.0.1:{port}/mcp", json=body, headers={**headers, "Host": "evil.example:80"}
        )
        assert rebinding.status_code == 421
        foreign = httpx.post(
            f"http://127.0.0.1:{port}/mcp", json=body, headers={**headers, "Origin": "http://evil.example"}
        )
        assert foreign.status_code == 403
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_list_show_fork_and_errors(home):
    store = open_store(str(home / "sessions.db"))
    sid = store.create({"title": "cli demo"}).session_id
    store.append_one(sid, "user.message", {"text": "write a haiku"})
    store.append_one(sid, "agent.message", {"text": "ok, here it is"})
    listed = corral("sessions", "list")
    assert listed.returncode == 0 and sid in listed.stdout and "cli demo" in listed.stdout
    shown = corral("sessions", "show", sid)
    assert shown.returncode == 0
    assert "user.message" in shown.stdout and "write a haiku" in shown.stdout and "ok, here it is" in shown.stdout
    as_json = [json.loads(line) for line in corral("sessions", "show", sid, "--json").stdout.splitlines()]
    assert [e["position"] for e in as_json] == [0, 1]
    forked = corral("sessions", "fork", sid, "--at", "1")
    child = forked.stdout.strip()
    assert forked.returncode == 0 and [e.data["text"] for e in store.select(child)] == ["write a haiku"]
    for args, words in (
        (("sessions", "show", "ses_missing"), "not_found"),
        (("sessions", "fork", sid, "--at", "9"), "invalid_argument"),
    ):
        bad = corral(*args)
        assert bad.returncode != 0 and words in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_tail_follows_new_events(home):
    store = open_store(str(home / "sessions.db"))
    sid = store.create().session_id
    store.append_one(sid, "user.message", {"text": "before"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "sessions", "tail", sid, "--interval", "0.05"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "before" in proc.stdout.readline()
        store.append_one(sid, "agent.message", {"text": "live one"})
        started = time.monotonic()
        assert "live one" in proc.stdout.readline()
        assert time.monotonic() - started < 5
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_list_says_why_a_session_failed_and_how_many_tries_it_took(home):
    store = open_store(str(home / "sessions.db"))
    sid = store.create({"title": "flaky"}).session_id
    why = "unavailable: append: the session database stayed unreachable for over 300s"
    for status in ("running", "failed", "running", "failed"):
        store.append_one(
            sid, "session.status", {"status": status, "writer": "w", "reason": why if status == "failed" else "wake"}
        )
    done = store.create({"title": "fine"}).session_id
    store.append_one(done, "session.status", {"status": "running", "writer": "w", "reason": "run"})
    store.append_one(done, "session.status", {"status": "idle", "writer": "w", "reason": "end_turn"})
    listed = corral("sessions", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip().startswith("ses_")}
    assert why in rows[sid] and rows[sid].split()[5] == "2", rows[sid]  # session, date, time, events, status, tries
    assert "fine" in rows[done] and rows[done].split()[5] == "1", rows[done]
