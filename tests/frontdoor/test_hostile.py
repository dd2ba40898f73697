"""Hostile traffic at the front door: what a local process without the token can try."""

from __future__ import annotations

import json
import resource
import socket
import time
from pathlib import Path

import httpx

from corral.servers.session import SessionSettings
from tests.conftest import free_port
from tests.frontdoor.conftest import UpProcess, corral, start_up, token_of

FLOOD = 1100  # more than the 1024 descriptors a process usually may open
HALF_HEAD = b"GET /sessions.json HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # and then nothing, ever


def slow_socket(port: int) -> socket.socket | None:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(HALF_HEAD)
    except OSError:  # a full backlog: the flood's problem, not ours
        s.close()
        return None
    return s


def test_slow_half_heads_neither_lock_out_token_holders_nor_flood_the_log(corral_env: dict[str, str]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FLOOD + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, FLOOD + 500), hard))
    # `corral up` with the usual descriptor limit of a desktop session.
    up = start_up(corral_env, free_port(), prefix=["prlimit", "--nofile=1024:1024"])
    token = token_of(corral_env)
    attackers: list[socket.socket] = []
    try:
        # A head that never completes is closed after the header timeout.
        lone = slow_socket(up.port)
        assert lone is not None
        lone.settimeout(30)
        started = time.monotonic()
        assert lone.recv(100) == b"", "the server answered a half request head"
        assert 5 < time.monotonic() - started < 25
        lone.close()

        attackers = [s for s in (slow_socket(up.port) for _ in range(FLOOD)) if s is not None]
        assert len(attackers) > 1000
        with httpx.Client(base_url=up.base, timeout=10, headers={"Authorization": f"Bearer {token}"}) as http:
            for _ in range(3):  # each request on a fresh connection, while the flood holds its sockets
                started = time.monotonic()
                answer = http.get("/sessions.json", headers={"Connection": "close"})
                assert answer.status_code == 200, answer.text
                assert time.monotonic() - started < 3, "a token holder waited on the flood"
    finally:
        for s in attackers:
            s.close()
        assert up.stop() == 0
    notices = [line for line in up.lines if "closing connections" in line]
    assert 1 <= len(notices) <= 2, up.output  # said once, not once per connection
    assert "Traceback" not in up.output and "out of system resource" not in up.output, up.output


def deep(levels: int) -> object:
    value: object = "bottom"
    for _ in range(levels):
        value = {"content": [value]}
    return value


# Each of these once made the viewer's events.json answer 500 from that event on, or
# `corral sessions show`/`list` exit 1 (rich markup, a JSON parser's stack, a join of names).
HOSTILE = [
    ("agent.tool_result", {"tool_use_id": "t1", "content": "[" * 2000}),  # a subagent summary the model wrote
    ("agent.message", {"text": "[" * 2000}),
    ("agent.tool_use", {"id": "t2", "name": 7, "input": {"n": 1}}),
    ("agent.tool_result", {"tool_use_id": "t2", "name": 7, "content": [{"type": "text", "text": "{" * 2000}]}),
    ("session.tools", {"tools": [{"name": 7}, {"name": None}]}),
    ("agent.message", deep(400)),  # 800 levels of JSON
    ("custom.thing", deep(400)),
    ("span.model_request", {"usage": {"input_tokens": "many"}, "latency_ms": "slow"}),
    ("session.status", {"status": "[/bold] idle", "reason": "[red]x[/blue]"}),
    ("agent.message", {"text": "still readable after all that"}),
]


def hostile_session(home: Path) -> str:
    store = SessionSettings(home=home).open_store()
    try:
        sid = store.create({"title": "[/bold] hostile [link=x]"}).session_id
        for type_, data in HOSTILE:
            store.append_one(sid, type_, data)
        return sid
    finally:
        store.close()


def test_hostile_events_do_not_break_sessions_show_or_list(corral_env: dict[str, str]) -> None:
    sid = hostile_session(Path(corral_env["CORRAL_HOME"]))
    shown = corral("sessions", "show", sid, env={**corral_env, "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "still readable after all that" in shown.stdout and "[/bold] idle" in shown.stdout
    as_json = corral("sessions", "show", sid, "--json", env=corral_env)
    assert as_json.returncode == 0, as_json.stderr
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [e["type"] for e in lines] == [t for t, _ in HOSTILE]
    assert lines[0]["data"]["content"] == "[" * 2000  # data is printed, not summarised
    listed = corral("sessions", "list", env={**corral_env, "COLUMNS": "200"})
    assert listed.returncode == 0 and "[/bold] hostile" in listed.stdout, listed.stderr


def test_hostile_events_do_not_break_the_viewer(up: UpProcess) -> None:
    sid = hostile_session(Path(up.env["CORRAL_HOME"]))
    with httpx.Client(base_url=up.base, timeout=10, headers={"Authorization": f"Bearer {token_of(up.env)}"}) as http:
        answer = http.get(f"/sessions/{sid}/events.json")
        assert answer.status_code == 200, answer.text
        events = answer.json()["events"]
        assert [e["type"] for e in events] == [t for t, _ in HOSTILE]
        assert events[-1]["text"] == "still readable after all that"
        assert all(len(e["text"]) <= 600 for e in events)  # clipped, whatever the data
        listing = http.get("/sessions.json")
        assert listing.status_code == 200 and any(s["session_id"] == sid for s in listing.json()["sessions"])
