"""The session tools, driven through a real MCP client (in memory)."""

from __future__ import annotations

import json

import pytest
from mcp.client import Client

from corral.servers.session import open_store
from corral.servers.session.server import build_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path / "s.db"), max_event_bytes=2048)
    yield s
    s.close()


@pytest.fixture
async def client(store):
    async with Client(build_server(store)) as c:
        yield c


async def call(client, name, **args):
    result = await client.call_tool(name, args)
    assert not result.is_error, result.content[0].text
    return json.loads(result.content[0].text)


async def error(client, name, **args) -> str:
    result = await client.call_tool(name, args)
    assert result.is_error, result.content
    return result.content[0].text


async def test_a_non_string_status_does_not_break_the_session_listing(client):
    sid = (await call(client, "create_session"))["session_id"]
    for raw in (3, {"state": "odd"}, None):
        await call(client, "emit_event", session_id=sid, type="session.status", data={"status": raw})
        listed = await client.call_tool("list_sessions", {})
        got = await client.call_tool("get_session", {"session_id": sid})
        assert not listed.is_error and not got.is_error, (listed.content, got.content)
        status = listed.structured_content["sessions"][0]["status"]
        assert status == got.structured_content["status"] == (None if raw is None else json.dumps(raw))


async def test_tools_and_annotations_are_honest(client):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {
        "create_session",
        "emit_event",
        "get_events",
        "slice",
        "rewind",
        "fork",
        "get_session",
        "list_sessions",
    }
    for name in ("get_events", "slice", "rewind", "get_session", "list_sessions"):
        assert tools[name].annotations.read_only_hint is True, name
    for name in ("create_session", "emit_event", "fork"):
        assert tools[name].annotations.read_only_hint is False, name
    props = tools["emit_event"].input_schema["properties"]
    assert all(props[p].get("description") for p in ("session_id", "type", "expected_position", "event_id"))


async def test_a_session_life_through_the_tools(client):
    sid = (await call(client, "create_session", metadata={"task": "demo"}))["session_id"]
    for i in range(5):
        assert (await call(client, "emit_event", session_id=sid, type="user.message", data={"i": i}))["position"] == i
    page = await call(client, "get_events", session_id=sid, limit=2)
    assert [e["position"] for e in page["events"]] == [0, 1] and page["next_after"] == 1
    page = await call(client, "get_events", session_id=sid, after=page["next_after"], limit=10)
    assert [e["data"]["i"] for e in page["events"]] == [2, 3, 4]
    newest = await call(client, "get_events", session_id=sid, order="desc", limit=2)
    assert [e["position"] for e in newest["events"]] == [4, 3]
    assert [e["position"] for e in (await call(client, "slice", session_id=sid, start=1, end=3))["events"]] == [1, 2]
    assert [e["position"] for e in (await call(client, "rewind", session_id=sid, before=4, count=2))["events"]] == [
        2,
        3,
    ]
    info = await call(client, "get_session", session_id=sid)
    assert info["length"] == 5 and info["metadata"] == {"task": "demo"}
    assert sid in [s["session_id"] for s in (await call(client, "list_sessions"))["sessions"]]


async def test_rewind_by_event_id_and_fork(client):
    sid = (await call(client, "create_session"))["session_id"]
    for i in range(4):
        await call(client, "emit_event", session_id=sid, type="agent.message", data={"i": i}, event_id=f"m{i}")
    back = await call(client, "rewind", session_id=sid, before="m3", count=10)
    assert [e["event_id"] for e in back["events"]] == ["m0", "m1", "m2"]
    child = (await call(client, "fork", session_id=sid, at=2))["session_id"]
    await call(client, "emit_event", session_id=child, type="user.message", data={"i": "branch"})
    events = (await call(client, "get_events", session_id=child))["events"]
    assert [e["data"]["i"] for e in events] == [0, 1, "branch"]
    assert (await call(client, "get_session", session_id=child))["parent"] == sid
    assert (await call(client, "get_session", session_id=sid))["length"] == 4


async def test_idempotent_and_conflicting_emits(client, store):
    sid = (await call(client, "create_session"))["session_id"]
    first = await call(
        client, "emit_event", session_id=sid, type="user.message", data={"t": "hi"}, event_id="u1", expected_position=0
    )
    again = await call(
        client, "emit_event", session_id=sid, type="user.message", data={"t": "hi"}, event_id="u1", expected_position=0
    )
    assert first == again == {"position": 0}
    text = await error(client, "emit_event", session_id=sid, type="user.message", data={}, expected_position=0)
    assert "conflict:" in text and "nothing was written" in text
    assert store.length(sid) == 1


@pytest.mark.parametrize(
    "name, args, kind, words",
    [
        ("get_events", {"session_id": "ses_nope"}, "not_found", "ses_nope"),
        ("emit_event", {"session_id": "ses_nope", "type": "a.b", "data": {}}, "not_found", "list_sessions"),
        ("slice", {"session_id": "SID", "start": 3, "end": 1}, "invalid_argument", "start <= end"),
        ("slice", {"session_id": "SID", "start": 9, "end": 12}, "invalid_argument", "past the end"),
        ("slice", {"session_id": "SID", "start": 0, "end": 5000}, "invalid_argument", "pages"),
        ("get_events", {"session_id": "SID", "limit": -1}, "invalid_argument", "limit"),
        ("get_events", {"session_id": "SID", "after": -5}, "invalid_argument", "after"),
        ("rewind", {"session_id": "SID", "before": 99}, "invalid_argument", "out of range"),
        ("rewind", {"session_id": "SID", "before": "no-such-event"}, "not_found", "no-such-event"),
        ("rewind", {"session_id": "SID", "before": 1, "count": 0}, "invalid_argument", "count"),
        ("fork", {"session_id": "SID", "at": 7}, "invalid_argument", "out of range"),
        (
            "emit_event",
            {"session_id": "SID", "type": "nodomain", "data": {}},
            "invalid_argument",
            "type: String should match",
        ),
        ("emit_event", {"session_id": "SID", "type": "a.b", "data": {"blob": "x" * 5000}}, "invalid_argument", "limit"),
        (
            "emit_event",
            {"session_id": "SID", "type": "a.b", "data": {}, "expected_position": -1},
            "invalid_argument",
            "negative",
        ),
    ],
)
async def test_bad_input_is_a_clear_error_and_loses_nothing(client, store, name, args, kind, words):
    sid = (await call(client, "create_session"))["session_id"]
    await call(client, "emit_event", session_id=sid, type="user.message", data={"keep": True})
    args = {k: (sid if v == "SID" else v) for k, v in args.items()}
    text = await error(client, name, **args)
    assert f"{kind}:" in text and words in text, text
    assert [e.data for e in store.select(sid)] == [{"keep": True}]
