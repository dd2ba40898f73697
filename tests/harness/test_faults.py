"""Issue 17: the brain never acts on a broken model response.

Each fault of a streamed response is driven through the loopback fake on the multi-step task
(a plan, a non-idempotent write, an idempotent write and a read, a subagent with its own write):
every scripted response first arrives broken, then whole. For each fault: the task completes,
each step's command runs exactly once, no tool runs with partial input, the provider never
sees an invalid history, and the log records every failed attempt (fault, what arrived,
attempt number) as a non-fatal `session.error`, never as a response.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from corral.errors import InvalidArgument, PolicyDenied
from corral.harness.run import run_session
from corral.harness.view import NullView
from corral.servers.session import Event
from tests.harness.conftest import settings_from
from tests.harness.fake_anthropic import FakeAnthropic, Fault, Script, Turn, text, tool
from tests.harness.scripts import multi_tool_task
from tests.harness.test_crash import assert_valid_history, children, read_log

pytestmark = pytest.mark.anyio

# fault -> what the harness records it as (`session.error` data.fault)
FAULTS = {
    "drop": (Fault("drop"), "dropped"),
    "error_event": (Fault("error_event", error_type="overloaded_error"), "stream_error"),
    "api_error_event": (Fault("error_event", error_type="api_error", message="Internal server error"), "stream_error"),
    "rate_limit_event": (Fault("error_event", error_type="rate_limit_error", message="Rate limited"), "stream_error"),
    "stall": (Fault("stall", stall_s=20.0), "stalled"),
    "bad_json": (Fault("bad_json"), "invalid_tool_input"),
    "no_message_stop": (Fault("no_message_stop"), "no_message_stop"),
}


def broken_first(script: Script, fault: Fault | None = None, **turn: Any) -> Script:
    """Every scripted turn answers its first request broken (by `fault`, or as `turn` says), then whole."""
    convs = {
        name: [[replace(t, fault=fault, **turn), t] for t in turns] for name, turns in script.conversations.items()
    }
    return Script(convs, script.summary)  # type: ignore[arg-type]


async def run(
    env: dict[str, str], fake: FakeAnthropic, task: str, session_id: str | None = None, **over: Any
) -> tuple[str, str]:
    e = {**env, **fake.env()}
    out = await run_session(settings_from(e, **over), task=task, session_id=session_id, view=NullView(), env=e)
    return out.session_id, out.text


def failed_attempts(log: list[Event]) -> list[dict[str, Any]]:
    return [e.data for e in log if e.type == "session.error" and not e.data["fatal"]]


def assert_each_step_once(env: dict[str, str], sid: str, toolbox_dir: Path, fake: FakeAnthropic) -> list[Event]:
    """The task completed; every side effect happened once; nothing ran on partial input."""
    log = read_log(env, sid)
    assert_valid_history(log)
    every = log + [e for child in children(env, sid) for e in read_log(env, child)]
    assert sorted((toolbox_dir / "lines.txt").read_text().split()) == ["child-1", "main-1"]
    calls = (toolbox_dir / "calls.txt").read_text().splitlines()
    assert [c.split(" pid=")[0] for c in calls] == ["append_line main-1", "put k", "append_line child-1"]
    results = [e.data for e in every if e.type == "agent.tool_result"]
    assert results and not [r for r in results if r["is_error"]], results  # no call ever got partial input
    assert [e.data["text"] for e in log if e.type == "agent.message"] == [
        "Planning.",
        "All done.",
    ]  # nothing from a broken attempt
    assert fake.invalid == []  # the provider never saw an invalid history
    whole = [r.key for r in fake.requests if r.whole]
    assert len(whole) == len(set(whole)), "a whole response was asked for twice"
    return every


@pytest.mark.parametrize("name", list(FAULTS))
async def test_every_broken_response_is_retried_never_acted_on(
    name: str, env: dict[str, str], toolbox_dir: Path
) -> None:
    fault, recorded = FAULTS[name]
    with FakeAnthropic(broken_first(multi_tool_task(), fault)) as fake:
        started = time.monotonic()
        sid, answer = await run(env, fake, "CRASH-TASK go", model_idle_timeout_s=1.0)
        took = time.monotonic() - started
    assert answer == "All done."
    every = assert_each_step_once(env, sid, toolbox_dir, fake)
    failed = failed_attempts(every)
    broken = [r for r in fake.requests if not r.whole]
    assert len(failed) == len(broken) >= 5  # every failed attempt is in the log (parent and child)
    assert {f["fault"] for f in failed} == {recorded} and {f["attempt"] for f in failed} == {1}
    assert all(f["kind"] == "unavailable" and "arrived" in f for f in failed)
    if name == "stall":
        assert took < 20, "a stalled stream must be abandoned after the idle timeout, not waited out"
        assert all(f["arrived"]["events"] == 1 for f in failed)  # message_start only
    if name == "bad_json":
        assert all(f["arrived"]["tool_uses"] for f in failed)


async def test_a_dropped_stream_shows_what_arrived_before_the_break(env: dict[str, str], toolbox_dir: Path) -> None:
    long = "word " * 200
    script = Script({"DROP-TASK": [[Turn([text(long)], fault=Fault("drop")), Turn([text("short answer")])]]})
    with FakeAnthropic(script) as fake:
        sid, answer = await run(env, fake, "DROP-TASK")
    assert answer == "short answer"
    [failed] = failed_attempts(read_log(env, sid))
    assert failed["fault"] == "dropped" and 0 < failed["arrived"]["text_chars"] < len(long)
    assert not failed["arrived"]["message_stop"]


async def test_a_tool_call_cut_by_max_tokens_is_retried_with_more_room(env: dict[str, str], toolbox_dir: Path) -> None:
    with FakeAnthropic(broken_first(multi_tool_task(), needs_tokens=10_000)) as fake:
        sid, answer = await run(env, fake, "CRASH-TASK go", max_tokens=8192)
    assert answer == "All done."
    every = assert_each_step_once(env, sid, toolbox_dir, fake)
    failed = failed_attempts(every)
    assert {f["fault"] for f in failed} == {"max_tokens_in_tool_use"} and all(f["retry_in_s"] == 0 for f in failed)
    tool_turns = [r for r in fake.requests if r.key == ("CRASH-TASK", 1)]
    assert [r.body["max_tokens"] for r in tool_turns] == [8192, 16384]  # doubled, within the model's limit
    assert len(failed) == len([r for r in fake.requests if not r.whole])


async def test_a_tool_call_that_never_fits_is_fatal_and_never_run(env: dict[str, str], toolbox_dir: Path) -> None:
    script = Script({"HUGE-TASK": [Turn([tool("toolbox__append_line", {"text": "huge"})], needs_tokens=10**9)]})
    with FakeAnthropic(script) as fake:
        with pytest.raises(InvalidArgument, match="output limit of 64000"):
            await run(env, fake, "HUGE-TASK", max_tokens=8192, model_retries=10)
    assert [r.body["max_tokens"] for r in fake.requests] == [8192, 16384, 32768, 64000]
    assert not (toolbox_dir / "lines.txt").exists()


async def test_an_input_the_tool_schema_refuses_is_a_failed_attempt(env: dict[str, str], toolbox_dir: Path) -> None:
    script = Script(
        {
            "SCHEMA-TASK": [
                [
                    Turn([tool("toolbox__append_line", {"txt": "wrong key"})]),
                    Turn([tool("toolbox__append_line", {"text": "right"})]),
                ],
                Turn([text("ok")]),
            ]
        }
    )
    with FakeAnthropic(script) as fake:
        sid, _ = await run(env, fake, "SCHEMA-TASK")
    [failed] = failed_attempts(read_log(env, sid))
    assert failed["fault"] == "invalid_tool_input" and "'text' is a required property" in failed["message"]
    assert (toolbox_dir / "lines.txt").read_text() == "right\n"


@pytest.mark.parametrize(
    ("error_type", "raised", "says"),
    [
        ("invalid_request_error", InvalidArgument, "the session log shows what was sent"),
        ("authentication_error", PolicyDenied, "check ANTHROPIC_API_KEY"),
        ("permission_error", PolicyDenied, "may not use this model"),
    ],
)
async def test_a_fatal_error_event_mid_stream_stops_with_the_api_message(
    error_type: str, raised: type, says: str, env: dict[str, str]
) -> None:
    script = Script(
        {
            "FATAL-TASK": [
                Turn(
                    [text("partial text " * 20)],
                    fault=Fault("error_event", error_type=error_type, message="API SAYS WHY"),
                )
            ]
        }
    )
    with FakeAnthropic(script) as fake:
        with pytest.raises(raised) as caught:
            await run(env, fake, "FATAL-TASK")
    assert "API SAYS WHY" in str(caught.value) and says in str(caught.value) and error_type in str(caught.value)
    assert sum(fake.counts.values()) == 1  # not retried
    log = read_log(env, next(iter({e.session_id for e in read_log_all(env)})))
    assert [e.type for e in log if e.type.startswith("agent.")] == []  # the partial text was never recorded
    assert log[-1].data["status"] == "failed" and log[-2].data["fatal"]


def read_log_all(env: dict[str, str]) -> list[Event]:
    from corral.servers.session import open_store

    store = open_store(str(Path(env["CORRAL_HOME"]) / "sessions.db"))
    try:
        return [e for s in store.sessions() for e in store.select(s.session_id)]
    finally:
        store.close()


async def test_retries_exhausted_then_wake_retries_the_failed_attempt(env: dict[str, str], toolbox_dir: Path) -> None:
    """A session whose last write was a failed attempt resumes, on wake, by retrying it."""
    script = Script(
        {
            "WAKE-FAULT": [
                [Turn([tool("toolbox__append_line", {"text": "once"})], fault=Fault("drop"))] * 2
                + [Turn([tool("toolbox__append_line", {"text": "once"})])],
                Turn([text("finished")]),
            ]
        }
    )
    with FakeAnthropic(script) as fake:
        with pytest.raises(Exception, match="incomplete response"):
            await run(env, fake, "WAKE-FAULT", model_retries=1)
        [sid] = {e.session_id for e in read_log_all(env)}
        log = read_log(env, sid)
        assert [e.data["fatal"] for e in log if e.type == "session.error"] == [False, True]
        assert log[-1].data["status"] == "failed" and log[-2].data["fault"] == "dropped"
        _, answer = await run(env, fake, None, session_id=sid)  # type: ignore[arg-type]
    assert answer == "finished"
    assert (toolbox_dir / "lines.txt").read_text() == "once\n"
    assert_valid_history(read_log(env, sid))
    assert fake.invalid == []


def test_the_terminal_shows_a_failed_attempt_as_failed(env: dict[str, str]) -> None:
    from tests.harness.conftest import corral

    script = Script(
        {"VIEW-TASK": [[Turn([text("PARTIAL " * 300)], fault=Fault("drop")), Turn([text("THE REAL ANSWER")])]]}
    )
    with FakeAnthropic(script) as fake:
        p = corral(["run", "VIEW-TASK"], {**env, **fake.env()})
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "PARTIAL" in out  # it streamed...
    failed = out.index("✗ attempt 1 failed")
    assert (
        out.index("PARTIAL") < failed < out.index("THE REAL ANSWER")
    )  # ...and is then marked failed, before the answer
    assert "✗ attempt 1 failed, the text above is discarded; retrying in" in out


def test_both_viewers_show_a_failed_attempt_as_failed(env: dict[str, str]) -> None:
    """The timeline (`corral sessions show`) and the web viewer's events (a real loopback server)."""
    import threading

    import httpx
    import uvicorn
    from starlette.applications import Starlette

    from corral.servers.session import open_store
    from corral.viewer.web import viewer_routes
    from tests.conftest import free_port
    from tests.harness.conftest import corral
    from tests.harness.test_cli import session_id

    script = Script(
        {"SEEN-TASK": [[Turn([text("HALF AN ANSWER " * 100)], fault=Fault("drop")), Turn([text("whole answer")])]]}
    )
    with FakeAnthropic(script) as fake:
        p = corral(["run", "SEEN-TASK"], {**env, **fake.env()})
    assert p.returncode == 0, p.stderr
    sid = session_id(p.stdout)
    shown = corral(["sessions", "show", sid], {**env, "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    flat = " ".join(shown.stdout.split())
    assert re.search(
        r"✗ session\.error dropped: incomplete response.* — discarded, not the answer: \d+ chars of text — retry in",
        flat,
    ), flat

    store = open_store(str(Path(env["CORRAL_HOME"]) / "sessions.db"))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(Starlette(routes=viewer_routes(store)), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        events = httpx.get(f"http://127.0.0.1:{port}/sessions/{sid}/events.json", timeout=10).json()["events"]
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()
    [failed] = [e for e in events if e["type"] == "session.error"]
    assert failed["kind"] == "error" and failed["title"] == "attempt 1 failed"  # the page's red "error" row
    assert "discarded, not the answer" in failed["text"]
    assert [e["text"] for e in events if e["kind"] == "model"] == ["whole answer"]
