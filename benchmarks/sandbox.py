"""Sandbox numbers, each beside its baseline, measured in one run on this machine.

    python3 benchmarks/sandbox.py [--n 100] [--no-docker]

- bubblewrap provision + first `execute true` (p50/p99) vs E2B's published 0.44 s p50
  create-to-first-command;
- `execute true` through the MCP server over a stdio client vs a raw `bwrap ... true`
  (the same argv) spawned from Python: the server's overhead at p50;
- 50 sandboxes executing at once through one stdio client: all succeed? throughput, p95;
- docker provision + first execute p50 (image: the local test image).

Numbers are noisy on a shared 2-core machine; the JSON goes to benchmarks/results/sandbox.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mcp import StdioServerParameters
from mcp.client import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Table
from corral.servers.sandbox.config import DockerConfig, SandboxSettings
from corral.servers.sandbox.registry import Registry
from corral.servers.sandbox.server import backend_config, make_backend
from corral.servers.sandbox.service import SandboxService

E2B_PUBLISHED_P50_MS = 440.0
CPU: dict[str, float] = {}
SDK: dict[str, float] = {}  # the same server on the SDK's own stdio transport (CORRAL_STDIO=sdk)
DOCKER_TEST_IMAGE = "corral-sandbox-test:latest"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def service_for(settings: SandboxSettings, backend=None) -> SandboxService:
    backend = backend or make_backend(backend_config(settings))
    return SandboxService(backend, Registry(settings.sandboxes_dir() / f"registry-{backend.name}.db"), settings)


def cpu_ms() -> float:
    """CPU time of this process and its reaped children: what an op costs, whatever the load."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime) * 1000


async def provision_first_execute(service: SandboxService, n: int, cpu: list[float] | None = None) -> list[float]:
    times = []
    for _ in range(n):
        cpu_start = cpu_ms()
        start = time.perf_counter()
        box = await service.provision()
        record = service.registry.get(box.sandbox_id)
        result = await service.execute(record, "true")
        times.append((time.perf_counter() - start) * 1000)
        if cpu is not None:
            cpu.append(cpu_ms() - cpu_start)
        assert result.exit_code == 0, result
        await service.destroy(box.sandbox_id)
    return times


async def raw_bwrap(service: SandboxService, sandbox_id: str, n: int) -> list[float]:
    backend = service.backend
    record = service.registry.get(sandbox_id)
    from benchmarks.hands import bare_bwrap_argv

    argv = bare_bwrap_argv(backend, record.ref)  # the sandbox's recipe, spawned afresh
    times = []
    for _ in range(n):
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*argv, **backend._popen_user())
        assert await proc.wait() == 0
        times.append((time.perf_counter() - start) * 1000)
    return times


def server_cpu_ms() -> float:
    """CPU of our stdio server child (and the commands it reaped), from /proc."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and b"serve\0sandbox" in cmdline:
            total += sum(int(x) for x in stat[11:15]) * 1000 / os.sysconf("SC_CLK_TCK")
    return total


def self_cpu_ms() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return (me.ru_utime + me.ru_stime) * 1000


def stdio_params(env: dict[str, str]) -> StdioServerParameters:
    venv = Path(sys.executable).parent / "corral"
    corral = str(venv) if venv.exists() else (shutil.which("corral") or "corral")
    return StdioServerParameters(command=corral, args=["serve", "sandbox"], env=env)


async def mcp_vs_raw(
    settings: SandboxSettings, env: dict[str, str], n: int
) -> tuple[list[float], list[float], list[float]]:
    """execute via MCP stdio vs raw bwrap; also the same server on the SDK's stdio transport (SDK dict)."""
    async with Client(stdio_params(env)) as c, Client(stdio_params({**env, "CORRAL_STDIO": "sdk"})) as c_sdk:
        sid = (await c.call_tool("provision", {})).structured_content["sandbox_id"]
        service = service_for(settings)  # reads the same registry: to build the very same bwrap argv
        mcp_times, raw_times, floor = [], [], []
        sdk_times, sdk_floor = [], []

        async def timed(client: Client, tool: str, args: dict, into: list[float]) -> None:
            start = time.perf_counter()
            result = await client.call_tool(tool, args)
            into.append((time.perf_counter() - start) * 1000)
            assert not result.is_error, result

        for _ in range(n):  # interleaved, so load from others hits all alike
            await timed(c, "list_sandboxes", {}, floor)
            await timed(c, "execute", {"sandbox_id": sid, "command": "true"}, mcp_times)
            raw_times += await raw_bwrap(service, sid, 1)
            await timed(c_sdk, "list_sandboxes", {}, sdk_floor)
            await timed(
                c_sdk, "execute", {"sandbox_id": sid, "command": "true"}, sdk_times
            )  # one registry: the same sandbox
        SDK["execute_ms"], SDK["floor_ms"] = statistics.median(sdk_times), statistics.median(sdk_floor)
        # CPU per call (load-independent): MCP = the server process (+ bwrap); raw = us + bwrap.
        start_server, start_client = server_cpu_ms(), self_cpu_ms()
        for _ in range(n):
            await c.call_tool("execute", {"sandbox_id": sid, "command": "true"})
        cpu_mcp = (server_cpu_ms() - start_server) / n
        CPU["client"] = (self_cpu_ms() - start_client) / n
        start_raw = cpu_ms()
        await raw_bwrap(service, sid, n)
        cpu_raw = (cpu_ms() - start_raw) / n
        await c.call_tool("destroy", {"sandbox_id": sid})
    CPU["mcp"], CPU["raw"] = cpu_mcp, cpu_raw
    return mcp_times, raw_times, floor


async def concurrent(env: dict[str, str], count: int) -> dict[str, float]:
    async with Client(stdio_params(env)) as c:
        ids = [(await c.call_tool("provision", {})).structured_content["sandbox_id"] for _ in range(count)]

        async def one(sid: str) -> tuple[bool, float]:
            start = time.perf_counter()
            r = await c.call_tool("execute", {"sandbox_id": sid, "command": "echo hi; ls /workspace"})
            return (not r.is_error and r.structured_content["stdout"] == "hi\n"), (time.perf_counter() - start) * 1000

        start = time.perf_counter()
        results = await asyncio.gather(*(one(s) for s in ids))
        wall = time.perf_counter() - start
        for sid in ids:
            await c.call_tool("destroy", {"sandbox_id": sid})
    lat = [t for _, t in results]
    return {
        "ok": sum(ok for ok, _ in results),
        "count": count,
        "throughput_per_s": count / wall,
        "p95_ms": pct(lat, 95),
        "wall_s": wall,
    }


async def docker_first_execute(settings: SandboxSettings, n: int) -> list[float] | None:
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "image", "inspect", DOCKER_TEST_IMAGE], capture_output=True).returncode
    ):
        return None
    service = service_for(settings, make_backend(DockerConfig(image=DOCKER_TEST_IMAGE)))
    return await provision_first_execute(service, n)


def row(name: str, value: str, baseline: str) -> str:
    return f"| {name:<52} | {value:>22} | {baseline:<34} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="samples per latency figure")
    parser.add_argument("--no-docker", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    sandbox_dir = Path("/var/lib/corral/bench-sandboxes") if os.geteuid() == 0 else work / "sandboxes"
    settings = SandboxSettings(home=work / "home", sandbox_dir=sandbox_dir)
    env = {"PATH": os.environ["PATH"], "CORRAL_HOME": str(settings.home), "CORRAL_SANDBOX_DIR": str(sandbox_dir)}
    try:
        service = service_for(settings)
        await provision_first_execute(service, 5)  # warm-up: page cache, first bwrap
        first_cpu: list[float] = []
        first = await provision_first_execute(service, args.n, first_cpu)
        mcp_t, raw_t, floor_t = await mcp_vs_raw(settings, env, args.n)
        conc = await concurrent(env, 50)
        docker = None if args.no_docker else await docker_first_execute(settings, max(5, args.n // 10))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {
        "bwrap_provision_first_execute_ms": {"p50": statistics.median(first), "p99": pct(first, 99), "n": len(first)},
        "bwrap_provision_first_execute_cpu_ms": {"p50": statistics.median(first_cpu)},
        "e2b_published_create_to_first_command_p50_ms": E2B_PUBLISHED_P50_MS,
        "execute_mcp_stdio_ms": {"p50": statistics.median(mcp_t)},
        "execute_raw_bwrap_ms": {"p50": statistics.median(raw_t)},
        "mcp_overhead_p50_ms": statistics.median(mcp_t) - statistics.median(raw_t),
        "mcp_round_trip_floor_p50_ms": statistics.median(floor_t),
        "sdk_stdio_transport_ms": {
            "execute_p50": SDK["execute_ms"],
            "overhead_p50": SDK["execute_ms"] - statistics.median(raw_t),
            "floor_p50": SDK["floor_ms"],
        },
        "execute_cpu_ms": {
            "server_mcp_stdio": CPU["mcp"],
            "raw_bwrap": CPU["raw"],
            "overhead": CPU["mcp"] - CPU["raw"],
            "client": CPU["client"],
        },
        "concurrent_50": conc,
        "docker_provision_first_execute_ms": {"p50": statistics.median(docker), "n": len(docker)} if docker else None,
        "load_average": os.getloadavg(),
    }
    print("| figure | measured | baseline |\n|---|---|---|")
    b = results["bwrap_provision_first_execute_ms"]
    print(
        row(
            "bwrap provision + first execute `true`, p50 / p99",
            f"{b['p50']:.1f} / {b['p99']:.1f} ms",
            "E2B published 440 ms p50; target <=25/<=60",
        )
    )
    print(
        row(
            "  CPU time it costs (server + bwrap + bash), p50",
            f"{results['bwrap_provision_first_execute_cpu_ms']['p50']:.1f} ms",
            "wall time minus waiting for a core",
        )
    )
    print(
        row(
            "execute `true` via MCP stdio, p50",
            f"{results['execute_mcp_stdio_ms']['p50']:.1f} ms",
            f"raw bwrap from Python {results['execute_raw_bwrap_ms']['p50']:.1f} ms",
        )
    )
    print(row("MCP server overhead, p50", f"{results['mcp_overhead_p50_ms']:.1f} ms", "target <= 5 ms"))
    cpu = results["execute_cpu_ms"]
    print(
        row(
            "server overhead in CPU time per execute",
            f"{cpu['overhead']:.1f} ms",
            f"server {cpu['server_mcp_stdio']:.1f} ms vs raw {cpu['raw_bwrap']:.1f} ms",
        )
    )
    print(row("  (the MCP client's own CPU per call)", f"{cpu['client']:.1f} ms", "not the server's"))
    print(
        row(
            "  of which: a stdio tool call that spawns nothing, p50",
            f"{results['mcp_round_trip_floor_p50_ms']:.1f} ms",
            "list_sandboxes round trip",
        )
    )
    sdk = results["sdk_stdio_transport_ms"]
    print(
        row(
            "  the same on the SDK's stdio transport: overhead / floor",
            f"{sdk['overhead_p50']:.1f} / {sdk['floor_p50']:.1f} ms",
            "CORRAL_STDIO=sdk",
        )
    )
    print(
        row(
            "50 sandboxes executing at once: ok / throughput / p95",
            f"{conc['ok']}/50, {conc['throughput_per_s']:.0f}/s, {conc['p95_ms']:.0f} ms",
            "all 50 must succeed",
        )
    )
    if docker:
        print(
            row(
                "docker provision + first execute, p50",
                f"{statistics.median(docker):.0f} ms",
                "bwrap above; E2B 440 ms",
            )
        )
    print(f"\nload average during the run: {results['load_average']} (2 cores shared; numbers are noisy)")
    table = Table("sandbox")
    table.add(
        "bwrap provision + first execute `true`: p50",
        f"{b['p50']:.1f} ms",
        f"E2B published {E2B_PUBLISHED_P50_MS:.0f} ms",
        "<= 25 ms",
        b["p50"] <= 25,
    )
    table.add("bwrap provision + first execute `true`: p99", f"{b['p99']:.1f} ms", "", "<= 60 ms", b["p99"] <= 60)
    table.add(
        "execute `true` via MCP stdio vs raw bwrap: overhead p50",
        f"{results['mcp_overhead_p50_ms']:.1f} ms",
        f"raw {results['execute_raw_bwrap_ms']['p50']:.1f} ms, MCP {results['execute_mcp_stdio_ms']['p50']:.1f} ms; SDK's stdio transport +{sdk['overhead_p50']:.1f} ms",
        "<= 5 ms",
        results["mcp_overhead_p50_ms"] <= 5,
    )
    table.add(
        "  stdio tool call that spawns nothing, p50",
        f"{results['mcp_round_trip_floor_p50_ms']:.1f} ms",
        f"SDK's stdio transport {sdk['floor_p50']:.1f} ms",
    )
    table.add(
        "50 sandboxes at once: ok, throughput, p95",
        f"{conc['ok']}/50, {conc['throughput_per_s']:.0f}/s, {conc['p95_ms']:.0f} ms",
        "",
        "all succeed",
        conc["ok"] == 50,
    )
    if docker:
        table.add(
            "docker provision + first execute: p50", f"{statistics.median(docker):.0f} ms", f"bwrap {b['p50']:.1f} ms"
        )
    table.save(results)


if __name__ == "__main__":
    asyncio.run(main())
