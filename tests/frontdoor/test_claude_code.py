"""Headless Claude Code as the brain: `claude -p` calls Corral's tools on its first request.

Everything runs inside a private network namespace with only `lo`: a scripted Messages API
(`tests/frontdoor/claude_api.py`), an upstream for `http_request`, Corral (stdio servers that
Claude Code launches, or `corral up`), and Claude Code itself, configured the way the README
says: `corral mcp-config claude-code [--http] --apply`, then `claude -p ... --allowedTools`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.frontdoor.claude_api import TASK
from tests.frontdoor.conftest import CORRAL, Netns, corral, run, start_up
from tests.frontdoor.test_clients import claude

ROOT = Path(__file__).resolve().parents[2]
SECRET = "cc-s3cret-9f8e7d6c5b4a"
PREFIX = "mcp__corral-"


def _api(netns: Netns, env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    api_port, upstream_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *netns.prefix,
            sys.executable,
            "-m",
            "tests.frontdoor.claude_api",
            str(workdir),
            str(api_port),
            str(upstream_port),
            SECRET,
            PREFIX,
        ],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not (workdir / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the scripted API did not start"
        time.sleep(0.05)
    return proc, api_port, upstream_port


def _vault_credential(env: dict[str, str], upstream_port: int) -> None:
    done = subprocess.run(
        [
            CORRAL,
            "vault",
            "set",
            "echo",
            "--host",
            "127.0.0.1",
            "--scheme",
            "http",
            "--port",
            str(upstream_port),
            "--allow-private",
        ],
        env=env,
        input=SECRET,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _tool_results(requests: list[dict]) -> dict[str, str]:
    """tool name -> the text of its result, as Claude Code sent it back to the model."""
    names = {}
    results = {}
    for body in requests:
        for message in body.get("messages", []):
            for block in message["content"] if isinstance(message["content"], list) else []:
                if block.get("type") == "tool_use":
                    names[block["id"]] = block["name"]
                elif block.get("type") == "tool_result":
                    content = block["content"]
                    text = content if isinstance(content, str) else "".join(c.get("text", "") for c in content)
                    results[names.get(block["tool_use_id"], "?")] = text
    return results


@pytest.mark.requires("claude", "bwrap")
@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_claude_code_calls_corral_tools_on_its_first_request(
    corral_env: dict[str, str], netns: Netns, tmp_path: Path, transport: str
) -> None:
    exe = claude()
    workdir = tmp_path / "api"
    workdir.mkdir()
    api, api_port, upstream_port = _api(netns, corral_env, workdir)
    env = {
        **corral_env,
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{api_port}",
        "ANTHROPIC_API_KEY": "sk-ant-test",
        # How long Claude Code waits for `alwaysLoad` servers before its first request (default 5 s).
        # A server answers in about 1 s here; the margin is for a loaded CI machine. Without
        # `alwaysLoad` Claude Code does not wait at all, whatever this says, and the test fails.
        "MCP_CONNECT_TIMEOUT_MS": "30000",
    }
    up = None
    try:
        _vault_credential(env, upstream_port)
        servers = ["--servers", "sandbox,credentials"]
        if transport == "http":
            port = free_port()
            up = start_up({**env, "CORRAL_UP_PORT": str(port)}, port, prefix=netns.prefix)
            servers += ["--http", "--port", str(port)]
        applied = corral("mcp-config", "claude-code", "--apply", *servers, env=env, prefix=netns.prefix, timeout=120)
        assert applied.returncode == 0, applied.stderr
        done = run(
            [
                *netns.prefix,
                exe,
                "-p",
                f"{TASK}: use the sandbox and the echo credential",
                "--allowedTools",
                f"{PREFIX}sandbox,{PREFIX}credentials",
                "--output-format",
                "json",
            ],
            env,
            timeout=180,
            cwd=env["HOME"],
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["result"] == "all three tools answered", done.stdout
    finally:
        if up is not None:
            assert up.stop() == 0
        api.kill()
        api.wait(5)
    requests = [json.loads(line) for line in (workdir / "requests.jsonl").read_text().splitlines()]
    with_tools = [r for r in requests if r.get("tools")]
    first = {t["name"] for t in with_tools[0]["tools"]}
    assert {f"{PREFIX}sandbox__execute", f"{PREFIX}credentials__http_request"} <= first, sorted(
        first
    )  # loaded before the first request
    results = _tool_results(requests)
    assert json.loads(results[f"{PREFIX}sandbox__execute"])["stdout"] == "corral-cc\n", results
    assert json.loads(results[f"{PREFIX}sandbox__read_file"])["content"] == "corral-cc\n", results
    answer = json.loads(results[f"{PREFIX}credentials__http_request"])
    assert answer["status"] == 200 and answer["body"].startswith("upstream-ok"), answer
    assert "[REDACTED]" in answer["body"]
    assert SECRET not in (workdir / "requests.jsonl").read_text()  # no secret ever reached Claude Code
