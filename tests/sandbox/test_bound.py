"""The caller's default sandbox is bound to a durable key in the registry: it survives a
restart of the server (and of the client), and a bound sandbox that is gone says so once."""

from __future__ import annotations

import pytest

from .conftest import Harness, call, fail

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
