"""The harness's MCP plumbing against the real sandbox server (in memory): results are read
from structured content and error kinds, never sniffed from text; the router refuses a tool
name two toolsets offer."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from mcp.server.mcpserver import MCPServer

from corral.errors import InvalidArgument
from corral.harness.events import SANDBOX_LOST, SANDBOX_PROVISIONED
from corral.harness.mcp import MCPTools
from corral.harness.tools import Prefixed, Router, SandboxLifecycle
from corral.servers.sandbox.config import SandboxSettings
from corral.servers.sandbox.server import build_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def sandbox_server(tmp_path: Path, needs_bwrap: None) -> MCPServer:
    root = Path("/tmp/corral-test-sandboxes") / tmp_path.name
    root.parent.mkdir(mode=0o711, exist_ok=True)
    settings = SandboxSettings(home=tmp_path / "home", sandbox_dir=root, sandbox_reap_interval_s=3600)
    server, _service = build_server(settings, reap=False)
    return server


async def test_lifecycle_events_come_from_structured_results_and_error_kinds(sandbox_server: MCPServer) -> None:
    async with anyio.create_task_group() as tg:
        conn = MCPTools("sandbox", sandbox_server, task_group=tg)
        tools = SandboxLifecycle(Prefixed(conn, "sandbox"))
        first = await tools.call("sandbox__execute", {"command": "echo hi"}, "tu1")  # lazy default sandbox
        assert not first.is_error and first.structured and first.structured["stdout"] == "hi\n"
        (made,) = first.events
        sid = made.data["sandbox_id"]
        assert made.type == SANDBOX_PROVISIONED and made.data["via"] == "sandbox__execute"
        (explicit,) = (await tools.call("sandbox__provision", {}, "tu1b")).events
        assert explicit.data["backend"] == "bubblewrap" and explicit.data["isolation"] == "namespaces"
        # an error that merely *mentions* sandbox_lost is not a loss: the kind decides
        other = await tools.call("sandbox__execute", {"sandbox_id": "sandbox_lost", "command": "true"}, "tu2")
        assert other.is_error and other.kind == "not_found" and other.events == []
        assert not (await tools.call("sandbox__destroy", {"sandbox_id": sid}, "tu3")).is_error
        lost = await tools.call("sandbox__execute", {"sandbox_id": sid, "command": "true"}, "tu4")
        assert lost.kind == "sandbox_lost" and [e.type for e in lost.events] == [SANDBOX_LOST]
        assert lost.events[0].data["sandbox_id"] == sid
        conn.drop()


async def test_router_refuses_a_tool_name_two_toolsets_offer(sandbox_server: MCPServer) -> None:
    async with anyio.create_task_group() as tg:
        a, b = MCPTools("a", sandbox_server, task_group=tg), MCPTools("b", sandbox_server, task_group=tg)
        with pytest.raises(InvalidArgument, match="two toolsets offer a tool named"):
            await Router([a, b]).tools()
        names = [t.name for t in await Router([Prefixed(a, "a"), Prefixed(b, "b")]).tools()]
        assert "a__execute" in names and "b__execute" in names
        a.drop()
        b.drop()
