"""The e2b backend against the real E2B cloud: runs only when E2B_API_KEY is set.

It runs the same conformance suite as bubblewrap, Docker and the fake (every test of
`test_tools.py` that takes a `harness`), plus the issue-16 behaviours that can be seen
from inside a real VM. Each test destroys what it provisioned.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from corral.servers.sandbox.config import E2BConfig, SandboxSettings
from corral.servers.sandbox.server import build_server, make_backend

from . import test_tools
from .conftest import Harness, call, fail

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(not os.environ.get("E2B_API_KEY"), reason="E2B_API_KEY not set")]

CONFORMANCE: list[Callable[[Harness], Awaitable[None]]] = [
    fn
    for name, fn in vars(test_tools).items()
    if name.startswith("test_") and list(inspect.signature(fn).parameters) == ["harness"]
]


class LiveHarness(Harness):
    """A `Harness` over the real service (`E2B_MAX_TTL_S` says the key's tier; default Hobby)."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.kind = "e2b"
        self.settings = settings
        config = E2BConfig(api_key=os.environ["E2B_API_KEY"], max_ttl_s=int(os.environ.get("E2B_MAX_TTL_S", 3600)))
        self.backend = make_backend(config)
        self.server, self.service = build_server(settings, self.backend, reap=False)

    def restart(self) -> LiveHarness:
        return LiveHarness(self.settings)


@pytest.fixture
def live(settings: SandboxSettings) -> Iterator[LiveHarness]:
    h = LiveHarness(settings)
    yield h
    import asyncio

    async def destroy_all() -> None:
        for record in h.service.registry.running("e2b"):
            await h.backend.destroy(record.ref)

    asyncio.run(destroy_all())


@pytest.mark.parametrize("case", CONFORMANCE, ids=[fn.__name__ for fn in CONFORMANCE])
async def test_live_conformance(live: LiveHarness, case: Callable[[Any], Awaitable[None]]) -> None:
    await case(live)


async def test_live_timeout_kills_children_and_leaves_no_temp_file(live: LiveHarness) -> None:
    async with live.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        cmd = "cat > got; sleep 300 & echo $! > child; sleep 300"
        assert (await call(c, "execute", sandbox_id=sid, command=cmd, stdin="in\n", timeout_s=2))["timed_out"]
        state = "$(cut -d' ' -f3 /proc/$(cat child)/stat 2>/dev/null)"  # gone, or a zombie: dead
        check = f'case "{state}" in ""|Z) echo dead;; *) echo alive;; esac; ls -A /tmp/ | grep -c corral; cat got'
        # Left in /tmp: only the checking command's own pid file.
        assert (await call(c, "execute", sandbox_id=sid, command=check))["stdout"] == "dead\n1\nin\n"


async def test_live_error_kinds_and_empty_workdir(live: LiveHarness) -> None:
    async with live.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]  # the default TTL, clamped to the tier
        assert (await call(c, "list_files", sandbox_id=sid))["entries"] == []
        await call(c, "execute", sandbox_id=sid, command="mkdir d && echo x > f")
        await fail(c, "read_file", "invalid_argument", sandbox_id=sid, path="d")
        await fail(c, "list_files", "invalid_argument", sandbox_id=sid, path="f")
        await fail(c, "execute", "invalid_argument", sandbox_id=sid, command="pwd", cwd="nowhere")
        await fail(c, "read_file", "not_found", sandbox_id=sid, path="nothing")


async def test_live_bad_key_says_so(settings: SandboxSettings) -> None:
    from mcp.client import Client

    server, _ = build_server(settings, make_backend(E2BConfig(api_key="e2b_" + "0" * 40)), reap=False)
    async with Client(server) as c:
        assert "E2B_API_KEY is missing or invalid" in await fail(c, "provision", "unavailable")
