"""Kill the harness process (SIGKILL) at every event boundary of a scripted multi-tool task,
wake it, and check: the task completes, no recorded model call is repeated, no
non-idempotent tool runs twice, and every tool_use has exactly one tool_result."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from corral.servers.session import Event, open_store
from tests.harness.conftest import ROOT, corral
from tests.harness.fake_anthropic import FakeAnthropic, Request
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


def assert_done(env: dict[str, str], sid: str, toolbox_dir: Path, fake: FakeAnthropic, repeats_allowed: int = 0) -> None:
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
        assert [e.data["name"] for e in interrupted] == ["toolbox__append_line"]  # killed after its tool_use was written
        lines = toolbox_dir / "lines.txt"
        assert not lines.exists() or "main-1" not in lines.read_text()  # it never ran, and was not re-run


def test_killed_while_waiting_for_the_model_repeats_only_the_unrecorded_call(env: dict[str, str], toolbox_dir: Path) -> None:
    proc: list[subprocess.Popen[str]] = []

    def kill_on_turn_2(req: Request) -> None:
        if req.key == ("CRASH-TASK", 2) and fake.counts[req.key] == 1:
            proc[0].send_signal(signal.SIGKILL)

    with FakeAnthropic(multi_tool_task(), on_request=kill_on_turn_2) as fake:
        e = {**env, **fake.env()}
        proc.append(subprocess.Popen([sys.executable, "-m", "corral.cli", "run", "CRASH-TASK go"], env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        out, err = proc[0].communicate(timeout=120)
        assert proc[0].returncode == -signal.SIGKILL, err
        sid = session_id(out)
        p = corral(["wake", sid], e)
        assert p.returncode == 0, p.stdout + p.stderr
        assert fake.counts[("CRASH-TASK", 2)] == 2  # asked again: its answer was never recorded
        assert_done(env, sid, toolbox_dir, fake, repeats_allowed=1)
        assert sorted((toolbox_dir / "lines.txt").read_text().split()) == ["child-1", "main-1"]
