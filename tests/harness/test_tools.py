"""Tool failures are the model's to handle: a dead server, a timeout, an unknown tool, a failing
subagent; and subagents run in parallel in their own linked sessions."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.harness.run import run_session
from corral.harness.view import NullView
from corral.servers.session import open_store
from tests.harness.conftest import settings_from
from tests.harness.fake_anthropic import (
    ApiError,
    FakeAnthropic,
    Script,
    Turn,
    text,
    tool,
)
from tests.harness.test_crash import assert_valid_history, read_log

pytestmark = pytest.mark.anyio


def results(env: dict[str, str], sid: str) -> list[dict]:
    """Tool results in the order of their tool_use (parallel ones are logged as they finish)."""
    log = read_log(env, sid)
    by_id = {x.data["tool_use_id"]: x.data for x in log if x.type == "agent.tool_result"}
    return [by_id[x.data["id"]] for x in log if x.type == "agent.tool_use"]


async def test_dead_server_is_a_tool_error_and_is_reconnected(env: dict[str, str], toolbox_dir: Path) -> None:
    script = Script(
        {
            "DEAD-TASK": [
                Turn([tool("toolbox__put", {"key": "a", "value": "1"})]),
                Turn([tool("toolbox__crash", {})]),
                Turn([tool("toolbox__put", {"key": "b", "value": "2"})]),
                Turn([text("recovered")]),
            ]
        }
    )
    with FakeAnthropic(script) as fake:
        e = {**env, **fake.env()}
        out = await run_session(settings_from(e), task="DEAD-TASK", session_id=None, view=NullView(), env=e)
    assert out.text == "recovered"
    put_a, crash, put_b = results(env, out.session_id)
    assert (
        crash["is_error"]
        and crash["content"][0]["text"].startswith("unavailable:")
        and "went away" in crash["content"][0]["text"]
    )
    assert not put_b["is_error"] and (toolbox_dir / "kv" / "b").read_text() == "2"
    pids = [line.split("pid=")[1] for line in (toolbox_dir / "calls.txt").read_text().splitlines()]
    assert pids[0] == pids[1] != pids[2]  # a new server process answered after the crash
    # the model was told: the request after the crash carries the error
    sent = fake.requests[2].body["messages"][-1]["content"][0]
    assert sent["is_error"] and "went away" in sent["content"][0]["text"]


async def test_timeout_and_unknown_tool_are_tool_errors(env: dict[str, str]) -> None:
    script = Script(
        {
            "SLOW-TASK": [
                Turn([tool("toolbox__slow", {"seconds": 20})]),
                Turn([tool("nowhere__nothing", {})]),
                Turn([text("coped")]),
            ]
        }
    )
    with FakeAnthropic(script) as fake:
        e = {**env, **fake.env()}
        out = await run_session(
            settings_from(e, tool_timeout_s=1.0), task="SLOW-TASK", session_id=None, view=NullView(), env=e
        )
    assert out.text == "coped"
    slow, unknown = results(env, out.session_id)
    assert slow["is_error"] and slow["content"][0]["text"].startswith("timeout:") and slow["duration_ms"] < 10_000
    assert unknown["is_error"] and unknown["content"][0]["text"].startswith("not_found:")


async def test_subagents_run_in_parallel_in_linked_sessions_and_a_failing_one_is_a_tool_error(
    env: dict[str, str],
) -> None:
    script = Script(
        {
            "PARENT-TASK": [
                Turn(
                    [
                        tool("spawn_subagent", {"task": "SUB-A count"}),
                        tool("spawn_subagent", {"task": "SUB-B count"}),
                        tool("spawn_subagent", {"task": "SUB-FAIL break"}),
                    ]
                ),
                Turn([text("parent done")]),
            ],
            "SUB-A": [Turn([tool("toolbox__count_lines", {})], delay_s=1.5), Turn([text("A found 0 lines")])],
            "SUB-B": [Turn([tool("toolbox__count_lines", {})], delay_s=1.5), Turn([text("B found 0 lines")])],
            "SUB-FAIL": [ApiError(400, message="fake: this child's request is refused")],
        }
    )
    with FakeAnthropic(script) as fake:
        e = {**env, **fake.env()}
        out = await run_session(settings_from(e), task="PARENT-TASK", session_id=None, view=NullView(), env=e)
    assert out.text == "parent done"
    a, b, fail = results(env, out.session_id)
    assert a["content"][0]["text"] == "A found 0 lines" and b["content"][0]["text"] == "B found 0 lines"
    assert fail["is_error"] and "failed" in fail["content"][0]["text"] and "refused" in fail["content"][0]["text"]
    starts = {r.key[0]: r.received for r in fake.requests if r.key[1] == 0}
    assert abs(starts["SUB-A"] - starts["SUB-B"]) < 1.0  # the siblings ran at the same time
    store = open_store(str(Path(env["CORRAL_HOME"]) / "sessions.db"))
    try:
        kids = [x.data["session_id"] for x in read_log(env, out.session_id) if x.type == "agent.subagent"]
        assert len(kids) == 3 and all(store.get(k).parent == out.session_id for k in kids)
        for k in kids:
            assert_valid_history(store.select(k))
        assert store.get(kids[2]).status == "failed"
    finally:
        store.close()
