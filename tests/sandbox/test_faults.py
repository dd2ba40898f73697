"""A sandbox killed from outside mid-command: that call ends promptly with `sandbox_lost`,
the server keeps serving every other sandbox, and the lost one can be replaced."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
from mcp.client import Client

from tests.conftest import until

from .conftest import Harness, call, fail
from .fake_e2b import FakeCloud
from .procs import bwrap_pids

pytestmark = pytest.mark.anyio


async def _kill_mid_command(h: Harness, c: Client, kill: Callable[[str], None]) -> str:
    lost = (await call(c, "provision"))["sandbox_id"]
    other = (await call(c, "provision"))["sandbox_id"]
    running = asyncio.create_task(
        c.call_tool("execute", {"sandbox_id": lost, "command": "touch started; sleep 30; echo never"})
    )

    async def started() -> bool:
        return not (await c.call_tool("read_file", {"sandbox_id": lost, "path": "started"})).is_error

    await until(started, "the command to start")
    start = time.monotonic()
    await asyncio.to_thread(kill, lost)
    result = await asyncio.wait_for(running, 15)
    assert result.is_error and "sandbox_lost:" in result.content[0].text and "provision" in result.content[0].text
    assert time.monotonic() - start < 10, "the call must end promptly"
    await fail(c, "execute", "sandbox_lost", sandbox_id=lost, command="true")  # stays lost
    assert (await call(c, "execute", sandbox_id=other, command="echo served"))["stdout"] == "served\n"
    fresh = await call(c, "provision")  # the cure: a fresh one from the same recipe
    assert (await call(c, "execute", sandbox_id=fresh["sandbox_id"], command="echo new"))["stdout"] == "new\n"
    assert lost in await h.service.sweep()  # the reaper clears what is left of it
    for sid in (other, fresh["sandbox_id"]):
        await call(c, "destroy", sandbox_id=sid)
    return lost


@pytest.mark.requires("bwrap")
async def test_bwrap_process_killed(settings) -> None:
    h = Harness("bubblewrap", settings)

    def kill(sandbox_id: str) -> None:
        pids = bwrap_pids(sandbox_id, parent=os.getpid())
        assert pids, "no bwrap process found for the sandbox"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    async with h.client() as c:
        await _kill_mid_command(h, c, kill)


@pytest.mark.requires("bwrap")
async def test_bwrap_workspace_deleted(settings) -> None:
    h = Harness("bubblewrap", settings)
    async with h.client() as c:
        # The workspace, not the whole dir: a live sandbox's system layer is mounted in it, and a
        # delete from outside would walk the whole of /usr through it (into the layer, never the host).
        await _kill_mid_command(h, c, lambda sid: shutil.rmtree(settings.sandbox_dir / sid / "workspace"))


async def test_docker_container_killed(settings, docker_image: str) -> None:
    h = Harness("docker", settings)

    def kill(sandbox_id: str) -> None:
        subprocess.run(["docker", "kill", f"corral-{sandbox_id}"], check=True, capture_output=True, timeout=30)

    async with h.client() as c:
        lost = await _kill_mid_command(h, c, kill)
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=corral.sandbox={lost}"], capture_output=True, text=True
    )
    assert left.stdout.strip() == ""  # reaped: no container left behind


async def test_e2b_vm_killed(settings) -> None:
    h = Harness("e2b", settings)

    def kill(sandbox_id: str) -> None:
        record = h.service.registry.get(sandbox_id)
        FakeCloud.kill_from_outside(record.ref.data["e2b_id"])

    async with h.client() as c:
        await _kill_mid_command(h, c, kill)
