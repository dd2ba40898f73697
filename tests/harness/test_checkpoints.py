"""The harness checkpoints the sandbox after each call that may change it (issue 11): the
`sandbox.checkpoint` event is in the same append as the tool result, read-only calls take
none, every call carries the log's latest default-sandbox checkpoint as `_meta`
`corral/checkpoint`, and CORRAL_CHECKPOINTS=off does none of it. Against `tests/harness/cpbox.py`
(a real MCP server over stdio that records what it was sent) and the fake Anthropic API."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from corral.harness.run import run_session
from corral.harness.view import NullView
from corral.servers.session import EventStore, NewEvent, open_store
from tests.harness.conftest import settings_from
from tests.harness.cpbox import calls
from tests.harness.fake_anthropic import FakeAnthropic, Script, Turn, text, tool
from tests.harness.test_crash import assert_valid_history, faults_in_turn, killed_at_every_append, read_log

pytestmark = pytest.mark.anyio


class Recording:
    """The store, remembering the event types of each append (to see what was written together)."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self.appends: list[list[str]] = []

    def append(self, session_id: str, events: Sequence[NewEvent], expected_position: int | None = None) -> list[int]:
        self.appends.append([e.type for e in events])
        return self._store.append(session_id, events, expected_position)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def open_db(env: dict[str, str]) -> EventStore:
    return open_store(str(Path(env["CORRAL_HOME"]) / "sessions.db"))


async def run(
    env: dict[str, str], script: Script, task: str | None, session_id: str | None = None, fake: list[Any] | None = None
) -> tuple[str, Recording]:
    """One run in-process; `fake` (a list) receives the fake API, to read its requests after."""
    store = Recording(open_db(env))
    try:
        with FakeAnthropic(script) as api:
            if fake is not None:
                fake.append(api)
            e = {**env, **api.env()}
            out = await run_session(
                settings_from(e),
                task=task,
                session_id=session_id,
                view=NullView(),
                env=e,
                store=store,
            )
        return out.session_id, store
    finally:
        store.close()


def checkpoint_events(env: dict[str, str], sid: str) -> list[Any]:
    store = open_db(env)
    try:
        return store.select(sid, types=["sandbox.checkpoint"])
    finally:
        store.close()


def write(path: str, **extra: str) -> dict[str, Any]:
    return tool("cpbox__write", {"path": path, "content": path.upper(), **extra})


STEPS = Script(
    {
        "CP-TASK": [
            Turn([write("a.txt")]),
            Turn([tool("cpbox__read", {"path": "a.txt"})]),
            Turn([write("b.txt", sandbox_id="sbx_other")]),
            Turn([write("c.txt")]),
            Turn([text("done")]),
            Turn([write("d.txt")]),  # a second run of the session ("more")
            Turn([text("more done")]),
        ],
    }
)


async def test_a_changing_call_is_checkpointed_in_the_same_append_as_its_result(cp_env: dict[str, str]) -> None:
    sid, store = await run(cp_env, STEPS, "CP-TASK go")
    asked = [(c["tool"], c["args"].get("sandbox_id"), c["checkpoint"]) for c in calls(Path(cp_env["CPBOX_DIR"]))]
    cps = checkpoint_events(cp_env, sid)
    first, other, third = (e.data for e in cps)
    assert asked == [
        ("write", None, None),  # nothing checkpointed yet: no corral/checkpoint
        ("checkpoint", "sbx_default", None),
        ("read", None, first["checkpoint_id"]),  # read-only: no checkpoint after it
        ("write", "sbx_other", first["checkpoint_id"]),
        ("checkpoint", "sbx_other", first["checkpoint_id"]),
        ("write", None, first["checkpoint_id"]),  # another sandbox's checkpoint is not the default's
        ("checkpoint", "sbx_default", first["checkpoint_id"]),
    ]
    assert [(d["sandbox_id"], d["default"]) for d in (first, other, third)] == [
        ("sbx_default", True),
        ("sbx_other", False),
        ("sbx_default", True),
    ]
    assert all(d["at"] and d["tool_use_id"].startswith("toolu_") for d in (first, other, third))
    # each checkpoint went to the log in the very append that wrote its tool result
    results = [a for a in store.appends if "agent.tool_result" in a]
    assert results == [
        ["agent.tool_result", "sandbox.checkpoint"],
        ["agent.tool_result"],
        ["agent.tool_result", "sandbox.checkpoint"],
        ["agent.tool_result", "sandbox.checkpoint"],
    ]

    # a later run of the same session starts from the log: its first call names the latest default checkpoint
    await run(cp_env, STEPS, "more", session_id=sid)
    later = calls(Path(cp_env["CPBOX_DIR"]))[7]
    assert (later["tool"], later["checkpoint"]) == ("write", third["checkpoint_id"])


async def test_a_fork_child_sends_the_checkpoint_it_inherits(cp_env: dict[str, str]) -> None:
    sid, _ = await run(cp_env, STEPS, "CP-TASK go")
    first = checkpoint_events(cp_env, sid)[0]
    store = open_db(cp_env)
    try:  # fork after the first checkpoint, before the second write: the child owns none of its own
        child = store.fork(sid, first.position + 1).session_id
    finally:
        store.close()
    (Path(cp_env["CPBOX_DIR"]) / "calls.jsonl").unlink()
    await run(cp_env, STEPS, None, session_id=child)
    asked = calls(Path(cp_env["CPBOX_DIR"]))
    assert (asked[0]["tool"], asked[0]["client"], asked[0]["checkpoint"]) == (
        "read",
        child,
        first.data["checkpoint_id"],
    )


async def test_off_takes_no_checkpoint_and_sends_no_checkpoint_meta(cp_env: dict[str, str]) -> None:
    sid, _ = await run({**cp_env, "CORRAL_CHECKPOINTS": "off"}, STEPS, "CP-TASK go")
    asked = calls(Path(cp_env["CPBOX_DIR"]))
    assert [c["tool"] for c in asked] == ["write", "read", "write", "write"]
    assert all(c["checkpoint"] is None for c in asked)
    assert checkpoint_events(cp_env, sid) == []


async def test_a_server_without_checkpoints_is_asked_once_and_the_steps_go_on(cp_env: dict[str, str]) -> None:
    sid, _ = await run({**cp_env, "CPBOX_UNSUPPORTED": "1"}, STEPS, "CP-TASK go")
    asked = calls(Path(cp_env["CPBOX_DIR"]))
    assert [c["tool"] for c in asked] == ["write", "checkpoint", "read", "write", "write"]
    assert checkpoint_events(cp_env, sid) == []
    store = open_db(cp_env)
    try:
        results = [e.data for e in store.select(sid, types=["agent.tool_result"])]
    finally:
        store.close()
    assert [r["is_error"] for r in results] == [False] * 4


async def test_a_subagent_s_checkpoint_is_carried_into_the_parent_s_log(cp_env: dict[str, str]) -> None:
    script = Script(
        {
            "CP-PARENT": [
                Turn([write("a.txt")]),
                Turn([tool("spawn_subagent", {"task": "CP-CHILD: write b"})]),
                Turn([text("parent done")]),
            ],
            "CP-CHILD": [Turn([write("b.txt")]), Turn([text("child wrote b")])],
        }
    )
    sid, _ = await run(cp_env, script, "CP-PARENT go")
    store = open_db(cp_env)
    try:
        spawned = store.select(sid, types=["agent.subagent"])[0].data
        mine = [e.data for e in store.select(sid, types=["sandbox.checkpoint"])]
        childs = [e.data for e in store.select(spawned["session_id"], types=["sandbox.checkpoint"])]
    finally:
        store.close()
    assert len(mine) == 2 and len(childs) == 1
    # the parent's log names the files the child left, so a wake of the parent does not roll them back
    assert mine[1]["checkpoint_id"] == childs[0]["checkpoint_id"]
    assert mine[1]["tool_use_id"] == spawned["tool_use_id"] and mine[1]["default"]


async def test_a_slow_checkpoint_does_not_turn_its_call_into_a_timeout(cp_env: dict[str, str]) -> None:
    """The tool call and the checkpoint after it each have the tool timeout: a call that finished is never
    reported as timed out because its checkpoint was slow (the checkpoint is left out, and logged)."""
    script = Script({"CP-SLOW": [Turn([write("a.txt")]), Turn([text("done")])]})
    env = {**cp_env, "CPBOX_CHECKPOINT_S": "1.5", "CORRAL_TOOL_TIMEOUT_S": "1"}
    sid, _ = await run(env, script, "CP-SLOW go")
    store = open_db(cp_env)
    try:
        (result,) = [e.data for e in store.select(sid, types=["agent.tool_result"])]
    finally:
        store.close()
    assert not result["is_error"], result
    assert [c["tool"] for c in calls(Path(cp_env["CPBOX_DIR"]))] == ["write", "checkpoint"]
    assert checkpoint_events(cp_env, sid) == []


async def test_the_last_call_s_checkpoint_overlaps_the_next_model_request(cp_env: dict[str, str]) -> None:
    """A step costs the longer of checkpoint and model request, not their sum; the log order stays
    write-ahead: the result and its checkpoint (one append) before the next response."""
    script = Script({"CP-OVERLAP": [Turn([write("a.txt")]), Turn([write("b.txt")]), Turn([text("done")])]})
    fakes: list[Any] = []
    sid, store = await run({**cp_env, "CPBOX_CHECKPOINT_S": "1.5"}, script, "CP-OVERLAP go", fake=fakes)
    taken = [c["t"] for c in calls(Path(cp_env["CPBOX_DIR"])) if c["tool"] == "checkpoint"]
    asked = [r.received for r in fakes[0].requests]
    assert len(taken) == 2 and len(asked) == 3
    for checkpoint_started, next_request in zip(taken, asked[1:], strict=True):
        assert next_request < checkpoint_started + 1.0  # asked while the 1.5 s checkpoint ran, not after it
    assert [a for a in store.appends if "agent.tool_result" in a or "span.model_request" in a] == [
        ["agent.tool_use", "span.model_request"],
        ["agent.tool_result", "sandbox.checkpoint"],
        ["agent.tool_use", "span.model_request"],
        ["agent.tool_result", "sandbox.checkpoint"],
        ["agent.message", "span.model_request"],
    ]
    assert len(checkpoint_events(cp_env, sid)) == 2


def test_sigkill_at_every_boundary_with_checkpoints_and_broken_responses(cp_env: dict[str, str]) -> None:
    """The crash matrix over checkpointed calls whose next response first breaks (a failed attempt
    is an append too, made while a checkpoint may still be pending): killed after every append and
    woken, the log stays valid, every checkpoint sits right after its own tool result (one append),
    and every wake sends the latest default checkpoint its log holds."""
    script = faults_in_turn(
        Script(
            {
                "CP-CRASH": [
                    Turn([write("a.txt")]),
                    Turn([write("b.txt", sandbox_id="sbx_other")]),
                    Turn([tool("cpbox__read", {"path": "a.txt"})]),
                    Turn([write("c.txt")]),
                    Turn([text("All done.")]),
                ]
            }
        )
    )
    with FakeAnthropic(script) as fake:
        e = {**cp_env, **fake.env(), "CORRAL_KILL_AFTER_APPENDS": "1", "CORRAL_MODEL_IDLE_TIMEOUT_S": "1"}
        sid = killed_at_every_append(["run", "CP-CRASH go"], e, tries=60)
        assert fake.invalid == []
    log = read_log(cp_env, sid)
    assert_valid_history(log)
    assert [ev.data["text"] for ev in log if ev.type == "agent.message"][-1] == "All done."
    for ev in log:
        if ev.type == "sandbox.checkpoint":
            before = log[ev.position - 1]
            assert before.type == "agent.tool_result" and before.data["tool_use_id"] == ev.data["tool_use_id"]
            assert before.created_at == ev.created_at  # written by the same append
    # each call sent the newest default checkpoint its log held before the call's tool_use (none before the first)
    latest, expected = None, {}
    for ev in log:
        if ev.type == "sandbox.checkpoint" and ev.data["default"]:
            latest = ev.data["checkpoint_id"]
        if ev.type == "agent.tool_use":
            expected[ev.data["input"]["path"]] = latest  # each path is used by one call of the script
    sent = {c["args"]["path"]: c["checkpoint"] for c in calls(Path(cp_env["CPBOX_DIR"])) if c["tool"] != "checkpoint"}
    assert sent and all(expected[path] == checkpoint for path, checkpoint in sent.items()), (sent, expected)


async def test_a_real_server_without_checkpoints_is_asked_once(
    real_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The real sandbox server with checkpoints turned off (as a backend without them answers:
    refused): the first call's checkpoint is refused, said once, and no call after it asks again
    or fails for it."""
    env = {**real_env, "CORRAL_SERVERS": "sandbox", "CORRAL_CHECKPOINT_STORE": "off"}
    script = Script(
        {
            "CP-NONE": [
                Turn([tool("sandbox__write_file", {"path": "a.txt", "content": "a"})]),
                Turn([tool("sandbox__execute", {"command": "cat a.txt"})]),
                Turn([text("done")]),
            ]
        }
    )
    caplog.set_level(logging.INFO, logger="corral.harness")
    sid, _ = await run(env, script, "CP-NONE go")
    log = read_log(env, sid)
    results = [e.data for e in log if e.type == "agent.tool_result"]
    assert [r["is_error"] for r in results] == [False, False], results
    assert json.loads(results[1]["content"][0]["text"])["stdout"] == "a"
    assert not [e for e in log if e.type == "sandbox.checkpoint"]
    said = [r.getMessage() for r in caplog.records if "no checkpoints" in r.getMessage()]
    assert len(said) == 1 and "checkpoints are off" in said[0], said
