"""Real MCP clients: the Claude Code CLI and the MCP Inspector CLI, over stdio and HTTP.

Both run inside a private network namespace (`netns`: only `lo`), with `corral up` in
the same namespace for the HTTP cases, so whatever they try beyond loopback goes nowhere.
`.ci/run` installs both (npm) and Debian's bubblewrap the sandbox server needs.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.frontdoor.conftest import CORRAL, Netns, corral, free_port, run, start_up, token_of

SERVERS = ("session", "sandbox", "credentials")
# One harmless call per server: (tool, --tool-arg pairs, what the result must hold)
CALLS = {
    "session": ("create_session", [], "session_id"),
    "sandbox": ("execute", ["command=echo corral-was-here"], "corral-was-here"),
    "credentials": ("list_credentials", [], "credentials"),
}


def claude() -> str:
    return shutil.which("claude") or "claude"  # tests calling this carry requires("claude")


def inspector() -> str:
    return shutil.which("mcp-inspector") or "mcp-inspector"  # tests calling this carry requires("inspector")


def connected(listing: str) -> dict[str, bool]:
    """`claude mcp list` lines: 'corral-session: <command or url> - ✔ Connected'."""
    return {
        m.group(1): "Connected" in m.group(2) and "Failed" not in m.group(2)
        for m in re.finditer(r"^(corral-\w+): (.*)$", listing, re.MULTILINE)
    }


@pytest.mark.requires("claude", "bwrap")
def test_claude_code_stdio_servers_connect(corral_env: dict[str, str], netns: Netns) -> None:
    exe = claude()
    for _ in range(2):  # twice: the second run replaces the entries instead of failing on existing names
        applied = corral("mcp-config", "claude-code", "--apply", env=corral_env, prefix=netns.prefix, timeout=120)
        assert applied.returncode == 0, applied.stderr
    listing = run([*netns.prefix, exe, "mcp", "list"], corral_env, timeout=120, cwd=corral_env["HOME"])
    assert listing.returncode == 0, listing.stderr
    assert connected(listing.stdout) == {f"corral-{n}": True for n in SERVERS}, listing.stdout


def recording_claude(exe: str, folder: Path) -> tuple[str, Path]:
    """A `claude` first on PATH that logs its argv, then runs the real one."""
    folder.mkdir()
    log = folder / "argv.log"
    wrapper = folder / "claude"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(log))}\nexec {shlex.quote(exe)} "$@"\n')
    wrapper.chmod(0o755)
    return str(folder), log


@pytest.mark.requires("claude", "bwrap")
def test_claude_code_http_servers_connect_with_the_token(
    corral_env: dict[str, str], netns: Netns, tmp_path: Path
) -> None:
    exe = claude()
    port = free_port()
    up = start_up({**corral_env, "CORRAL_UP_PORT": str(port)}, port, prefix=netns.prefix)
    try:
        bin_dir, argv_log = recording_claude(exe, tmp_path / "bin")
        env = {**corral_env, "CORRAL_UP_PORT": str(port), "PATH": f"{bin_dir}:{corral_env['PATH']}"}
        applied = corral("mcp-config", "claude-code", "--http", "--apply", env=env, prefix=netns.prefix, timeout=120)
        assert applied.returncode == 0, applied.stderr
        listing = run([*netns.prefix, exe, "mcp", "list"], env, timeout=120, cwd=env["HOME"])
        assert connected(listing.stdout) == {f"corral-{n}": True for n in SERVERS}, listing.stdout
        assert f"http://127.0.0.1:{port}/session/mcp" in listing.stdout
        # The token reached Claude Code at connect time only: not through argv, not into its config.
        token = token_of(corral_env)
        assert "add-json" in argv_log.read_text() and token not in argv_log.read_text()
        assert token not in (Path(env["HOME"]) / ".claude.json").read_text()
        # Project scope: the .mcp.json people commit holds no token either, and the command says it is shared.
        project = tmp_path / "project"
        project.mkdir()
        shared = run(
            [*netns.prefix, CORRAL, "mcp-config", "claude-code", "--http", "--apply", "--scope", "project"],
            env,
            timeout=120,
            cwd=str(project),
        )
        assert shared.returncode == 0, shared.stderr
        assert "project scope" in shared.stderr and ".mcp.json" in shared.stderr
        mcp_json = (project / ".mcp.json").read_text()
        assert "corral-session" in mcp_json and token not in mcp_json and "Bearer" not in mcp_json
        assert token not in argv_log.read_text()
    finally:
        assert up.stop() == 0


def inspect(netns: Netns, env: dict[str, str], target: list[str], *args: str) -> dict:
    done = run([*netns.prefix, inspector(), "--cli", *target, *args], env, timeout=90)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.mark.requires("inspector", "bwrap")
@pytest.mark.parametrize("server", SERVERS)
def test_inspector_over_stdio(corral_env: dict[str, str], netns: Netns, server: str) -> None:
    target = [CORRAL, "serve", server]
    tools = {t["name"] for t in inspect(netns, corral_env, target, "--method", "tools/list")["tools"]}
    tool, pairs, expect = CALLS[server]
    assert tool in tools
    result = inspect(
        netns,
        corral_env,
        target,
        "--method",
        "tools/call",
        "--tool-name",
        tool,
        *(["--tool-arg", *pairs] if pairs else []),
    )
    assert result["isError"] is False and expect in json.dumps(result), result


@pytest.mark.requires("inspector", "bwrap")
def test_inspector_over_http_with_the_bearer_header(corral_env: dict[str, str], netns: Netns) -> None:
    inspector()
    port = free_port()
    up = start_up(corral_env, port, prefix=netns.prefix)
    try:
        auth = f"Authorization: Bearer {token_of(corral_env)}"
        for server in SERVERS:
            target = [f"http://127.0.0.1:{port}/{server}/mcp", "--transport", "http", "--header", auth]
            tools = {t["name"] for t in inspect(netns, corral_env, target, "--method", "tools/list")["tools"]}
            tool, pairs, expect = CALLS[server]
            assert tool in tools
            result = inspect(
                netns,
                corral_env,
                target,
                "--method",
                "tools/call",
                "--tool-name",
                tool,
                *(["--tool-arg", *pairs] if pairs else []),
            )
            assert result["isError"] is False and expect in json.dumps(result), result
        # Without the header the Inspector is turned away.
        refused = run(
            [
                *netns.prefix,
                inspector(),
                "--cli",
                f"http://127.0.0.1:{port}/session/mcp",
                "--transport",
                "http",
                "--method",
                "tools/list",
            ],
            corral_env,
            timeout=90,
        )
        assert refused.returncode != 0 and "missing or wrong bearer token" in refused.stdout + refused.stderr
    finally:
        assert up.stop() == 0
