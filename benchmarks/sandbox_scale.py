"""Sandbox costs that must stay flat as sandboxes pile up (issue 15 item 4), small vs large in one run.

    python3 benchmarks/sandbox_scale.py [--n 200]

- `list_sandboxes` first page (limit 10) through an in-memory MCP client: 10 live sandboxes vs
  10,000 live plus 100,000 destroyed ones; the ratio beside the same ratio for `destroy` of
  an already-destroyed id (a primary-key lookup, flat by construction);
- one reaper sweep at the large size: its duration, and the longest the event loop was
  stalled meanwhile (its registry work runs in a thread).

The registry rows are written straight into its SQLite file (no sandbox directories):
listing and sweeping read only the registry. Results: benchmarks/results/sandbox_scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mcp.client import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Table
from corral.servers.sandbox.backend import SandboxRef
from corral.servers.sandbox.config import SandboxSettings
from corral.servers.sandbox.server import build_server
from corral.servers.sandbox.service import SandboxService

SMALL, LARGE, TOMBSTONES = 10, 10_000, 100_000
PAGE = SMALL  # the same page at both sizes: all 10 sandboxes, or the first 10 of 10,000


def fill(service: SandboxService, live: int, destroyed: int) -> str:
    """Insert rows as the service would; returns the id of one destroyed sandbox."""
    now = time.time()
    ref = SandboxRef(id="x", spec=service.settings.spec()).model_dump_json()
    rows = [
        (f"sbx_{'l' if i < live else 'd'}{i:012d}", service.backend.name, "running" if i < live else "destroyed", None, None,
         ref, now - 100_000 + i * 0.001, now + 86400, 3600.0, now if i < live else now - 2 * 86400, None)
        for i in range(live + destroyed)
    ]  # fmt: skip
    db = service.registry._db  # bulk insert: one transaction, not one per row
    with service.registry._lock:
        db.execute("BEGIN")
        db.executemany("INSERT INTO sandboxes VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        db.execute("COMMIT")
    return rows[-1][0] if destroyed else ""


async def interleaved(clients: list[Client], tool: str, args: list[dict], n: int) -> list[float]:
    """Median ms of `tool` on each client, the calls alternating between them (the load of a
    shared machine drifts; alternating gives every size the same share of it)."""
    samples: list[list[float]] = [[] for _ in clients]
    for i in range(n + 3):
        for k, client in enumerate(clients):
            start = time.perf_counter()
            result = await client.call_tool(tool, args[k])
            if i >= 3:  # warm-up
                samples[k].append((time.perf_counter() - start) * 1000)
            assert not result.is_error, result.content[0].text
    return [statistics.median(s) for s in samples]


async def measure(n: int) -> dict[str, dict[str, float]]:
    with contextlib.ExitStack() as stack:
        built = []
        for live, destroyed in ((SMALL, 0), (LARGE, TOMBSTONES)):
            home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            home.chmod(0o711)  # as root, the sandbox uid must traverse to the sandbox dir
            server, service = build_server(SandboxSettings(home=home, sandbox_dir=home / "boxes"), reap=False)
            gone = fill(service, live, destroyed) or fill(service, 0, 1)
            built.append((server, service, gone))
        async with Client(built[0][0]) as small, Client(built[1][0]) as large:
            pages = await interleaved([small, large], "list_sandboxes", [{"limit": PAGE}] * 2, n)
            lookups = await interleaved([small, large], "destroy", [{"sandbox_id": b[2]} for b in built], n)
            sweep, stall = await sweep_with_ticker(built[1][1])
    return {
        "small": {"first_page_ms": pages[0], "destroy_destroyed_ms": lookups[0]},
        "large": {
            "first_page_ms": pages[1],
            "destroy_destroyed_ms": lookups[1],
            "sweep_ms": sweep,
            "loop_stall_ms": stall,
        },
    }


async def sweep_with_ticker(service: SandboxService) -> tuple[float, float]:
    """One sweep (tombstones older than a day pruned, none reapable) while a 1 ms ticker runs."""
    service.settings = service.settings.model_copy(update={"sandbox_tombstone_retention_s": 86400})
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append((now - last) * 1000)
            last = now

    ticker = asyncio.create_task(tick())
    start = time.perf_counter()
    await service.sweep()
    took = (time.perf_counter() - start) * 1000
    done.set()
    await ticker
    return took, max(gaps, default=0.0)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    measured = await measure(args.n)
    small, large = measured["small"], measured["large"]
    page_ratio = large["first_page_ms"] / small["first_page_ms"]
    flat_ratio = large["destroy_destroyed_ms"] / small["destroy_destroyed_ms"]
    table = Table("sandbox_scale")
    table.add(
        f"list_sandboxes first page: {SMALL} vs {LARGE:,} live (+{TOMBSTONES:,} destroyed)",
        f"{small['first_page_ms']:.1f} / {large['first_page_ms']:.1f} ms, x{page_ratio:.2f}",
        f"destroy (PK lookup) x{flat_ratio:.2f}",
        "ratio <= 1.5x",
        page_ratio <= 1.5,
    )
    table.add(
        f"reaper sweep at {LARGE:,} live + {TOMBSTONES:,} pruned: duration / loop stall",
        f"{large['sweep_ms']:.0f} / {large['loop_stall_ms']:.1f} ms",
        "a 1 ms ticker's longest gap",
        "stall <= 50 ms",
        large["loop_stall_ms"] <= 50,
    )
    table.save(measured)


if __name__ == "__main__":
    asyncio.run(main())
