"""The caller's default sandbox is bound to a durable key in the registry: it survives a
restart of the server (and of the client), and a bound sandbox that is gone says so once."""

from __future__ import annotations

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
