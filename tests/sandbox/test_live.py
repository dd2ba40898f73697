"""Live bubblewrap sandboxes: processes started in one call are there in the next, the init
reaps, a timeout kills only its own command, and the sandbox survives a server restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid

import pytest

from tests.conftest import until

from .conftest import Harness, call, fail
from .procs import host_pids

pytestmark = pytest.mark.anyio

SERVE = "nohup python3 -m http.server {port} --bind 127.0.0.1 >/tmp/http.log 2>&1 &"
FETCH = "python3 -c \"import urllib.request,sys; print(urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=5).status)\""


def _init_pid(h: Harness, sandbox_id: str) -> int:
    return json.loads((h.settings.sandbox_dir / sandbox_id / "init.json").read_text())["init"]["pid"]


async def test_a_server_started_in_one_call_answers_the_next(bw: Harness) -> None:
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        started = await call(
            c,
            "execute",
            sandbox_id=sid,
            command=SERVE.format(port=8080) + " sleep 0.5; echo started",
        )
        assert started["stdout"] == "started\n" and started["duration_ms"] < 3000, started
        r = await call(c, "execute", sandbox_id=sid, command=FETCH.format(port=8080), timeout_s=20)
        assert r["stdout"].strip() == "200", r
        # Another sandbox has its own network: nothing listens there.
        other = (await call(c, "provision"))["sandbox_id"]
        r = await call(
            c,
            "execute",
            sandbox_id=other,
            command=FETCH.format(port=8080),
            timeout_s=20,
        )
        assert r["exit_code"] != 0


async def test_timeout_kills_its_command_and_nothing_else(bw: Harness) -> None:
    marker = f"{700 + uuid.uuid4().int % 99}.25"
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command=f"sleep {marker} >/dev/null 2>&1 &")
        r = await call(
            c,
            "execute",
            sandbox_id=sid,
            command="sleep 600 & sleep 601 & wait",
            timeout_s=1,
        )
        assert r["timed_out"]
        ps = await call(
            c,
            "execute",
            sandbox_id=sid,
            command="cat /proc/[0-9]*/cmdline | tr '\\0' ' '",
        )
        assert f"sleep {marker}" in ps["stdout"] and "sleep 600" not in ps["stdout"] and "sleep 601" not in ps["stdout"]


async def test_orphans_are_reaped(bw: Harness) -> None:
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(
            c,
            "execute",
            sandbox_id=sid,
            command="for i in 1 2 3 4 5; do (sleep 0.1 &); done",
        )
        await asyncio.sleep(0.5)
        r = await call(
            c,
            "execute",
            sandbox_id=sid,
            command="cat /proc/[0-9]*/stat | awk '{print $3}' | sort | uniq -c",
        )
        assert " Z" not in r["stdout"], r["stdout"]


async def test_init_killed_from_outside_is_sandbox_lost_promptly(bw: Harness) -> None:
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="echo warm")
        os.kill(_init_pid(bw, sid), signal.SIGKILL)
        start = time.monotonic()
        await fail(c, "execute", "sandbox_lost", sandbox_id=sid, command="echo hi")
        assert time.monotonic() - start < 5
        await fail(c, "execute", "sandbox_lost", sandbox_id=sid, command="echo hi")  # stays lost


async def test_a_restarted_server_readopts_the_live_sandbox(bw: Harness) -> None:
    marker = f"{800 + uuid.uuid4().int % 99}.5"
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(
            c,
            "execute",
            sandbox_id=sid,
            command=f"echo kept > f; sleep {marker} >/dev/null 2>&1 &",
        )
    again = bw.restart()
    async with again.client() as c:
        r = await call(
            c,
            "execute",
            sandbox_id=sid,
            command="cat f; cat /proc/[0-9]*/cmdline | tr '\\0' ' '",
        )
        assert r["stdout"].startswith("kept\n") and f"sleep {marker}" in r["stdout"], r
        assert r["notice"] is None


async def test_a_restart_after_the_init_died_says_processes_were_stopped(
    bw: Harness,
) -> None:
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(
            c,
            "execute",
            sandbox_id=sid,
            command="echo kept > f; sleep 1000 >/dev/null 2>&1 &",
        )
    os.kill(_init_pid(bw, sid), signal.SIGKILL)  # e.g. the host rebooted while the server was down
    await asyncio.sleep(0.2)
    again = bw.restart()
    async with again.client() as c:
        r = await call(c, "execute", sandbox_id=sid, command="cat f")
        assert r["stdout"] == "kept\n" and "stopped" in r["notice"], r
        assert (await call(c, "execute", sandbox_id=sid, command="echo next"))["notice"] is None


async def test_destroy_leaves_no_process_behind(bw: Harness) -> None:
    marker = f"{600 + uuid.uuid4().int % 99}.75"
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(
            c,
            "execute",
            sandbox_id=sid,
            command=f"for i in 1 2 3; do sleep {marker} >/dev/null 2>&1 & done",
        )
        # The shell returns as soon as it forked them: each may still be on its way to exec sleep.
        await until(lambda: len(host_pids(f"sleep\0{marker}".encode())) == 3, "the three sleeps to run")
        await call(c, "destroy", sandbox_id=sid)
    assert host_pids(f"sleep\0{marker}".encode()) == [] and host_pids(sid.encode()) == []
    assert not (bw.settings.sandbox_dir / sid).exists()
