"""`corral run` / `corral wake` as a user runs them: subprocesses, the fake API, a stdio MCP server."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from tests.conftest import wait_until
from tests.harness.conftest import corral
from tests.harness.fake_anthropic import FakeAnthropic
from tests.harness.scripts import multi_tool_task


def session_id(output: str) -> str:
    return re.search(r"ses_[0-9a-f]+", output).group(0)


def test_run_streams_progress_and_prints_the_session(env: dict[str, str], toolbox_dir: Path) -> None:
    with FakeAnthropic(multi_tool_task()) as fake:
        t = time.time()
        p = corral(["run", "CRASH-TASK go"], {**env, **fake.env()})
        print("took", time.time() - t)
    assert p.returncode == 0, p.stderr + p.stdout
    print(p.stdout)
    assert "All done." in p.stdout and "Planning." in p.stdout
    assert "→ toolbox__append_line" in p.stdout and "← toolbox__append_line" in p.stdout
    assert session_id(p.stdout)
    assert sorted((toolbox_dir / "lines.txt").read_text().split()) == ["child-1", "main-1"]
    assert max(fake.counts.values()) == 1


def test_missing_api_key_is_one_clear_line(env: dict[str, str]) -> None:
    p = corral(["run", "anything"], env)
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "ANTHROPIC_API_KEY is not set" in p.stderr
    assert "Traceback" not in p.stderr


def test_ctrl_c_stops_cleanly_and_the_session_resumes(env: dict[str, str], toolbox_dir: Path) -> None:
    import signal
    import subprocess
    import sys

    from tests.harness.conftest import ROOT
    from tests.harness.fake_anthropic import Script, Turn, text, tool
    from tests.harness.test_crash import assert_valid_history, read_log

    script = Script(
        {"SIGINT-TASK": [Turn([tool("toolbox__slow", {"seconds": 30})]), Turn([text("finished after the wake")])]}
    )
    with FakeAnthropic(script) as fake:
        e = {**env, **fake.env()}
        p = subprocess.Popen(
            [sys.executable, "-m", "corral.cli", "run", "SIGINT-TASK"],
            env=e,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        wait_until((toolbox_dir / "slow.txt").exists, "the slow tool to be running", seconds=60)
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        out, err = p.communicate(timeout=60)
        assert p.returncode == 130, out + err
        assert "Traceback" not in err and "corral wake ses_" in err
        sid = session_id(out)
        assert read_log(e, sid)[-1].data["status"] == "stopped"
        p2 = corral(["wake", sid], {**e, "CORRAL_TOOL_TIMEOUT_S": "2"})
    assert p2.returncode == 0, p2.stdout + p2.stderr
    assert "finished after the wake" in p2.stdout
    assert_valid_history(read_log(e, sid))
