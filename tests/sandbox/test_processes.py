"""Background processes as tools: execute(background=true), processes, process_output, kill_process."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from mcp.client import Client

from .conftest import Harness, call, fail
from .procs import host_pids

pytestmark = pytest.mark.anyio


async def _until(c: Client, process_id: str, check, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        out = await call(c, "process_output", process_id=process_id)
        if check(out) or time.monotonic() > deadline:
            return out
        await asyncio.sleep(0.05)


async def test_a_background_process_runs_past_its_call_and_reports(bw: Harness) -> None:
    async with bw.client() as c:
        start = time.monotonic()
        p = await call(
            c,
            "execute",
            command="echo first; sleep 1; echo second; echo oops >&2; exit 3",
            background=True,
        )
        assert time.monotonic() - start < 2 and p["state"] == "running" and p["process_id"].startswith("proc_")
        first = await _until(c, p["process_id"], lambda o: o["stdout"])
        assert first["stdout"] == "first\n" and first["running"] and first["exit_code"] is None
        done = await _until(c, p["process_id"], lambda o: not o["running"])
        assert done["exit_code"] == 3 and done["stdout"] == "first\nsecond\n" and done["stderr"] == "oops\n"
        assert done["stdout_bytes"] == 13 and done["stderr_bytes"] == 5
        # Paging: from next_offset there is nothing new; an offset past the end is an error.
        rest = await call(c, "process_output", process_id=p["process_id"], offset=6, stderr_offset=5)
        assert rest["stdout"] == "second\n" and rest["stderr"] == "" and rest["next_offset"] == 13
        text = await fail(
            c,
            "process_output",
            "invalid_argument",
            process_id=p["process_id"],
            offset=14,
        )
        assert "past the end" in text and "13" in text
        [listed] = (await call(c, "processes"))["processes"]
        assert listed["process_id"] == p["process_id"] and listed["state"] == "exited" and listed["exit_code"] == 3
        assert listed["command"].startswith("echo first") and listed["started_at"] and listed["ended_at"]


async def test_a_background_server_is_reachable_and_killable(bw: Harness) -> None:
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        p = await call(
            c,
            "execute",
            sandbox_id=sid,
            command="exec python3 -u -m http.server 8081 --bind 127.0.0.1",
            background=True,
        )
        await _until(c, p["process_id"], lambda o: "Serving" in o["stdout"])
        fetch = "python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8081/').status)\""
        assert (await call(c, "execute", sandbox_id=sid, command=fetch, timeout_s=20))["stdout"] == "200\n"
        busy = await call(c, "execute", sandbox_id=sid, command="while :; do :; done", background=True)
        await asyncio.sleep(1.0)
        listed = {x["process_id"]: x for x in (await call(c, "processes", sandbox_id=sid))["processes"]}
        assert listed[busy["process_id"]]["state"] == "running" and listed[busy["process_id"]]["cpu_s"] > 0.05
        killed = await call(c, "kill_process", process_id=p["process_id"])
        assert killed["state"] == "killed" and killed["signal"] == "TERM" and killed["exit_code"] == 128 + 15
        assert (await call(c, "execute", sandbox_id=sid, command=fetch, timeout_s=20))["exit_code"] != 0
        text = await fail(c, "kill_process", "conflict", process_id=p["process_id"])  # already ended
        assert "already ended" in text
        assert (await call(c, "kill_process", process_id=busy["process_id"], signal="KILL"))["signal"] == "KILL"


async def test_unknown_and_foreign_process_ids_are_not_found(bw: Harness, settings, tmp_path: Path) -> None:
    async with bw.client() as c:
        mine = await call(c, "execute", command="sleep 30", background=True)
        sid = mine["sandbox_id"]
        await fail(c, "process_output", "not_found", process_id="nope")
        await fail(c, "kill_process", "not_found", process_id="../../etc/passwd")
        await fail(
            c, "process_output", "not_found", process_id=f"proc_{sid[4:]}_00000000"
        )  # its sandbox, no such process
        await fail(
            c,
            "process_output",
            "not_found",
            process_id="proc_0123456789abcdef_00000000",
        )  # no such sandbox
    # Another server (its own registry) does not know this one's processes.
    other = Harness("bubblewrap", settings.model_copy(update={"home": tmp_path / "other-home"}))
    async with other.client() as c:
        await fail(c, "process_output", "not_found", process_id=mine["process_id"])
        await fail(c, "kill_process", "not_found", process_id=mine["process_id"])


async def test_output_is_bounded_on_disk_with_exact_totals(bw: Harness) -> None:
    async with bw.client() as c:
        p = await call(
            c,
            "execute",
            command="head -c 5000000 /dev/zero | tr '\\0' x; echo; echo end",
            background=True,
        )
        done = await _until(c, p["process_id"], lambda o: not o["running"])
        assert done["stdout_bytes"] == 5000005 and done["exit_code"] == 0
        assert done["dropped_bytes"] > 0 and done["offset"] >= 5000005 - (2 << 20)  # the head was let go
        tail = await call(
            c,
            "process_output",
            process_id=p["process_id"],
            offset=done["stdout_bytes"] - 4,
        )
        assert tail["stdout"] == "end\n"
        stdout = bw.settings.sandbox_dir / p["sandbox_id"] / "procs" / p["process_id"] / "stdout"
        assert stdout.stat().st_size == 5000005 and stdout.stat().st_blocks * 512 <= 2 << 20


async def test_two_hundred_background_processes(bw: Harness) -> None:
    bw = Harness("bubblewrap", bw.settings.model_copy(update={"sandbox_max_processes": 256}))
    marker = f"{500 + uuid.uuid4().int % 99}.5"
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        other = (await call(c, "provision"))["sandbox_id"]
        ids = [
            (
                await call(
                    c,
                    "execute",
                    sandbox_id=sid,
                    command=f"exec sleep {marker}",
                    background=True,
                )
            )["process_id"]
            for _ in range(200)
        ]
        listed = (await call(c, "processes", sandbox_id=sid))["processes"]
        assert (
            len(listed) == 200
            and {x["state"] for x in listed} == {"running"}
            and {x["process_id"] for x in listed} == set(ids)
        )
        assert (await call(c, "execute", sandbox_id=other, command="echo fine"))["stdout"] == "fine\n"
        assert len(host_pids(f"sleep\0{marker}".encode())) == 200
        await call(c, "destroy", sandbox_id=sid)  # nothing survives: no process, no mount, no layer
        await call(c, "destroy", sandbox_id=other)
    assert host_pids(f"sleep\0{marker}".encode()) == [] and host_pids(sid.encode()) == []
    assert sid not in Path("/proc/self/mountinfo").read_text() and not (bw.settings.sandbox_dir / sid).exists()


async def test_a_background_fork_bomb_and_memory_hog_are_contained(bw: Harness) -> None:
    async with bw.client() as c:
        sid = (await call(c, "provision", resources={"memory_mb": 64}))["sandbox_id"]
        other = (await call(c, "provision"))["sandbox_id"]
        bomb = await call(
            c,
            "execute",
            sandbox_id=sid,
            command="b() { b | b & }; b; sleep 100",
            background=True,
        )
        hog = await call(
            c,
            "execute",
            sandbox_id=sid,
            command="head -c 400000000 /dev/zero | tail | wc -c",
            background=True,
        )
        await asyncio.sleep(2)
        assert (await call(c, "execute", sandbox_id=other, command="echo fine"))["stdout"] == "fine\n"
        count = await call(
            c,
            "execute",
            sandbox_id=sid,
            command="ls /proc | grep -cE '^[0-9]+$'",
            timeout_s=20,
        )
        if count["exit_code"] == 0:  # it may not even get a process: the cap is full
            assert int(count["stdout"]) <= bw.settings.sandbox_max_processes + 4
        done = await _until(c, hog["process_id"], lambda o: not o["running"], timeout_s=30)
        assert done["stdout"].strip() != "400000000", done  # memory cap held
        await call(c, "kill_process", process_id=bomb["process_id"], signal="KILL")
        await asyncio.sleep(0.5)
        left = await call(c, "execute", sandbox_id=sid, command="ls /proc | grep -cE '^[0-9]+$'")
        assert int(left["stdout"]) <= 8, left  # the bomb's whole group went


async def test_background_processes_survive_a_server_restart(bw: Harness) -> None:
    async with bw.client() as c:
        p = await call(c, "execute", command="echo up; exec sleep 300", background=True)
        await _until(c, p["process_id"], lambda o: o["stdout"])
    again = bw.restart()
    async with again.client() as c:
        [listed] = (await call(c, "processes", sandbox_id=p["sandbox_id"]))["processes"]
        assert listed["state"] == "running"
        assert (await call(c, "process_output", process_id=p["process_id"]))["stdout"] == "up\n"
        killed = await call(c, "kill_process", process_id=p["process_id"])
        assert killed["state"] != "running", killed


async def test_a_running_background_process_keeps_its_sandbox_from_idling_out(
    bw: Harness,
) -> None:
    async with bw.client() as c:
        sid = (await call(c, "provision", resources={"idle_timeout_s": 1}))["sandbox_id"]
        p = await call(c, "execute", sandbox_id=sid, command="exec sleep 60", background=True)
        await asyncio.sleep(1.5)
        assert sid not in await bw.service.sweep()
        await call(c, "kill_process", process_id=p["process_id"])
        await asyncio.sleep(1.2)
        assert sid in await bw.service.sweep()


async def test_background_is_refused_where_a_backend_has_none(settings) -> None:
    h = Harness("e2b", settings)
    async with h.client() as c:
        text = await fail(c, "execute", "invalid_argument", command="sleep 1", background=True)
        assert "foreground" in text
        assert (await call(c, "processes"))["processes"] == []


async def test_ten_background_memory_hogs_cannot_sum_past_the_sandbox_cap(
    bw: Harness,
) -> None:
    if bw.backend.limits_scope != "sandbox":
        pytest.skip("no per-sandbox cgroup here (needs root and cgroup v1 controllers)")
    hog = "python3 -c \"import time; x = bytearray(40 << 20); x[::4096] = b'x' * len(x[::4096]); print('held', flush=True); time.sleep(60)\""
    async with bw.client() as c:
        box = await call(c, "provision", resources={"memory_mb": 100})
        assert box["limits"] == "sandbox"
        ids = [
            (
                await call(
                    c,
                    "execute",
                    sandbox_id=box["sandbox_id"],
                    command=hog,
                    background=True,
                )
            )["process_id"]
            for _ in range(10)
        ]
        await asyncio.sleep(4)
        listed = (await call(c, "processes", sandbox_id=box["sandbox_id"]))["processes"]
        alive = [p for p in listed if p["state"] == "running"]
        assert len(alive) * 40 <= 100, listed  # ten times 40 MiB: only what fits in 100 MiB lives
        assert any(p["signal"] == "KILL" for p in listed)  # the others met the sandbox's OOM killer
        assert bw.backend.cgroups.memory_peak(box["sandbox_id"]) <= 100 << 20
        assert (await call(c, "execute", sandbox_id=box["sandbox_id"], command="echo alive"))["stdout"] == "alive\n"
        assert len(ids) == 10


async def test_background_processes_conform_on_every_isolating_backend(
    iso: Harness,
) -> None:
    """The same contract on bubblewrap and docker: start, read by offsets, list, kill, bad ids."""
    async with iso.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        p = await call(
            c,
            "execute",
            sandbox_id=sid,
            command="echo first; sleep 1; echo second; echo oops >&2; exit 3",
            background=True,
        )
        assert p["state"] == "running" and p["sandbox_id"] == sid
        done = await _until(c, p["process_id"], lambda o: not o["running"], timeout_s=20)
        assert done["exit_code"] == 3 and done["stdout"] == "first\nsecond\n" and done["stderr"] == "oops\n", done
        assert (done["stdout_bytes"], done["stderr_bytes"]) == (13, 5)
        rest = await call(
            c,
            "process_output",
            process_id=p["process_id"],
            offset=6,
            stderr_offset=5,
            limit=100,
        )
        assert rest["stdout"] == "second\n" and rest["stderr"] == "" and rest["next_offset"] == 13
        await fail(
            c,
            "process_output",
            "invalid_argument",
            process_id=p["process_id"],
            offset=14,
        )
        await fail(c, "kill_process", "conflict", process_id=p["process_id"])
        sleeper = await call(c, "execute", sandbox_id=sid, command="sleep 60", background=True)
        killed = await call(c, "kill_process", process_id=sleeper["process_id"])
        assert killed["state"] == "killed" and killed["signal"] == "TERM", killed
        listed = {x["process_id"]: x for x in (await call(c, "processes", sandbox_id=sid))["processes"]}
        assert listed[p["process_id"]]["exit_code"] == 3 and listed[p["process_id"]]["ended_at"]
        assert listed[sleeper["process_id"]]["state"] == "killed" and listed[p["process_id"]]["command"].startswith(
            "echo first"
        )
        await fail(c, "process_output", "not_found", process_id=f"proc_{sid[4:]}_00000000")
        await fail(c, "kill_process", "not_found", process_id="nope")
