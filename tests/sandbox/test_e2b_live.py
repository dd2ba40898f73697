"""The e2b backend against the real E2B cloud: runs only when E2B_API_KEY is set."""

from __future__ import annotations

import os

import pytest

from corral.servers.sandbox.config import E2BConfig
from corral.servers.sandbox.server import make_backend
from corral.servers.sandbox.server import build_server

from .conftest import call, fail

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(not os.environ.get("E2B_API_KEY"), reason="E2B_API_KEY not set")]


async def test_live_e2b_round_trip(settings) -> None:
    from mcp.client import Client

    backend = make_backend(E2BConfig(api_key=os.environ["E2B_API_KEY"]))
    server, _ = build_server(settings, backend, reap=False)
    async with Client(server) as c:
        sid = (await call(c, "provision", resources={"ttl_s": 300}))["sandbox_id"]
        try:
            r = await call(c, "execute", sandbox_id=sid, command="echo hi; exit 3")
            assert (r["exit_code"], r["stdout"]) == (3, "hi\n")
            w = await call(c, "write_file", sandbox_id=sid, path="a/b.txt", content="x")
            assert (await call(c, "read_file", sandbox_id=sid, path="a/b.txt"))["sha256"] == w["sha256"]
            assert (await call(c, "execute", sandbox_id=sid, command="sleep 30", timeout_s=2))["timed_out"]
        finally:
            await call(c, "destroy", sandbox_id=sid)
        await fail(c, "execute", "sandbox_lost", sandbox_id=sid, command="true")
