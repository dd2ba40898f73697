"""Live-sandbox numbers (issue 10 "Speed"), each beside its baseline, measured in one run.

    python3 benchmarks/hands.py [--n 100] [--boxes 50]

- MCP `execute true` in a live sandbox (stdio client -> `corral serve sandbox`) vs a bare
  `bwrap ... true` spawn of the same sandbox's recipe from Python (target: at or below);
- provision + first execute p50/p99 (in-process service: the init starts on first use), with
  the default sandbox's writable system layer (as root) beside a read-only system
  (`--only-layer` measures just these two);
- background start -> first output line seen through `process_output`, p50;
- host RSS of an idle live sandbox (outer bwrap + init + its sleep);
- N live sandboxes each running a background HTTP server: how many answer from inside;
- a template sandbox (the Debian minbase tree at /tmp/fresh/rootfs-template if present, else
  the busybox test image), with its writable layer when run as root: provision + first
  execute p50, beside the host-userland one (`--only-template` measures just these two).

JSON goes to benchmarks/results/hands.json. Noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mcp.client import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Table, percentile
from benchmarks.sandbox import cpu_ms, server_cpu_ms, service_for, stdio_params
from corral.servers.sandbox.backend import SandboxRef
from corral.servers.sandbox.bubblewrap import SHELL, BubblewrapBackend, _limits
from corral.servers.sandbox.config import SandboxSettings

CPU: dict[str, float] = {}
LAYER_CPU: list[list[float]] = [[], []]  # CPU ms of provision + first execute: with the layer, without


def bare_bwrap_argv(backend: BubblewrapBackend, ref: SandboxRef, command: str = "true") -> list[str]:
    """A one-shot `bwrap` with the sandbox's own recipe (what every execute cost before live sandboxes)."""
    argv = backend._init_argv(ref)
    if backend.cgroups is not None:  # a bare spawn: no cgroup to join
        argv = argv[len(backend.cgroups.enter_argv(ref.id, init=True)) :]
    argv = argv[: argv.index("--info-fd")] + ["--die-with-parent"]
    argv.remove("--as-pid-1")
    return [
        *argv,
        "--",
        backend.prlimit,
        *_limits(ref.spec, 60),
        "--",
        SHELL,
        "-c",
        command,
    ]


async def spawn(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, env=env)
    assert await proc.wait() == 0
    return (time.perf_counter() - start) * 1000


async def timed_call(c: Client, tool: str, args: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    result = await c.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    return (time.perf_counter() - start) * 1000, result.structured_content


async def live_vs_bare(settings: SandboxSettings, env: dict[str, str], n: int) -> tuple[list[float], list[float]]:
    async with Client(stdio_params(env)) as c:
        sid = (await c.call_tool("provision", {})).structured_content["sandbox_id"]
        await c.call_tool("execute", {"sandbox_id": sid, "command": "true"})  # the init starts here
        service = service_for(settings)
        ref = service.registry.get(sid).ref
        bare = bare_bwrap_argv(service.backend, ref)
        live, raw = [], []
        for _ in range(n):  # interleaved: load from others hits both alike
            live.append((await timed_call(c, "execute", {"sandbox_id": sid, "command": "true"}))[0])
            raw.append(await spawn(bare, {}))
        # CPU per call, which the load of others does not inflate: the server (+ what it ran) vs a bare spawn.
        start = server_cpu_ms()
        for _ in range(n):
            await c.call_tool("execute", {"sandbox_id": sid, "command": "true"})
        CPU["live"] = (server_cpu_ms() - start) / n
        start = cpu_ms()
        for _ in range(n):
            await spawn(bare, {})
        CPU["bare"] = (cpu_ms() - start) / n
        await c.call_tool("destroy", {"sandbox_id": sid})
    return live, raw


DEBIAN_TREE = Path("/tmp/fresh/rootfs-template")


def add_template(settings: SandboxSettings) -> str:
    """Register the benchmark's template (a real Debian userland if one is here); its description."""
    from corral.servers.sandbox.templates import TemplateStore

    store = TemplateStore(settings.templates_dir())
    owner = settings.sandbox_run_as_uid if os.geteuid() == 0 else None
    if DEBIAN_TREE.is_dir():
        store.add("bench", rootfs=DEBIAN_TREE, owner=owner)
        return "Debian minbase"
    store.add("bench", docker_image="corral-sandbox-test:latest", owner=owner)
    return "busybox image (no Debian tree here)"


async def first_execute(settings: SandboxSettings, n: int, template: str | None = None) -> list[float]:
    service = service_for(settings)
    times = []
    for i in range(n + 5):
        start = time.perf_counter()
        box = await service.provision(template=template)
        result = await service.execute(service.registry.get(box.sandbox_id), "true")
        if i >= 5:  # warm-up
            times.append((time.perf_counter() - start) * 1000)
        assert result.exit_code == 0, result
        await service.destroy(box.sandbox_id)
    return times


async def first_execute_layer_vs_plain(settings: SandboxSettings, n: int) -> tuple[list[float], list[float]]:
    """Provision + first execute with the writable system layer and with a read-only system,
    interleaved (one of each in turn), so the machine's load weighs on both alike."""
    plain_dir = settings.workspaces_dir().with_name(settings.workspaces_dir().name + "-ro")
    home = settings.home.with_name(settings.home.name + "-ro")  # its own registry too
    plain = settings.model_copy(update={"sandbox_system_layer": False, "sandbox_dir": plain_dir, "home": home})
    services = [service_for(settings), service_for(plain)]
    times: list[list[float]] = [[], []]
    try:
        for i in range(2 * (n + 5)):
            service = services[i % 2]
            cpu, start = cpu_ms(), time.perf_counter()
            box = await service.provision()
            result = await service.execute(service.registry.get(box.sandbox_id), "true")
            if i >= 10:  # warm-up
                times[i % 2].append((time.perf_counter() - start) * 1000)
                LAYER_CPU[i % 2].append(cpu_ms() - cpu)
            assert result.exit_code == 0, result
            await service.destroy(box.sandbox_id)
    finally:
        shutil.rmtree(plain_dir, ignore_errors=True)
    return times[0], times[1]


async def background_first_line(env: dict[str, str], n: int) -> list[float]:
    async with Client(stdio_params(env)) as c:
        sid = (await c.call_tool("provision", {})).structured_content["sandbox_id"]
        await c.call_tool("execute", {"sandbox_id": sid, "command": "true"})
        times = []
        for _ in range(n):
            start = time.perf_counter()
            _, started = await timed_call(
                c,
                "execute",
                {
                    "sandbox_id": sid,
                    "command": "echo ready; exec sleep 30",
                    "background": True,
                },
            )
            while not (await timed_call(c, "process_output", {"process_id": started["process_id"]}))[1]["stdout"]:
                pass
            times.append((time.perf_counter() - start) * 1000)
            await c.call_tool("kill_process", {"process_id": started["process_id"], "signal": "KILL"})
        await c.call_tool("destroy", {"sandbox_id": sid})
    return times


def rss_kb(pid: int, private: bool = False) -> int:
    """Resident KiB; `private`: only the pages no other process shares (what one more sandbox adds)."""
    if not private:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))


def tree(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for k in kids for p in tree(int(k)))]


async def idle_rss(settings: SandboxSettings) -> tuple[float, float, int]:
    """RSS and private memory (MiB) of the host processes one idle live sandbox keeps, and how many."""
    service = service_for(settings)
    box = await service.provision()
    await service.execute(service.registry.get(box.sandbox_id), "true")
    init = service.backend._inits[box.sandbox_id]
    pids = tree(init.outer.pid)
    total = sum(rss_kb(p) for p in pids) / 1024
    private = sum(rss_kb(p, private=True) for p in pids) / 1024
    await service.destroy(box.sandbox_id)
    return total, private, len(pids)


async def many_servers(env: dict[str, str], count: int) -> dict[str, float]:
    fetch = "python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/', timeout=20).status)\""
    async with Client(stdio_params(env)) as c:
        start = time.perf_counter()
        ids = [(await c.call_tool("provision", {})).structured_content["sandbox_id"] for _ in range(count)]
        for sid in ids:
            r = await c.call_tool(
                "execute",
                {
                    "sandbox_id": sid,
                    "command": "exec python3 -m http.server 8000 --bind 127.0.0.1",
                    "background": True,
                },
            )
            assert not r.is_error, r.content[0].text
        started = time.perf_counter() - start

        async def answers(sid: str) -> bool:
            for _ in range(100):  # the servers may still be importing
                r = await c.call_tool("execute", {"sandbox_id": sid, "command": fetch, "timeout_s": 60})
                if not r.is_error and r.structured_content["stdout"] == "200\n":
                    return True
                await asyncio.sleep(0.2)
            return False

        ok = sum(await asyncio.gather(*(answers(s) for s in ids)))
        wall = time.perf_counter() - start
        for sid in ids:
            await c.call_tool("destroy", {"sandbox_id": sid})
    return {"ok": ok, "count": count, "start_all_s": started, "all_answered_s": wall}


def add_layer_row(table: Table, first: list[float], plain: list[float]) -> None:
    layered = "writable system layer" if os.geteuid() == 0 else "read-only system (not root: no layer)"
    f50, f99, p50, p99 = (
        statistics.median(first),
        percentile(first, 99),
        statistics.median(plain),
        percentile(plain, 99),
    )
    table.add(
        f"provision + first execute, {layered}: p50 / p99",
        f"{f50:.1f} / {f99:.1f} ms",
        f"read-only system {p50:.1f} / {p99:.1f} ms",
        "<= 25 / 60",
        f50 <= 25 and f99 <= 60,
    )
    on, off = (statistics.median(cpu) for cpu in LAYER_CPU)
    table.add(
        "  CPU of it (server + reaped children; not the machine's load)",
        f"{on:.1f} ms",
        f"read-only system {off:.1f} ms",
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="samples per latency figure")
    parser.add_argument("--only-template", action="store_true", help="only the template figure and its baseline")
    parser.add_argument("--only-layer", action="store_true", help="only provision + first execute, layer on and off")
    parser.add_argument(
        "--boxes",
        type=int,
        default=50,
        help="live sandboxes each running an HTTP server",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    sandbox_dir = Path("/var/lib/corral/bench-sandboxes") if os.geteuid() == 0 else work / "sandboxes"
    templates_dir = Path("/var/lib/corral/bench-templates") if os.geteuid() == 0 else work / "templates"
    shutil.rmtree(templates_dir, ignore_errors=True)
    settings = SandboxSettings(home=work / "home", sandbox_dir=sandbox_dir, sandbox_templates_dir=templates_dir)
    env = {
        "PATH": os.environ["PATH"],
        "CORRAL_HOME": str(settings.home),
        "CORRAL_SANDBOX_DIR": str(sandbox_dir),
    }
    try:
        first, plain = await first_execute_layer_vs_plain(settings, args.n)  # the layer is on as root
        if args.only_layer:
            table = Table("hands")
            add_layer_row(table, first, plain)
            table.save({"load_average": os.getloadavg()})
            return
        userland = add_template(settings)
        templated = await first_execute(settings, args.n, template="bench")
        if not args.only_template:
            live, raw = await live_vs_bare(settings, env, args.n)
            bg = await background_first_line(env, max(10, args.n // 2))
            rss, private, procs = await idle_rss(settings)
            servers = await many_servers(env, args.boxes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(templates_dir, ignore_errors=True)

    table = Table("hands")
    t50, f50 = statistics.median(templated), statistics.median(first)
    layer = "writable layer" if os.geteuid() == 0 else "read-only"
    table.add(
        f"template sandbox ({userland}, {layer}): provision + first execute p50",
        f"{t50:.1f} ms",
        f"host userland {f50:.1f} ms",
        "<= 50 ms",
        t50 <= 50,
    )
    if args.only_template:
        table.save({"load_average": os.getloadavg()})
        return
    live50, raw50 = statistics.median(live), statistics.median(raw)
    table.add(
        "MCP execute `true` in a live sandbox: p50",
        f"{live50:.1f} ms",
        f"bare bwrap spawn {raw50:.1f} ms",
        "<= bare",
        live50 <= raw50,
    )
    table.add(
        "  CPU per execute (server + entry into the sandbox)",
        f"{CPU['live']:.1f} ms",
        f"bare bwrap spawn {CPU['bare']:.1f} ms",
        "<= bare",
        CPU["live"] <= CPU["bare"],
    )
    add_layer_row(table, first, plain)
    b50 = statistics.median(bg)
    table.add(
        "background start -> first output line (MCP): p50",
        f"{b50:.1f} ms",
        f"MCP execute {live50:.1f} ms",
        "<= 30 ms",
        b50 <= 30,
    )
    table.add(
        "idle live sandbox: host RSS (private)",
        f"{rss:.1f} ({private:.1f}) MiB",
        f"{procs} processes, mostly shared libc",
        "<= 5 MiB",
        rss <= 5,
    )
    table.add(
        f"{args.boxes} live sandboxes with a background HTTP server: answering",
        f"{servers['ok']}/{servers['count']}",
        f"all up in {servers['all_answered_s']:.1f} s",
        "all",
        servers["ok"] == servers["count"],
    )
    table.save({"load_average": os.getloadavg(), "servers": servers})
    print(f"\nload average during the run: {os.getloadavg()} (2 cores shared; numbers are noisy)")


if __name__ == "__main__":
    asyncio.run(main())
