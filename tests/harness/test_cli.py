"""`corral run` / `corral wake` as a user runs them: subprocesses, the fake API, a stdio MCP server."""

from __future__ import annotations

import re
import time
from pathlib import Path

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
