"""The context: cache-stable requests, the plan re-shown, compaction that keeps the originals reachable."""

from __future__ import annotations

import re
from typing import Any

import pytest

from corral.harness.run import run_session
from corral.harness.view import NullView
from tests.harness.conftest import settings_from
from tests.harness.fake_anthropic import FakeAnthropic, Script, Turn, text, tool
from tests.harness.scripts import PLAN
from tests.harness.test_crash import assert_valid_history, read_log

pytestmark = pytest.mark.anyio


def strip(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**m, "content": [{k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]]} for m in messages
    ]


async def test_requests_are_append_only_cache_stable_and_show_the_plan(env: dict[str, str]) -> None:
    turns = (
        [Turn([text("Plan first."), tool("todo", PLAN)])]
        + [Turn([tool("toolbox__count_lines", {})]) for _ in range(5)]
        + [Turn([text("done")])]
    )
    with FakeAnthropic(Script({"CACHE-TASK": turns})) as fake:
        e = {**env, **fake.env()}
        out = await run_session(settings_from(e), task="CACHE-TASK", session_id=None, view=NullView(), env=e)
    bodies = [r.body for r in fake.requests]
    for before, after in zip(bodies, bodies[1:], strict=False):
        assert strip(after["messages"])[: len(before["messages"])] == strip(before["messages"])  # only appends
        assert after["tools"] == before["tools"] and after["system"] == before["system"]
    marks = [sum("cache_control" in b for m in body["messages"] for b in m["content"]) for body in bodies]
    assert marks[0] == 1 and all(n == 2 for n in marks[1:])
    spans = [x.data for x in read_log(env, out.session_id) if x.type == "span.model_request"]
    assert spans[0]["cache_hit_rate"] == 0
    assert all(s["cache_hit_rate"] >= 0.8 for s in spans[2:]), [s["cache_hit_rate"] for s in spans]
    # the plan is shown after every tool result from the todo call on
    for body in bodies[1:]:
        last = body["messages"][-1]["content"]
        assert (
            last[-1]["type"] == "text"
            and last[-1]["text"].startswith("Your plan")
            and "[~] append a line" in last[-1]["text"]
        )


def sid_from(body: dict[str, Any]) -> str:
    return re.search(r"ses_[0-9a-f]+", body["system"][0]["text"]).group(0)


async def test_compaction_summarises_and_the_originals_stay_readable(env: dict[str, str]) -> None:
    filler = "lorem ipsum " * 250  # ~3000 characters per response
    turns: list[Any] = [Turn([text(f"FILLER-{i} {filler}"), tool("toolbox__count_lines", {})]) for i in range(6)]
    turns.append(lambda body: Turn([tool("session__slice", {"session_id": sid_from(body), "start": 0, "end": 3})]))
    turns.append(Turn([text("reread the originals; done")]))
    e = {**env, "CORRAL_SERVERS": "toolbox,session"}
    with FakeAnthropic(Script({"COMPACT-TASK": turns})) as fake:
        e.update(fake.env())
        out = await run_session(
            settings_from(e, context_budget_tokens=4000),
            task="COMPACT-TASK: the original request",
            session_id=None,
            view=NullView(),
            env=e,
        )
    assert out.text == "reread the originals; done"
    log = read_log(env, out.session_id)
    assert_valid_history(log)
    compactions = [x for x in log if x.type == "context.compacted"]
    assert compactions and all(c.data["start"] == 0 and "SUMMARY" in c.data["summary"] for c in compactions)
    assert any(x.type == "span.model_request" and x.data["purpose"] == "compaction" for x in log)
    last = fake.requests[-1].body
    first_text = last["messages"][0]["content"][0]["text"]
    assert "compacted" in first_text and "SUMMARY" in first_text
    assert "FILLER-0" not in str(last["messages"])  # the early turns left the context...
    names = {t["name"] for t in last["tools"]}
    assert {"session__get_events", "session__slice", "session__rewind"} <= names and "session__emit_event" not in names
    slice_result = next(x for x in log if x.type == "agent.tool_result" and x.data["name"] == "session__slice")
    assert (
        not slice_result.data["is_error"]
        and "COMPACT-TASK: the original request" in slice_result.data["content"][0]["text"]
    )  # ...but stay readable
    assert len(str(last)) < len(str(fake.requests[-3].body)) + 8000
