"""A `corral run` through `corral up` (URLs + token), then its log in both viewers.

The brain is the real harness against the fake Anthropic API (tests/harness/fake_anthropic.py);
the sandbox and session servers are the ones `corral up` serves.
"""

from __future__ import annotations

import re

import httpx

from tests.frontdoor.conftest import UpProcess, corral, token_of
from tests.harness.fake_anthropic import FakeAnthropic, Script, Turn, text, tool


def test_a_harness_run_through_corral_up_reads_well_in_both_viewers(up: UpProcess) -> None:
    script = Script(
        {
            "VIEWER-TASK": [
                Turn([text("Counting."), tool("sandbox__execute", {"command": "echo 42"})]),
                Turn([text("The answer is 42.")]),
            ]
        }
    )
    token = token_of(up.env)
    with FakeAnthropic(script) as fake:
        env = {
            **up.env,
            **fake.env(),
            "CORRAL_SANDBOX_URL": f"{up.base}/sandbox/mcp",
            "CORRAL_SESSION_URL": f"{up.base}/session/mcp",
            "CORRAL_CREDENTIALS_URL": f"{up.base}/credentials/mcp",
            "CORRAL_SERVER_TOKEN": token,
        }
        done = corral("run", "VIEWER-TASK: what is 6*7?", env=env, timeout=180)
    assert done.returncode == 0, done.stderr + done.stdout
    sid = re.search(r"ses_[0-9a-f]+", done.stdout + done.stderr).group(0)

    events = httpx.get(
        f"{up.base}/sessions/{sid}/events.json", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).json()["events"]
    by_kind = {}
    for e in events:
        by_kind.setdefault(e["kind"], []).append(e)
    assert any("VIEWER-TASK" in e["text"] for e in by_kind["user"])
    assert [e["text"] for e in by_kind["model"]] == ["Counting.", "The answer is 42."]
    assert by_kind["tool"][0]["title"] == "tool sandbox__execute" and "echo 42" in by_kind["tool"][0]["text"]
    assert any("42" in e["text"] for e in by_kind["result"])
    assert sum(sum(e["usage"].values()) for e in by_kind["usage"]) > 0, by_kind["usage"]

    shown = corral("sessions", "show", sid, env={**up.env, "COLUMNS": "160"})
    assert shown.returncode == 0, shown.stderr
    assert "The answer is 42." in shown.stdout and "sandbox__execute" in shown.stdout
    assert re.search(r"tokens: in \d+  out [1-9]\d*  cache read [1-9]\d*", shown.stdout), (
        shown.stdout
    )  # the 2nd request read the cache
    result = shown.stdout[shown.stdout.index("agent.tool_result") :]  # the result as the timeline shows it
    for field in ('"exit_code": 0', '"stdout": "42\\n"', '"sandbox_id": "sbx_'):
        assert field in result, (field, shown.stdout)
