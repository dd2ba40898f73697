"""Waking from the log alone: re-run what is safe, mark the rest interrupted, never re-ask a
recorded response, send the first request before the MCP servers are up, and one writer."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.errors import Unavailable
from corral.harness.events import ev
from corral.harness.run import run_session
from corral.harness.view import NullView
from corral.servers.session import NewEvent, open_store
from tests.harness.conftest import ROOT, settings_from
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

TOOLS = [
    {
        "name": "toolbox__append_line",
        "description": "append",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
        "annotations": {"read_only": False, "idempotent": False, "destructive": False},
    },
    {
        "name": "toolbox__count_lines",
        "description": "count",
        "input_schema": {"type": "object", "properties": {}},
        "annotations": {"read_only": True, "idempotent": True, "destructive": False},
    },
]


def crashed_session(env: dict[str, str], events: list[NewEvent]) -> str:
    """A session as a harness killed mid-task leaves it."""
    store = open_store(str(Path(env["CORRAL_HOME"]) / "sessions.db"))
    try:
        sid = store.create({"task": "test"}).session_id
        store.append(
            sid,
            [
                ev("session.status", status="running", writer="hrn_dead"),
                ev("user.message", text="WAKE-TASK go"),
                ev("session.tools", tools=TOOLS, system="You are a test agent."),
                *events,
            ],
        )
        return sid
    finally:
        store.close()


async def wake(env: dict[str, str], fake: FakeAnthropic, sid: str, **over: object) -> str:
    e = {**env, **fake.env()}
    return (await run_session(settings_from(e, **over), task=None, session_id=sid, view=NullView(), env=e)).text


async def test_wake_reruns_read_only_and_marks_non_idempotent_interrupted(
    env: dict[str, str], toolbox_dir: Path
) -> None:
    sid = crashed_session(
        env,
        [
            ev("agent.tool_use", message_id="msg_0", id="toolu_a", name="toolbox__append_line", input={"text": "x"}),
            ev("agent.tool_use", message_id="msg_0", id="toolu_c", name="toolbox__count_lines", input={}),
            ev("span.model_request", message_id="msg_0", purpose="turn", usage={}),
        ],
    )
    with FakeAnthropic(Script({"WAKE-TASK": [Turn([text("never asked")]), Turn([text("checked, fine")])]})) as fake:
        assert await wake(env, fake, sid) == "checked, fine"
    assert ("WAKE-TASK", 0) not in fake.counts  # the recorded response is not requested again
    assert not (toolbox_dir / "lines.txt").exists()  # the non-idempotent call was not re-run
    log = read_log(env, sid)
    assert_valid_history(log)
    results = {e.data["tool_use_id"]: e.data for e in log if e.type == "agent.tool_result"}
    assert results["toolu_a"]["interrupted"] and results["toolu_a"]["is_error"]
    assert "outcome is unknown" in results["toolu_a"]["content"][0]["text"]
    assert results["toolu_c"]["content"][0]["text"] == "0" and not results["toolu_c"].get("interrupted")
    # the model saw both results, in tool_use order
    sent = fake.requests[0].body["messages"][-1]["content"]
    assert [b["tool_use_id"] for b in sent if b["type"] == "tool_result"] == ["toolu_a", "toolu_c"]


async def test_first_request_goes_out_while_servers_are_still_connecting(
    env: dict[str, str], toolbox_dir: Path
) -> None:
    sid = crashed_session(
        env,
        [
            ev("agent.tool_use", message_id="msg_0", id="toolu_c", name="toolbox__count_lines", input={}),
            ev(
                "agent.tool_result",
                tool_use_id="toolu_c",
                name="toolbox__count_lines",
                content=[{"type": "text", "text": "0"}],
                is_error=False,
            ),
        ],
    )
    with FakeAnthropic(
        Script({"WAKE-TASK": [Turn([]), Turn([tool("toolbox__count_lines", {})]), Turn([text("done")])]})
    ) as fake:
        e = {**env, **fake.env(), "TOOLBOX_START_DELAY": "3"}
        started = time.time()
        out = await run_session(settings_from(e), task=None, session_id=sid, view=NullView(), env=e)
    assert out.text == "done"
    server_up = float((toolbox_dir / "started.txt").read_text())
    first = fake.requests[0].received
    assert first < server_up, "the first request waited for the MCP server"
    assert first - started < 2.0
    assert_valid_history(read_log(env, sid))


async def test_api_errors_are_retried_with_backoff_and_recorded(env: dict[str, str]) -> None:
    script = Script(
        {"RETRY-TASK": [[ApiError(429), ApiError(500), ApiError(529, retry_after=0.1), Turn([text("finally")])]]}
    )
    with FakeAnthropic(script) as fake:
        e = {**env, **fake.env()}
        out = await run_session(settings_from(e), task="RETRY-TASK", session_id=None, view=NullView(), env=e)
    assert out.text == "finally"
    log = read_log(env, out.session_id)
    errors = [x.data for x in log if x.type == "session.error"]
    assert [(x["status"], x["attempt"], x["fatal"]) for x in errors] == [
        (429, 1, False),
        (500, 2, False),
        (529, 3, False),
    ]
    assert errors[1]["retry_in_s"] == pytest.approx(0.1) and errors[2]["retry_in_s"] == pytest.approx(
        0.1
    )  # 0.05 doubled; retry-after wins
    assert "overloaded" in errors[2]["message"]
    span = next(x.data for x in log if x.type == "span.model_request")
    assert span["attempts"] == 4


async def test_api_down_fails_recorded_and_a_later_wake_finishes(env: dict[str, str]) -> None:
    with FakeAnthropic(Script({"DOWN-TASK": [ApiError(529)]})) as fake:
        e = {**env, **fake.env()}
        sids: list[str] = []
        with pytest.raises(Unavailable, match="529"):
            await run_session(
                settings_from(e, model_retries=1),
                task="DOWN-TASK",
                session_id=None,
                view=NullView(),
                env=e,
                on_session=sids.append,
            )
    log = read_log(env, sids[0])
    assert log[-1].type == "session.status" and log[-1].data["status"] == "failed"
    assert [x.data["fatal"] for x in log if x.type == "session.error"] == [False, True]
    with FakeAnthropic(Script({"DOWN-TASK": [Turn([text("back")])]})) as fake:
        assert await wake(env, fake, sids[0]) == "back"


def test_two_harnesses_waking_one_session_one_loses_clearly(env: dict[str, str]) -> None:
    sid = crashed_session(env, [])
    with FakeAnthropic(Script({"WAKE-TASK": [Turn([text("only one of us")])]}), delay_s=2.0) as fake:
        e = {**env, **fake.env()}
        cmd = [sys.executable, "-m", "corral.cli", "wake", sid]
        procs = [
            subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    loser = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 1)
    assert "conflict:" in loser and "another harness" in loser and "Traceback" not in loser
    log = read_log(env, sid)
    assert_valid_history(log)
    assert [x.data["text"] for x in log if x.type == "agent.message"] == ["only one of us"]


async def test_a_new_session_asks_the_model_before_the_servers_are_up_once_their_tools_are_known(
    env: dict[str, str], toolbox_dir: Path
) -> None:
    script = Script(
        {"FIRST": [Turn([text("one")])], "SECOND": [Turn([tool("toolbox__count_lines", {})]), Turn([text("two")])]}
    )
    with FakeAnthropic(script) as fake:
        e = {**env, **fake.env()}
        await run_session(
            settings_from(e), task="FIRST", session_id=None, view=NullView(), env=e
        )  # lists, and saves the listing
        (toolbox_dir / "started.txt").unlink()
        e["TOOLBOX_START_DELAY"] = "3"
        out = await run_session(settings_from(e), task="SECOND", session_id=None, view=NullView(), env=e)
    assert out.text == "two"
    second = next(r for r in fake.requests if r.key == ("SECOND", 0))
    assert second.received < float((toolbox_dir / "started.txt").read_text())  # the server was still starting
    assert {t["name"] for t in second.body["tools"]} >= {
        "toolbox__count_lines",
        "toolbox__append_line",
        "todo",
        "spawn_subagent",
    }
    assert_valid_history(read_log(env, out.session_id))
    count = next(x.data for x in read_log(env, out.session_id) if x.type == "agent.tool_result")
    assert not count["is_error"] and count["content"][0]["text"] == "0"


async def test_wake_after_compaction_starts_from_the_summary(env: dict[str, str]) -> None:
    sid = crashed_session(
        env,
        [
            ev("agent.message", message_id="msg_0", text="OLD-DETAIL only in the compacted part"),
            ev("agent.tool_use", message_id="msg_0", id="toolu_0", name="toolbox__count_lines", input={}),
            ev(
                "agent.tool_result",
                tool_use_id="toolu_0",
                name="toolbox__count_lines",
                content=[{"type": "text", "text": "0"}],
                is_error=False,
            ),
            ev("agent.tool_use", message_id="msg_1", id="toolu_1", name="toolbox__count_lines", input={}),
            ev(
                "agent.tool_result",
                tool_use_id="toolu_1",
                name="toolbox__count_lines",
                content=[{"type": "text", "text": "0"}],
                is_error=False,
                todo=[{"text": "finish", "status": "pending"}],
            ),
        ],
    )
    store = open_store(str(Path(env["CORRAL_HOME"]) / "sessions.db"))
    try:
        cut = store.select(sid, types=["agent.tool_use"])[-1].position
        store.append(
            sid, [ev("context.compacted", start=0, end=cut, summary="WAKE-TASK SUMMARY [fake-turns:1]", todo=None)]
        )
    finally:
        store.close()
    with FakeAnthropic(
        Script({"WAKE-TASK": [Turn([text("x")]), Turn([text("x")]), Turn([text("resumed from the summary")])]})
    ) as fake:
        assert await wake(env, fake, sid) == "resumed from the summary"
    messages = fake.requests[0].body["messages"]
    assert "WAKE-TASK SUMMARY" in messages[0]["content"][0]["text"] and "OLD-DETAIL" not in str(messages)
    assert [b["type"] for b in messages[1]["content"]] == ["tool_use"] and messages[1]["content"][0]["id"] == "toolu_1"
    assert (
        messages[2]["content"][-1]["text"].startswith("Your plan")
        and "[ ] finish" in messages[2]["content"][-1]["text"]
    )
