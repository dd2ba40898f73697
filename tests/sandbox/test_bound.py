"""The caller's default sandbox is bound to a durable key in the registry: it survives a
restart of the server (and of the client), and a bound sandbox that is gone says so once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mcp import StdioServerParameters
from mcp.client import Client

from corral.servers.sandbox.config import SandboxSettings
from tests.conftest import until

from .conftest import Harness, call, fail
from .test_e2e import CORRAL, serve_env

pytestmark = pytest.mark.anyio


async def test_the_default_sandbox_survives_a_server_restart(harness: Harness) -> None:
    async with harness.client() as c:
        await call(c, "write_file", path="f.txt", content="mine")
        theirs = await c.call_tool(
            "write_file",
            {"path": "f.txt", "content": "theirs"},
            meta={"corral/client": "ses_other"},
        )
        assert not theirs.is_error
    again = harness.restart()
    async with again.client() as c:
        assert (await call(c, "read_file", path="f.txt"))["content"] == "mine"
        other = await c.call_tool("read_file", {"path": "f.txt"}, meta={"corral/client": "ses_other"})
        assert other.structured_content["content"] == "theirs"
        assert len((await call(c, "list_sandboxes"))["sandboxes"]) == 2


async def test_a_bound_sandbox_that_is_gone_says_so_once_then_a_fresh_one(
    harness: Harness,
) -> None:
    async with harness.client() as c:
        sid = (await call(c, "write_file", path="f.txt", content="x"))["sandbox_id"]
    harness.service.registry.set_state(sid, "destroyed", "idle")  # the reaper took it while nobody looked
    again = harness.restart()
    async with again.client() as c:
        text = await fail(c, "read_file", "sandbox_lost", path="f.txt")
        assert sid in text and "fresh" in text
        fresh = await call(c, "execute", command="ls")
        assert fresh["sandbox_id"] != sid and fresh["stdout"] == ""
        await call(c, "destroy", sandbox_id=fresh["sandbox_id"])  # destroyed by request: no complaint next time
        assert (await call(c, "execute", command="echo new"))["stdout"] == "new\n"


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.requires("bwrap")
async def test_a_restarted_stdio_client_reads_the_file_it_wrote(settings: SandboxSettings, tmp_path: Path) -> None:
    """A stdio client that sends no key (each new `claude -p`) gets its CORRAL_HOME's default
    sandbox: the next server process, after the first one ended, finds its files and processes."""
    pidfile = tmp_path / "server.pid"
    serve = f'echo $$ > {pidfile}; exec "$0" serve sandbox'
    params = StdioServerParameters(command="sh", args=["-c", serve, CORRAL], env=serve_env(settings))
    async with Client(params) as c:
        wrote = await call(c, "write_file", path="notes/today.md", content="remember me\n")
        started = await call(c, "execute", command="sleep 600", background=True)
    first = int(pidfile.read_text())
    await until(lambda: not running(first), "the first stdio server to exit with its client")
    async with Client(params) as c:
        assert int(pidfile.read_text()) != first
        read = await call(c, "read_file", path="notes/today.md")
        assert (read["sandbox_id"], read["content"]) == (wrote["sandbox_id"], "remember me\n")
        procs = (await call(c, "processes"))["processes"]
        assert [(p["process_id"], p["state"]) for p in procs] == [(started["process_id"], "running")]
        await call(c, "destroy", sandbox_id=wrote["sandbox_id"])


@pytest.mark.requires("bwrap")
async def test_a_workspace_key_gives_each_project_its_own_default(settings: SandboxSettings, tmp_path: Path) -> None:
    """`corral mcp-config --workspace-key KEY` puts CORRAL_SANDBOX_CLIENT_KEY in a stdio server's
    env: clients of one CORRAL_HOME but different projects get different default sandboxes, and a
    restarted client of a project gets that project's."""
    project = tmp_path / "project"
    project.mkdir()
    config = subprocess.run(
        [CORRAL, "mcp-config", "json", "--servers", "sandbox", "--workspace-key", "proj-a"],
        capture_output=True, text=True, env=serve_env(settings), timeout=60,
    )  # fmt: skip
    assert config.returncode == 0, config.stderr
    entry = json.loads(config.stdout)["mcpServers"]["corral-sandbox"]
    assert entry["env"]["CORRAL_SANDBOX_CLIENT_KEY"] == "proj-a"

    def params(key: str | None) -> StdioServerParameters:
        extra = {"CORRAL_SANDBOX_CLIENT_KEY": key} if key else {}
        return StdioServerParameters(command=CORRAL, args=["serve", "sandbox"], env=serve_env(settings, **extra))

    async with Client(params("proj-a")) as c:
        a = await call(c, "write_file", path="which.txt", content="a")
    async with Client(params("proj-b")) as c:
        b = await call(c, "execute", command="cat which.txt 2>/dev/null || echo none")
        assert b["stdout"] == "none\n" and b["sandbox_id"] != a["sandbox_id"]
    async with Client(params(None)) as c:
        assert (await call(c, "execute", command="ls"))["sandbox_id"] not in (a["sandbox_id"], b["sandbox_id"])
    async with Client(params("proj-a")) as c:
        again = await call(c, "read_file", path="which.txt")
        assert (again["sandbox_id"], again["content"]) == (a["sandbox_id"], "a")
    bad = subprocess.run(
        [CORRAL, "mcp-config", "json", "--workspace-key", " "], capture_output=True, text=True,
        env=serve_env(settings), timeout=60,
    )  # fmt: skip
    assert bad.returncode != 0 and "invalid_argument:" in bad.stderr
