"""A fork says which workspace its child gets (issue 11): the latest default-sandbox
checkpoint below the fork position, or that there is none and the child starts with a fresh
sandbox. Through `corral sessions fork` (a subprocess) and the session server's `fork` tool
(a real MCP client), over a log a real harness run wrote."""

from __future__ import annotations

import pytest
from mcp.client import Client

from corral.servers.session.server import build_server
from tests.harness.conftest import corral
from tests.harness.test_checkpoints import STEPS, checkpoint_events, open_db, run

pytestmark = pytest.mark.anyio


async def test_fork_names_the_checkpoint_below_the_position_or_a_fresh_sandbox(cp_env: dict[str, str]) -> None:
    sid, _ = await run(cp_env, STEPS, "CP-TASK go")
    first, other, third = checkpoint_events(cp_env, sid)
    # at the position of the first checkpoint: it is not shared with the child
    before = corral(["sessions", "fork", sid, "--at", str(first.position)], cp_env)
    assert before.returncode == 0, before.stderr
    assert before.stdout.strip().startswith("ses_") and len(before.stdout.split()) == 1  # stdout: the child's id only
    assert f"no checkpoint before position {first.position}: the child starts with a fresh sandbox" in before.stderr

    just_after = corral(["sessions", "fork", sid, "--at", str(first.position + 1)], cp_env)
    assert first.data["checkpoint_id"] in just_after.stderr and "sbx_default" in just_after.stderr

    # past the other sandbox's checkpoint (default: false): the child's default is still the first one's
    past_other = corral(["sessions", "fork", sid, "--at", str(other.position + 1)], cp_env)
    assert first.data["checkpoint_id"] in past_other.stderr and other.data["checkpoint_id"] not in past_other.stderr

    store = open_db(cp_env)
    try:
        async with Client(build_server(store)) as client:
            late = (await client.call_tool("fork", {"session_id": sid, "at": third.position + 1})).structured_content
            early = (await client.call_tool("fork", {"session_id": sid, "at": 2})).structured_content
        assert late["workspace"] == {
            "checkpoint_id": third.data["checkpoint_id"],
            "sandbox_id": "sbx_default",
            "position": third.position,
        }
        assert third.data["checkpoint_id"] in late["note"]
        assert store.get(late["session_id"]).forked_at == third.position + 1
        assert early["workspace"] is None and "fresh sandbox" in early["note"]
    finally:
        store.close()
