"""`corral mcp-config`: the printed config is exact, and `--apply` merges without clobbering."""

from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

import pytest
from mcp import StdioServerParameters
from mcp.client import Client

from tests.frontdoor.conftest import CORRAL, corral, free_port, one_line_error, run, start_up, token_of

pytestmark = pytest.mark.anyio
NAMES = ["corral-session", "corral-sandbox", "corral-credentials"]


def test_json_stdio_config_names_this_install_and_passes_settings_not_secrets(corral_env: dict[str, str]) -> None:
    env = {**corral_env, "CORRAL_LOG_LEVEL": "INFO", "CORRAL_WEBHOOK_TOKEN": "s3cret", "CORRAL_DB_PASSWORD": "pw"}
    done = corral("mcp-config", "json", env=env)
    assert done.returncode == 0, done.stderr
    servers = json.loads(done.stdout)["mcpServers"]
    assert list(servers) == NAMES
    for name, entry in servers.items():
        command = Path(entry["command"])
        assert command.is_absolute() and os.access(command, os.X_OK)
        assert entry["args"][-2:] == ["serve", name.removeprefix("corral-")]
        assert entry["env"] == {"CORRAL_HOME": corral_env["CORRAL_HOME"], "CORRAL_LOG_LEVEL": "INFO"}
    assert "s3cret" not in done.stdout and "pw" not in json.dumps(servers)


def test_json_http_config_points_at_corral_up_with_the_token(corral_env: dict[str, str]) -> None:
    done = corral("mcp-config", "json", "--http", env={**corral_env, "CORRAL_UP_PORT": "9123"})
    assert done.returncode == 0, done.stderr
    token = token_of(corral_env)  # made on first use, the one `corral up` will check
    entry = json.loads(done.stdout)["mcpServers"]["corral-session"]
    assert entry == {
        "type": "http",
        "url": "http://127.0.0.1:9123/session/mcp",
        "headers": {"Authorization": f"Bearer {token}"},
    }


async def test_claude_desktop_apply_merges_keeps_others_and_the_result_launches(
    corral_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "Claude" / "claude_desktop_config.json"
    path.parent.mkdir()
    other = {"command": "/usr/bin/other-server", "args": ["--x"]}
    path.write_text(
        json.dumps(
            {"globalShortcut": "Ctrl+Space", "mcpServers": {"other": other, "corral-session": {"command": "stale"}}}
        )
    )
    for _ in range(2):  # twice: idempotent
        done = corral("mcp-config", "claude-desktop", "--apply", "--config-file", str(path), env=corral_env)
        assert done.returncode == 0, done.stderr
    config = json.loads(path.read_text())
    assert config["globalShortcut"] == "Ctrl+Space"
    assert config["mcpServers"]["other"] == other
    assert sorted(config["mcpServers"]) == sorted(["other", *NAMES])
    assert config["mcpServers"]["corral-session"]["command"] != "stale"
    assert json.loads(path.with_name(path.name + ".bak").read_text())["mcpServers"]["other"] == other
    # Launch the session server exactly as Claude Desktop would, from the file.
    entry = config["mcpServers"]["corral-session"]
    params = StdioServerParameters(
        command=entry["command"], args=entry["args"], env={**entry["env"], "PATH": corral_env["PATH"]}
    )
    async with Client(params) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
    assert {"create_session", "emit_event", "get_events"} <= tools


def test_claude_desktop_default_path_is_under_home(corral_env: dict[str, str]) -> None:
    done = corral("mcp-config", "claude-desktop", "--apply", env=corral_env)
    assert done.returncode == 0, done.stderr
    path = Path(corral_env["HOME"]) / ".config" / "Claude" / "claude_desktop_config.json"
    assert sorted(json.loads(path.read_text())["mcpServers"]) == sorted(NAMES)


def test_broken_desktop_config_is_left_untouched_with_one_line(corral_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "claude_desktop_config.json"
    path.write_text('{"mcpServers": {"other": {}},')
    done = corral("mcp-config", "claude-desktop", "--apply", "--config-file", str(path), env=corral_env)
    line = one_line_error(done)
    assert "not valid JSON" in line and str(path) in line
    assert path.read_text() == '{"mcpServers": {"other": {}},'


def test_claude_desktop_http_is_refused_with_what_to_do(corral_env: dict[str, str]) -> None:
    line = one_line_error(corral("mcp-config", "claude-desktop", "--http", env=corral_env))
    assert "stdio" in line and "drop --http" in line


def test_claude_code_prints_the_add_commands(corral_env: dict[str, str]) -> None:
    done = corral("mcp-config", "claude-code", env=corral_env)
    assert done.returncode == 0, done.stderr
    lines = [shlex.split(line) for line in done.stdout.splitlines()]
    assert len(lines) == 3 and all(line[:5] == ["claude", "mcp", "add-json", "--scope", "user"] for line in lines)
    config = json.loads(lines[0][6])
    assert lines[0][5] == "corral-session" and config["args"][-2:] == ["serve", "session"]
    assert config["env"]["CORRAL_HOME"] == corral_env["CORRAL_HOME"]
    # Loaded before Claude Code's first model request (else the first tool call finds no tool).
    assert all(json.loads(line[6])["alwaysLoad"] is True for line in lines)


def test_servers_picks_which_servers_are_registered(corral_env: dict[str, str]) -> None:
    done = corral("mcp-config", "json", "--servers", "sandbox,credentials", env=corral_env)
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["mcpServers"]) == ["corral-credentials", "corral-sandbox"]
    line = one_line_error(corral("mcp-config", "json", "--servers", "sandbox,nope", env=corral_env))
    assert "nope" in line and "sandbox" in line


def test_http_points_at_the_port_given_or_the_running_up(corral_env: dict[str, str]) -> None:
    done = corral("mcp-config", "json", "--http", "--port", "9123", env=corral_env)
    assert '"http://127.0.0.1:9123/session/mcp"' in done.stdout, done.stdout
    port = free_port()
    up = start_up({**corral_env, "CORRAL_UP_PORT": str(port)}, port)
    try:  # no --port and no CORRAL_UP_PORT: the running `corral up` says where it is
        done = corral("mcp-config", "json", "--http", env=corral_env)
        assert f'"http://127.0.0.1:{port}/session/mcp"' in done.stdout, done.stdout
        checked = corral("mcp-config", "json", "--http", "--check", env=corral_env)
        assert checked.returncode == 0 and checked.stdout.count(": ok (") == 3, checked.stdout + checked.stderr
    finally:
        assert up.stop() == 0


def test_check_says_why_a_client_cannot_connect(corral_env: dict[str, str]) -> None:
    port = free_port()
    down = corral("mcp-config", "claude-code", "--http", "--apply", "--port", str(port), env=corral_env)
    assert down.returncode == 1 and f"nothing listens on 127.0.0.1:{port}" in down.stderr, down.stderr
    assert "nothing was applied" in down.stderr
    up = start_up({**corral_env, "CORRAL_UP_PORT": str(port)}, port)
    try:  # a client holding another install's token
        other = {**corral_env, "CORRAL_HOME": corral_env["CORRAL_HOME"] + "-other"}
        wrong = corral(
            "mcp-config", "json", "--http", "--check", "--port", str(port), "--servers", "sandbox", env=other
        )
        assert wrong.returncode == 1 and "refused the bearer token (401)" in wrong.stderr, wrong.stderr
    finally:
        assert up.stop() == 0


def test_claude_code_apply_without_claude_says_how_to_install(corral_env: dict[str, str], tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with corral (and a shell) but no `claude`
    bin_dir.mkdir()
    (bin_dir / "corral").symlink_to(CORRAL)
    done = corral("mcp-config", "claude-code", "--apply", env={**corral_env, "PATH": str(bin_dir)})
    line = one_line_error(done)
    assert "npm install -g @anthropic-ai/claude-code" in line


DSN = "postgresql://corral:pg-s3cret-pw@127.0.0.1:5432/corral"
QUEUE = "postgres://queue:q-s3cret-pw@db.internal/jobs"


def test_no_database_password_in_printed_entries_or_claude_code_arguments(corral_env: dict[str, str]) -> None:
    env = {**corral_env, "CORRAL_SESSION_STORE": DSN, "CORRAL_QUEUE_URL": QUEUE}
    for client in ("json", "claude-code"):
        done = corral("mcp-config", client, env=env)
        assert done.returncode == 0, done.stderr
        assert "s3cret" not in done.stdout, done.stdout
        assert (
            "${CORRAL_SESSION_STORE}" in done.stdout and "${CORRAL_QUEUE_URL}" in done.stdout
        )  # Claude Code expands these
        assert "CORRAL_SESSION_STORE holds a password" in done.stderr
    entry = json.loads(corral("mcp-config", "json", env=env).stdout)["mcpServers"]["corral-session"]
    assert entry["env"]["CORRAL_SESSION_STORE"] == "${CORRAL_SESSION_STORE}"


def test_claude_desktop_file_is_private_and_keeps_no_password(corral_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "claude_desktop_config.json"
    path.write_text('{"mcpServers": {}}')
    path.chmod(0o644)
    env = {**corral_env, "CORRAL_SESSION_STORE": DSN}
    for _ in range(2):  # the second run also writes the backup
        done = corral("mcp-config", "claude-desktop", "--apply", "--config-file", str(path), env=env)
        assert done.returncode == 0, done.stderr
    assert "~/.pgpass" in done.stderr
    for written in (path, path.with_name(path.name + ".bak")):
        assert stat.S_IMODE(written.stat().st_mode) == 0o600, written
        assert "s3cret" not in written.read_text()
    entry = json.loads(path.read_text())["mcpServers"]["corral-session"]
    assert (
        entry["env"]["CORRAL_SESSION_STORE"] == "postgresql://corral@127.0.0.1:5432/corral"
    )  # Claude Desktop expands nothing


def test_claude_code_http_commands_carry_no_token(corral_env: dict[str, str]) -> None:
    done = corral("mcp-config", "claude-code", "--http", env=corral_env)
    assert done.returncode == 0, done.stderr
    token = token_of(corral_env)
    assert token not in done.stdout and "headersHelper" in done.stdout
    helper = json.loads(shlex.split(done.stdout.splitlines()[0])[-1])["headersHelper"]
    printed = run(shlex.split(helper), corral_env)  # what Claude Code runs at connect time
    assert printed.returncode == 0 and json.loads(printed.stdout) == {"Authorization": f"Bearer {token}"}
