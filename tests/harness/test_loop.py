"""The loop against the fake API and a real MCP server over stdio, in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.harness.run import run_session
from corral.harness.view import NullView
from corral.servers.session import open_store
from tests.harness.conftest import settings_from
from tests.harness.fake_anthropic import FakeAnthropic, Script, Turn, text, tool

pytestmark = pytest.mark.anyio


def events(env: dict[str, str], sid: str) -> list:
    store = open_store(str(Path(env["CORRAL_HOME"]) / "sessions.db"))
    try:
        return store.select(sid)
    finally:
        store.close()


async def test_write_ahead_run_records_response_before_tool_results(env: dict[str, str], toolbox_dir: Path) -> None:
    script = Script(
        {
            "TASK-A": [
                Turn([text("I will add a line."), tool("toolbox__append_line", {"text": "hello"})]),
                Turn([tool("toolbox__count_lines", {})]),
                Turn([text("Done: one line.")]),
            ]
        }
    )
    with FakeAnthropic(script) as fake:
        s = settings_from({**env, **fake.env()})
        out = await run_session(s, task="TASK-A please", session_id=None, view=NullView(), env={**env, **fake.env()})
    assert out.text == "Done: one line."
    assert (toolbox_dir / "lines.txt").read_text() == "hello\n"
    log = events(env, out.session_id)
    types = [e.type for e in log]
    assert types[:3] == ["session.status", "user.message", "session.tools"]
    use = next(e for e in log if e.type == "agent.tool_use")
    result = next(e for e in log if e.type == "agent.tool_result")
    span = next(e for e in log if e.type == "span.model_request")
    assert use.position < result.position and span.position < result.position
    assert result.data["tool_use_id"] == use.data["id"] and not result.data["is_error"]
    assert set(span.data["usage"]) == {
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    }
    assert log[-1].data["status"] == "idle"
    assert dict(fake.counts) == {("TASK-A", 0): 1, ("TASK-A", 1): 1, ("TASK-A", 2): 1}


async def test_an_empty_answer_ends_the_turn(env: dict[str, str]) -> None:
    with FakeAnthropic(Script({"EMPTY-TASK": [Turn([]), Turn([text("asked twice")])]})) as fake:
        s = settings_from({**env, **fake.env()})
        out = await run_session(s, task="EMPTY-TASK", session_id=None, view=NullView(), env={**env, **fake.env()})
    assert out.text == "" and sum(fake.counts.values()) == 1
    assert events(env, out.session_id)[-1].data["status"] == "idle"
