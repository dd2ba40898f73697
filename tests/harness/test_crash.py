"""Kill the harness process (SIGKILL) at every event boundary of a scripted multi-tool task,
wake it, and check: the task completes, no recorded model call is repeated, no
non-idempotent tool runs twice, and every tool_use has exactly one tool_result."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from corral.servers.session import Event, open_store
from tests.harness.conftest import ROOT, corral
from tests.harness.fake_anthropic import FakeAnthropic, Fault, Request, Script, Turn
from tests.harness.scripts import multi_tool_task
from tests.harness.test_cli import session_id

pytestmark = pytest.mark.slow


def read_log(env: dict[str, str], sid: str) -> list[Event]:
    store = open_store(str(Path(env["CORRAL_HOME"]) / "sessions.db"))
    try:
        return store.select(sid)
    finally:
        store.close()


def children(env: dict[str, str], sid: str) -> list[str]:
    return [e.data["session_id"] for e in read_log(env, sid) if e.type == "agent.subagent"]


def assert_valid_history(log: list[Event]) -> None:
    uses = [e.data["id"] for e in log if e.type == "agent.tool_use"]
    results = Counter(e.data["tool_use_id"] for e in log if e.type == "agent.tool_result")
    assert len(uses) == len(set(uses))
    assert all(results[u] == 1 for u in uses), f"tool_use without exactly one result: {results}"
    assert set(results) <= set(uses)
    # a response is recorded once: its message id appears in one span only
    spans = [e.data["message_id"] for e in log if e.type == "span.model_request"]
    assert len(spans) == len(set(spans))


def assert_done(
    env: dict[str, str], sid: str, toolbox_dir: Path, fake: FakeAnthropic, repeats_allowed: int = 0
) -> None:
    log = read_log(env, sid)
    assert_valid_history(log)
    for child in children(env, sid):
        assert_valid_history(read_log(env, child))
    assert [e.data["text"] for e in log if e.type == "agent.message"][-1] == "All done."
    lines = (toolbox_dir / "lines.txt").read_text().split() if (toolbox_dir / "lines.txt").exists() else []
    assert len(lines) == len(set(lines)), f"a non-idempotent tool ran twice: {lines}"
    repeated = {k: n for k, n in fake.counts.items() if n > 1}
    assert len(repeated) <= repeats_allowed, f"recorded model calls requested again: {repeated}"
    for e in log:
        if e.type == "agent.tool_result" and e.data.get("interrupted"):
            assert e.data["is_error"] and "outcome is unknown" in e.data["content"][0]["text"]


def test_sigkill_at_every_event_boundary_then_wake(env: dict[str, str], toolbox_dir: Path) -> None:
    """One session, woken again and again: each process makes exactly one append of progress
    (after its claim) and is SIGKILLed right after it, so every event boundary is a crash point."""
    with FakeAnthropic(multi_tool_task()) as fake:
        e = {**env, **fake.env(), "CORRAL_KILL_AFTER_APPENDS": "1"}
        p = corral(["run", "CRASH-TASK go"], e)
        assert p.returncode == -signal.SIGKILL, p.stderr
        sid = session_id(p.stdout)
        kills = 1
        for _ in range(60):
            p = corral(["wake", sid], e)
            if p.returncode == 0:
                break
            assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
            kills += 1
        assert p.returncode == 0, p.stdout + p.stderr
        assert kills > 15  # every boundary of the task was a crash point
        assert_done(env, sid, toolbox_dir, fake)
        interrupted = [e for e in read_log(env, sid) if e.type == "agent.tool_result" and e.data.get("interrupted")]
        assert [e.data["name"] for e in interrupted] == [
            "toolbox__append_line"
        ]  # killed after its tool_use was written
        lines = toolbox_dir / "lines.txt"
        assert not lines.exists() or "main-1" not in lines.read_text()  # it never ran, and was not re-run


def killed_in_flight_then_woken(
    env: dict[str, str], script: Script, key: tuple[str, int], nth: int, **extra: str
) -> tuple[FakeAnthropic, str]:
    """`corral run` SIGKILLed as the `nth` request for `key` arrives (its answer is never read), then `corral wake`."""
    proc: list[subprocess.Popen[str]] = []

    def kill(req: Request) -> None:
        if req.key == key and fake.counts[key] == nth:
            proc[0].send_signal(signal.SIGKILL)

    with FakeAnthropic(script, on_request=kill) as fake:
        e = {**env, **fake.env(), **extra}
        proc.append(
            subprocess.Popen(
                [sys.executable, "-m", "corral.cli", "run", "CRASH-TASK go"],
                env=e,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        out, err = proc[0].communicate(timeout=120)
        assert proc[0].returncode == -signal.SIGKILL, err
        sid = session_id(out)
        p = corral(["wake", sid], e)
        assert p.returncode == 0, p.stdout + p.stderr
    return fake, sid


def test_killed_while_waiting_for_the_model_repeats_only_the_unrecorded_call(
    env: dict[str, str], toolbox_dir: Path
) -> None:
    fake, sid = killed_in_flight_then_woken(env, multi_tool_task(), ("CRASH-TASK", 2), 1)
    assert fake.counts[("CRASH-TASK", 2)] == 2  # asked again: its answer was never recorded
    assert_done(env, sid, toolbox_dir, fake, repeats_allowed=1)
    assert sorted((toolbox_dir / "lines.txt").read_text().split()) == ["child-1", "main-1"]


def faults_in_turn(script: Script) -> Script:
    """Each scripted turn first answers broken, a different fault per turn (see test_faults), then whole."""
    faults = [
        Fault("drop"),
        Fault("error_event"),
        Fault("bad_json"),
        Fault("no_message_stop"),
        Fault("stall", stall_s=20.0),
    ]
    convs: dict[str, list[Any]] = {}
    n = 0
    for name, turns in script.conversations.items():
        convs[name] = []
        for t in turns:
            assert isinstance(t, Turn)
            fault = faults[n % len(faults)] if any(b["type"] == "tool_use" for b in t.blocks) else Fault("drop")
            convs[name].append([replace(t, fault=fault), t])
            n += 1
    return Script(convs, script.summary)


def assert_faults_recorded(env: dict[str, str], sid: str, fake: FakeAnthropic, killed_in_flight: int = 0) -> None:
    every = read_log(env, sid) + [e for c in children(env, sid) for e in read_log(env, c)]
    failed = [e.data for e in every if e.type == "session.error" and not e.data["fatal"]]
    assert len(failed) == len([r for r in fake.requests if not r.whole])  # every failed attempt, once
    whole = [r.key for r in fake.requests if r.whole]
    assert len(whole) - len(set(whole)) == killed_in_flight, "a recorded response was asked for again"
    assert fake.invalid == []
    results = [e.data for e in every if e.type == "agent.tool_result"]
    assert not [r for r in results if r["is_error"] and not r.get("interrupted")], results  # no partial input ever ran


def killed_at_every_append(run: list[str], e: dict[str, str], tries: int) -> str:
    """`corral run` then `corral wake` again and again, each SIGKILLed right after its one append
    (CORRAL_KILL_AFTER_APPENDS=1 in `e`), until one completes; the session's id."""
    p = corral(run, e)
    assert p.returncode == -signal.SIGKILL, p.stderr
    sid = session_id(p.stdout)
    for _ in range(tries):
        p = corral(["wake", sid], e)
        if p.returncode == 0:
            return sid
        assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    raise AssertionError(f"no wake completed in {tries} tries: {p.stdout + p.stderr}")


def test_sigkill_at_every_boundary_of_a_task_whose_every_response_first_breaks(
    env: dict[str, str], toolbox_dir: Path
) -> None:
    """The crash matrix with faults: each failed attempt is an append, so the harness is also killed
    right after recording one; the wake retries it, and nothing is duplicated or lost."""
    with FakeAnthropic(faults_in_turn(multi_tool_task())) as fake:
        e = {**env, **fake.env(), "CORRAL_KILL_AFTER_APPENDS": "1", "CORRAL_MODEL_IDLE_TIMEOUT_S": "1"}
        sid = killed_at_every_append(["run", "CRASH-TASK go"], e, tries=80)
        assert_done(env, sid, toolbox_dir, fake, repeats_allowed=99)
        assert_faults_recorded(env, sid, fake)
        log = read_log(env, sid)
        errors = [e for e in log if e.type == "session.error"]
        assert len(errors) >= 4 and all(not e.data["fatal"] for e in errors)
        for err in errors:  # a wake followed each recorded failure (the kill came right after it)
            assert log[err.position + 1].type == "session.status" and log[err.position + 1].data["reason"] == "wake"


def test_killed_during_a_retried_attempt_then_woken(env: dict[str, str], toolbox_dir: Path) -> None:
    """SIGKILL while the retry of a broken response is in flight: the wake asks again, once."""
    fake, sid = killed_in_flight_then_woken(
        env, faults_in_turn(multi_tool_task()), ("CRASH-TASK", 1), 2, CORRAL_MODEL_IDLE_TIMEOUT_S="1"
    )
    assert fake.counts[("CRASH-TASK", 1)] == 3  # broken, killed in flight, whole
    assert_done(env, sid, toolbox_dir, fake, repeats_allowed=99)
    assert_faults_recorded(env, sid, fake, killed_in_flight=1)  # the answer the killed harness never read
    assert sorted((toolbox_dir / "lines.txt").read_text().split()) == ["child-1", "main-1"]
