"""Flat costs (issue 15): each operation the issue names at a small and a large size, in one run.

    python3 benchmarks/flat.py [--n 30] [--depth 1000] [--events 1000000] [--no-postgres]

Every row is p50 ms at the small size -> the large size and the ratio between them, beside
the ratio of an operation known to be flat, measured in the same run:

- credentials, 1 vs 1,000 in the vault (`credentials.scale`): `http_request` with a 256 KiB
  response, `list_credentials` (a page of 1: the same answer at both sizes; and the default
  first page, 1 item vs 25, shown without a target), the vault reload; flat op: a direct
  httpx GET of the same body.
- fork depth, 1 vs 1,000 (`forks.chain`/`forks.measure`): every session tool through an
  in-memory MCP client, on SQLite (and PostgreSQL when reachable); flat op: `slice` of a
  plain session at 1k vs 100k events.
- the viewer's first screen, a session of 1k vs 1M events: what the page fetches before it
  can paint (its HTML, then `events.json` for the tail) over real HTTP on loopback; flat op:
  the page's HTML alone.
- `list_sandboxes` 10 vs 10,000: only when the tool pages (issue 15 item 4); else skipped, said so.

Writes benchmarks/results/flat.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from benchmarks import credentials, forks
from benchmarks.common import Table
from corral.servers.session import EventStore, open_store

TARGET = 1.5
SMALL_EVENTS = 1000


def ratio_row(
    table: Table,
    figure: str,
    small: float,
    large: float,
    flat: float,
    target: float | None = TARGET,
    absolute: tuple[str, bool] | None = None,
) -> None:
    """One row: small -> large ms (ratio), beside the flat operation's ratio."""
    ratio = large / small
    if absolute is not None:
        table.add(
            figure, f"{small:.2f} -> {large:.2f} ms ({ratio:.2f}x)", f"flat op {flat:.2f}x", absolute[0], absolute[1]
        )
    elif target is None:
        table.add(figure, f"{small:.2f} -> {large:.2f} ms ({ratio:.2f}x)", f"flat op {flat:.2f}x")
    else:
        table.add(
            figure,
            f"{small:.2f} -> {large:.2f} ms ({ratio:.2f}x)",
            f"flat op {flat:.2f}x",
            f"<= {target}x",
            ratio <= target,
        )


# -- credentials ---------------------------------------------------------------------------


def bench_credentials(table: Table, n: int) -> None:
    with credentials.upstream() as port:
        by_op = asyncio.run(credentials.scale(n, port))
    many = credentials.MANY
    flat_name = "direct httpx GET, 256 KiB (flat baseline)"
    flat = by_op[flat_name][many] / by_op[flat_name][1]
    for name, sizes in by_op.items():
        figure = f"credentials: {name}, 1 vs {many:,}"
        if name == flat_name:
            table.add(figure, f"{sizes[1]:.2f} -> {sizes[many]:.2f} ms ({flat:.2f}x)", "(the flat op)")
        elif name.startswith("vault"):
            ratio_row(table, figure, sizes[1], sizes[many], flat, absolute=("< 50 ms", sizes[many] < 50))
        elif name == "list_credentials (first page)":  # 1 item vs a full page: no like-for-like ratio
            ratio_row(table, figure, sizes[1], sizes[many], flat, target=None)
        else:
            ratio_row(table, figure, sizes[1], sizes[many], flat)


# -- fork depth ----------------------------------------------------------------------------


def bench_forks(table: Table, label: str, store: EventStore, depth: int, n: int) -> None:
    sessions = forks.chain(store, depth)
    plain = {}
    for key, size in (("1k", 1000), ("100k", 100_000)):
        plain[key] = store.create({"bench": key}).session_id
        forks.fill(store, plain[key], size)
    rows = forks.measure(store, sessions, plain, n)
    *tools, (base_name, base_small, base_large) = rows
    flat = base_large / base_small
    for op, small, large in tools:
        ratio_row(table, f"forks ({label}): {op}, depth 1 vs {depth:,}", small, large, flat)
    table.add(
        f"forks ({label}): {base_name.removeprefix('baseline: ')}, 1k vs 100k events",
        f"{base_small:.2f} -> {base_large:.2f} ms ({flat:.2f}x)",
        "(the flat op)",
    )


# -- the viewer's first screen ------------------------------------------------------------


@contextmanager
def viewer(store: EventStore) -> Iterator[str]:
    """The viewer's routes on a loopback port (a real uvicorn in a thread); yields the base URL."""
    import uvicorn
    from starlette.applications import Starlette

    from corral.viewer.web import viewer_routes

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(Starlette(routes=viewer_routes(store)), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def first_screen(http: httpx.Client, sid: str) -> None:
    """What the page needs before its first paint: the HTML, then the tail of events."""
    http.get(f"/sessions/{sid}").raise_for_status()
    answer = http.get(f"/sessions/{sid}/events.json")
    answer.raise_for_status()
    assert answer.json()["events"], "the first screen shows events"


def bench_viewer(table: Table, events: int, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as d:
        store = open_store(str(Path(d) / "viewer.db"))
        try:
            started = time.perf_counter()
            sizes = {}
            for size in (SMALL_EVENTS, events):
                sizes[size] = store.create({"bench": f"viewer {size}"}).session_id
                forks.fill(store, sizes[size], size, chunk=20_000)
            print(
                f"  (viewer: built sessions of {SMALL_EVENTS:,} and {events:,} events in {time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            with viewer(store) as base, httpx.Client(base_url=base, timeout=30, trust_env=False) as http:
                calls = {}
                for size, sid in sizes.items():
                    calls[("first screen", size)] = lambda s=sid: first_screen(http, s)
                    calls[("page HTML", size)] = lambda s=sid: http.get(f"/sessions/{s}").raise_for_status()
                samples = interleaved(calls, n)
        finally:
            store.close()
    p50 = {key: statistics.median(s) for key, s in samples.items()}
    flat = p50[("page HTML", events)] / p50[("page HTML", SMALL_EVENTS)]
    small, large = p50[("first screen", SMALL_EVENTS)], p50[("first screen", events)]
    ratio_row(table, f"viewer: first screen (HTML + tail), {SMALL_EVENTS:,} vs {events:,} events", small, large, flat)
    table.add(
        f"viewer: first screen of {events:,} events",
        f"{large:.1f} ms",
        f"{SMALL_EVENTS:,} events {small:.1f} ms",
        "< 1000 ms",
        large < 1000,
    )
    table.add(
        f"viewer: page HTML, {SMALL_EVENTS:,} vs {events:,} events",
        f"{p50[('page HTML', SMALL_EVENTS)]:.2f} -> {p50[('page HTML', events)]:.2f} ms ({flat:.2f}x)",
        "(the flat op)",
    )


def interleaved(calls: dict, n: int) -> dict:
    """p50 samples of each call, taken in turn so that load from other processes hits them all alike."""
    for call in calls.values():
        for _ in range(3):
            call()
    out: dict = {key: [] for key in calls}
    for _ in range(n):
        for key, call in calls.items():
            started = time.perf_counter()
            call()
            out[key].append((time.perf_counter() - started) * 1000)
    return out


# -- sandboxes -----------------------------------------------------------------------------


def bench_sandboxes(table: Table, n: int) -> None:
    """`list_sandboxes`' first page at 10 vs 10,000 live sandboxes (benchmarks/sandbox_scale.py measures it)."""
    from benchmarks import sandbox_scale

    measured = asyncio.run(sandbox_scale.measure(n))
    small, large = measured["small"], measured["large"]
    ratio = large["first_page_ms"] / small["first_page_ms"]
    flat = large["destroy_destroyed_ms"] / small["destroy_destroyed_ms"]
    table.add(
        f"sandboxes: list_sandboxes first page, {sandbox_scale.SMALL} vs {sandbox_scale.LARGE:,}",
        f"{small['first_page_ms']:.2f} -> {large['first_page_ms']:.2f} ms (x{ratio:.2f})",
        f"destroy of a destroyed id x{flat:.2f}",
        "<= 1.5x",
        ratio <= 1.5,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--n", type=int, default=30, help="samples per operation and size")
    parser.add_argument("--depth", type=int, default=1000, help="the deep end of the fork chain")
    parser.add_argument("--events", type=int, default=1_000_000, help="the large viewer session")
    parser.add_argument(
        "--url", default=forks.DEFAULT_URL, help="a PostgreSQL database (a throwaway schema is made in it)"
    )
    parser.add_argument("--no-postgres", action="store_true", help="fork depth on SQLite only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the table
    table = Table("flat")
    print(
        f"flat costs (issue 15): p50 of {args.n} samples at a small and a large size, beside a flat operation's ratio"
    )
    bench_credentials(table, args.n)
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as d:
        forks.with_store(
            lambda: open_store(str(Path(d) / "forks.db")), lambda s: bench_forks(table, "SQLite", s, args.depth, args.n)
        )
    if not args.no_postgres:
        with forks.postgres_schema(args.url) as url:
            if url is not None:
                forks.with_store(
                    lambda: open_store(url), lambda s: bench_forks(table, "PostgreSQL", s, args.depth, args.n)
                )
    bench_viewer(table, args.events, args.n)
    bench_sandboxes(table, args.n)
    print(f"  -> {table.save()}")


if __name__ == "__main__":
    main()
