"""Every tool through a real MCP client (in memory), on every backend in the run."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time

import pytest

from .conftest import Harness, call, fail

pytestmark = pytest.mark.anyio


async def test_execute_returns_streams_exit_code_and_duration(harness: Harness) -> None:
    async with harness.client() as c:
        box = await call(c, "provision", label="t")
        assert box["backend"] == harness.kind and box["isolation"] in ("namespaces", "container", "microvm")
        assert box["expires_at"].endswith("Z") and box["workdir"].startswith("/")
        r = await call(c, "execute", sandbox_id=box["sandbox_id"], command="echo out; echo err >&2; exit 3")
        assert (r["exit_code"], r["stdout"], r["stderr"], r["timed_out"]) == (3, "out\n", "err\n", False)
        assert r["stdout_bytes"] == 4 and not r["stdout_truncated"] and r["duration_ms"] >= 0
        r = await call(
            c, "execute", sandbox_id=box["sandbox_id"], command="echo $GREETING; pwd", env={"GREETING": "hi"}
        )
        assert r["stdout"] == f"hi\n{box['workdir']}\n"


async def test_stdin_cwd_and_sandbox_env(harness: Harness) -> None:
    async with harness.client() as c:
        box = await call(c, "provision", env={"FROM_PROVISION": "yes"})
        sid = box["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="mkdir -p sub")
        r = await call(
            c, "execute", sandbox_id=sid, command="cat; echo $FROM_PROVISION; pwd", stdin="piped\n", cwd="sub"
        )
        assert r["stdout"] == f"piped\nyes\n{box['workdir']}/sub\n"


async def test_lazy_default_sandbox(harness: Harness) -> None:
    async with harness.client() as c:
        assert (await call(c, "list_sandboxes"))["sandboxes"] == []  # nothing at connect time
        first = await call(c, "execute", command="echo one > f")
        second = await call(c, "read_file", path="f")
        assert first["sandbox_id"] == second["sandbox_id"] and second["content"] == "one\n"
        listed = (await call(c, "list_sandboxes"))["sandboxes"]
        assert [s["sandbox_id"] for s in listed] == [first["sandbox_id"]] and listed[0]["state"] == "running"


async def test_file_round_trips_text_binary_offsets(harness: Harness) -> None:
    blob = bytes(range(256)) * 3
    async with harness.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        w = await call(
            c,
            "write_file",
            sandbox_id=sid,
            path="dir/deep/bin.dat",
            content=base64.b64encode(blob).decode(),
            encoding="base64",
        )
        assert w["size"] == len(blob) and w["sha256"] == hashlib.sha256(blob).hexdigest()
        r = await call(c, "read_file", sandbox_id=sid, path="dir/deep/bin.dat", encoding="base64")
        assert base64.b64decode(r["content"]) == blob and r["sha256"] == w["sha256"] and r["size"] == len(blob)
        part = await call(
            c, "read_file", sandbox_id=sid, path="dir/deep/bin.dat", encoding="base64", offset=10, limit=5
        )
        assert base64.b64decode(part["content"]) == blob[10:15] and part["truncated"] and part["size"] == len(blob)
        await call(c, "write_file", sandbox_id=sid, path="t.txt", content="héllo\n")
        assert (await call(c, "execute", sandbox_id=sid, command="cat t.txt"))["stdout"] == "héllo\n"
        await fail(
            c, "read_file", "invalid_argument", sandbox_id=sid, path="dir/deep/bin.dat"
        )  # not UTF-8: says use base64


async def test_write_mode_makes_executable(harness: Harness) -> None:
    async with harness.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="run.sh", content="#!/bin/sh\necho ran\n", mode="0755")
        assert (await call(c, "execute", sandbox_id=sid, command="./run.sh"))["stdout"] == "ran\n"


async def test_compare_and_swap_write(harness: Harness) -> None:
    async with harness.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        v1 = await call(c, "write_file", sandbox_id=sid, path="cas.txt", content="v1")
        v2 = await call(c, "write_file", sandbox_id=sid, path="cas.txt", content="v2", if_sha256=v1["sha256"])
        text = await fail(
            c, "write_file", "conflict", sandbox_id=sid, path="cas.txt", content="v3", if_sha256=v1["sha256"]
        )
        assert v2["sha256"] in text
        assert (await call(c, "read_file", sandbox_id=sid, path="cas.txt"))["content"] == "v2"  # nothing lost
        await fail(c, "write_file", "conflict", sandbox_id=sid, path="new.txt", content="x", if_sha256=v1["sha256"])
        await fail(c, "read_file", "not_found", sandbox_id=sid, path="new.txt")


async def test_invalid_base64_writes_nothing(harness: Harness) -> None:
    async with harness.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="keep.bin", content="original")
        await fail(
            c,
            "write_file",
            "invalid_argument",
            sandbox_id=sid,
            path="keep.bin",
            content="!!not*base64",
            encoding="base64",
        )
        assert (await call(c, "read_file", sandbox_id=sid, path="keep.bin"))["content"] == "original"


async def test_list_files_depth_and_max_entries(harness: Harness) -> None:
    async with harness.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="mkdir -p a/b && echo 123 > a/b/c.txt && touch z1 z2 z3")
        top = await call(c, "list_files", sandbox_id=sid)
        assert [(e["name"], e["type"]) for e in top["entries"]] == [
            ("a", "dir"),
            ("z1", "file"),
            ("z2", "file"),
            ("z3", "file"),
        ]
        deep = await call(c, "list_files", sandbox_id=sid, path="a", depth=3)
        assert {"name": "b/c.txt", "type": "file", "size": 4} in deep["entries"] and not deep["truncated"]
        cut = await call(c, "list_files", sandbox_id=sid, max_entries=2)
        assert len(cut["entries"]) == 2 and cut["truncated"]
        await fail(c, "list_files", "not_found", sandbox_id=sid, path="missing")


async def test_unknown_and_destroyed_sandbox_ids(harness: Harness) -> None:
    async with harness.client() as c:
        await fail(c, "execute", "not_found", sandbox_id="sbx_0000000000000000", command="true")
        await fail(c, "destroy", "not_found", sandbox_id="sbx_nope")
        sid = (await call(c, "provision"))["sandbox_id"]
        assert (await call(c, "destroy", sandbox_id=sid))["already_destroyed"] is False
        text = await fail(c, "execute", "sandbox_lost", sandbox_id=sid, command="true")
        assert "provision" in text  # says how to get a fresh one
        assert (await call(c, "destroy", sandbox_id=sid))["already_destroyed"] is True
        assert (await call(c, "list_sandboxes"))["sandboxes"] == []


async def test_output_flood_is_capped_head_and_tail(harness: Harness) -> None:
    async with harness.client() as c:
        cmd = "echo START; head -c 3000000 /dev/zero | tr '\\0' x; echo; echo END"
        r = await call(c, "execute", command=cmd, timeout_s=60)
        assert r["stdout_truncated"] and r["stdout_bytes"] == 3000000 + len("START\n") + 1 + len("END\n")
        assert r["stdout"].startswith("START\n") and r["stdout"].endswith("END\n") and "bytes omitted" in r["stdout"]
        assert len(r["stdout"]) < 2 * harness.settings.sandbox_output_limit


async def test_timeout_reports_timed_out(harness: Harness) -> None:
    async with harness.client() as c:
        start = time.monotonic()
        r = await call(c, "execute", command="echo before; sleep 1000", timeout_s=1)
        assert r["timed_out"] and r["exit_code"] is None and time.monotonic() - start < 10
        assert (await call(c, "execute", command="echo after"))["stdout"] == "after\n"  # the sandbox lives on


async def test_idempotency_key_returns_same_sandbox(harness: Harness) -> None:
    async with harness.client() as c:
        a = await call(c, "provision", idempotency_key="job-1")
        b = await call(c, "provision", idempotency_key="job-1")
        other = await call(c, "provision", idempotency_key="job-2")
        assert a["sandbox_id"] == b["sandbox_id"] != other["sandbox_id"]
        same = await asyncio.gather(*(call(c, "provision", idempotency_key="job-3") for _ in range(3)))
        assert len({r["sandbox_id"] for r in same}) == 1  # racing first calls make one sandbox
        assert harness.service._key_locks == {}  # a long-lived server keeps no lock per key ever used


async def test_bad_arguments_are_invalid(harness: Harness) -> None:
    async with harness.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await fail(c, "execute", "invalid_argument", sandbox_id=sid, command="true", env={"A=B": "x"})
        bad = await c.call_tool("provision", {"resources": {"memory_mb": -5}})
        assert bad.is_error  # schema validation: nothing provisioned
        assert len((await call(c, "list_sandboxes"))["sandboxes"]) == 1


async def test_restart_keeps_sandboxes(harness: Harness) -> None:
    async with harness.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="kept.txt", content="still here")
    again = harness.restart()
    async with again.client() as c:
        assert (await call(c, "read_file", sandbox_id=sid, path="kept.txt"))["content"] == "still here"
        assert (await call(c, "execute", sandbox_id=sid, command="cat kept.txt"))["stdout"] == "still here"
        assert [s["sandbox_id"] for s in (await call(c, "list_sandboxes"))["sandboxes"]] == [sid]
        await call(c, "destroy", sandbox_id=sid)


async def test_idle_and_expired_sandboxes_are_reaped(harness: Harness) -> None:
    async with harness.client() as c:
        idle = (await call(c, "provision", resources={"idle_timeout_s": 1}))["sandbox_id"]
        expiring = (await call(c, "provision", resources={"ttl_s": 1}))["sandbox_id"]
        fresh = (await call(c, "provision"))["sandbox_id"]
        await asyncio.sleep(1.2)
        assert set(await harness.service.sweep()) == {idle, expiring}
        await fail(c, "execute", "sandbox_lost", sandbox_id=idle, command="true")
        await fail(c, "execute", "sandbox_lost", sandbox_id=expiring, command="true")
        assert (await call(c, "execute", sandbox_id=fresh, command="echo ok"))["stdout"] == "ok\n"
        backend = harness.backend
        for sid in (idle, expiring):
            record = harness.service.registry.get(sid)
            assert record is not None and await backend.status(record.ref) == "lost"  # nothing left behind


async def test_long_execute_sends_progress(harness: Harness) -> None:
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with harness.client() as c:
        result = await c.call_tool("execute", {"command": "sleep 1.5; echo done"}, progress_callback=on_progress)
        assert not result.is_error and result.structured_content["stdout"] == "done\n"
        assert len(seen) >= 2 and seen == sorted(seen)


@pytest.mark.requires("bwrap")
async def test_background_reaper_runs_in_the_server(settings) -> None:
    from corral.servers.sandbox.server import build_server

    from .conftest import make_backend

    settings.sandbox_reap_interval_s = 0.2
    server, _ = build_server(settings, make_backend("bubblewrap", settings), reap=True)
    from mcp.client import Client

    async with Client(server) as c:
        sid = (await call(c, "provision", resources={"idle_timeout_s": 1}))["sandbox_id"]
        deadline = time.monotonic() + 10
        while (await call(c, "list_sandboxes"))["sandboxes"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert (await call(c, "list_sandboxes"))["sandboxes"] == []
        await fail(c, "execute", "sandbox_lost", sandbox_id=sid, command="true")
    assert not (settings.sandbox_dir / sid).exists()


async def test_destroy_leaves_nothing_unless_asked(harness: Harness) -> None:
    async with harness.client() as c:
        gone = (await call(c, "provision"))["sandbox_id"]
        kept = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=kept, path="notes.txt", content="keep me")
        await call(c, "destroy", sandbox_id=gone)
        await call(c, "destroy", sandbox_id=kept, keep_workspace=True)
    record = harness.service.registry.get(gone)
    assert record is not None and await harness.backend.status(record.ref) == "lost"
    if harness.kind == "bubblewrap":
        assert not (harness.settings.sandbox_dir / gone).exists()
        assert (harness.settings.sandbox_dir / kept / "workspace" / "notes.txt").read_text() == "keep me"
        assert not (harness.settings.sandbox_dir / kept / "home").exists()


async def test_concurrent_first_calls_share_one_default_sandbox(harness: Harness) -> None:
    async with harness.client() as c:
        results = await asyncio.gather(*(call(c, "execute", command=f"echo {i}") for i in range(4)))
        assert len({r["sandbox_id"] for r in results}) == 1
        assert len((await call(c, "list_sandboxes"))["sandboxes"]) == 1


async def test_read_without_limit_is_bounded(harness: Harness) -> None:
    harness.settings.sandbox_read_limit = 1000
    async with harness.client() as c:
        await call(c, "execute", command="head -c 5000 /dev/zero | tr '\\0' y > big.txt")
        r = await call(c, "read_file", path="big.txt")
        assert (r["length"], r["size"], r["truncated"]) == (1000, 5000, True)
        rest = await call(c, "read_file", path="big.txt", offset=1000, limit=10000)
        assert (rest["length"], rest["truncated"]) == (4000, False)


async def test_each_client_id_gets_its_own_default_sandbox(harness: Harness) -> None:
    async with harness.client() as c:
        mine = await c.call_tool("execute", {"command": "echo a > who"}, meta={"corral/client": "agent-a"})
        theirs = await c.call_tool("execute", {"command": "cat who 2>&1; true"}, meta={"corral/client": "agent-b"})
        again = await c.call_tool("read_file", {"path": "who"}, meta={"corral/client": "agent-a"})
        assert mine.structured_content["sandbox_id"] == again.structured_content["sandbox_id"]
        assert theirs.structured_content["sandbox_id"] != mine.structured_content["sandbox_id"]
        assert "a" not in theirs.structured_content["stdout"].split()  # b cannot see a's file


async def test_every_tool_declares_an_output_schema_its_results_match(harness: Harness) -> None:
    async with harness.client() as c:
        listed = {t.name: t for t in (await c.list_tools()).tools}
        assert all(t.output_schema for t in listed.values()), [n for n, t in listed.items() if not t.output_schema]
        assert set(listed["read_file"].output_schema["properties"]) >= {"sandbox_id", "content", "sha256", "truncated"}
        box = await call(c, "provision")
        sid = box["sandbox_id"]
        results = {
            "provision": box,
            "execute": await call(c, "execute", sandbox_id=sid, command="true"),
            "write_file": await call(c, "write_file", sandbox_id=sid, path="a.txt", content="x"),
            "read_file": await call(c, "read_file", sandbox_id=sid, path="a.txt"),
            "list_files": await call(c, "list_files", sandbox_id=sid),
            "list_sandboxes": await call(c, "list_sandboxes"),
            "destroy": await call(c, "destroy", sandbox_id=sid),
        }
        # execute answers in one of two shapes (a finished command, or a started background
        # process), so its schema is a plain object; its foreground shape is ExecOutcome's.
        from corral.servers.sandbox.backend import ExecOutcome

        schemas = {name: tool.output_schema for name, tool in listed.items()}
        assert schemas["execute"]["type"] == "object"
        schemas["execute"] = ExecOutcome.model_json_schema()
        for name, result in results.items():
            assert set(result) <= set(schemas[name]["properties"]), name
            assert set(result) >= set(schemas[name].get("required", [])), name


async def test_read_only_tools_change_nothing_not_even_a_default_sandbox(harness: Harness) -> None:
    """read_file and list_files say readOnlyHint: without a sandbox they answer not_found
    rather than provision one; the first tool that may change things makes it."""
    from corral import __version__

    async with harness.client() as c:
        assert c.server_info is not None and c.server_info.version == __version__
        hints = {t.name: t.annotations.read_only_hint for t in (await c.list_tools()).tools}
        assert hints["read_file"] and hints["list_files"] and not hints["execute"] and not hints["write_file"]
        text = await fail(c, "read_file", "not_found", path="f")
        assert "no default sandbox yet" in text
        await fail(c, "list_files", "not_found")
        assert (await call(c, "list_sandboxes"))["sandboxes"] == []  # the reads made nothing
        made = await call(c, "write_file", path="f", content="x")
        assert (await call(c, "read_file", path="f"))["sandbox_id"] == made["sandbox_id"]
        assert [e["name"] for e in (await call(c, "list_files"))["entries"]] == ["f"]


@pytest.mark.requires("bwrap")
async def test_list_sandboxes_pages_and_tombstones_are_pruned_after_retention(settings) -> None:
    h = Harness("bubblewrap", settings)
    async with h.client() as c:
        made = [(await call(c, "provision"))["sandbox_id"] for _ in range(5)]
        seen, cursor, pages = [], None, 0
        while True:
            page = await call(c, "list_sandboxes", limit=2, **({"cursor": cursor} if cursor else {}))
            seen += [s["sandbox_id"] for s in page["sandboxes"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == made and pages == 3  # oldest first, each once
        await fail(c, "list_sandboxes", "invalid_argument", cursor="not-a-cursor")
        await call(c, "destroy", sandbox_id=made[0])
        await h.service.sweep()  # within the retention: the id still answers sandbox_lost
        await fail(c, "execute", "sandbox_lost", sandbox_id=made[0], command="true")
        h.service.settings = settings.model_copy(update={"sandbox_tombstone_retention_s": 0})
        await h.service.sweep()  # past it: forgotten
        await fail(c, "execute", "not_found", sandbox_id=made[0], command="true")
        for sid in made[1:]:
            await call(c, "destroy", sandbox_id=sid)


@pytest.mark.requires("bwrap")
async def test_a_sweep_never_stalls_the_event_loop(settings) -> None:
    """Pruning 200,000 old tombstones takes a while; the registry work runs in a thread, so
    the server keeps answering meanwhile (a 1 ms ticker never waits long)."""
    h = Harness("bubblewrap", settings)
    old = time.time() - 30 * 86400
    spec = h.service.settings.spec()
    from corral.servers.sandbox.backend import SandboxRef

    row = SandboxRef(id="x", spec=spec).model_dump_json()
    rows = [
        (f"sbx_old{i:09d}", "bubblewrap", "destroyed", None, None, row, old, old, 1.0, old, None)
        for i in range(200_000)
    ]
    db = h.service.registry._db
    db.execute("BEGIN")
    db.executemany("INSERT INTO sandboxes VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.execute("COMMIT")
    gaps: list[float] = []
    sweeping = asyncio.create_task(h.service.sweep())
    last = time.perf_counter()
    while not sweeping.done():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    await sweeping
    assert h.service.registry.get("sbx_old000000000") is None  # pruned
    assert max(gaps) < 0.1, f"the event loop stalled {max(gaps) * 1000:.0f} ms during a sweep"
