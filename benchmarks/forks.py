"""Fork depth benchmark (issue 15 item 3): every session tool at fork depth 1 vs 1,000.

    python3 benchmarks/forks.py [--depth 1000] [--url postgresql://...] [--no-postgres]

A chain of forks, each forked from the end of the one before and given two events of its
own (the two measured ones 20), so that a session at depth d reads through d non-empty segments of ancestors. Every
tool is called through an in-memory MCP client on the session at depth 1 and the one at
depth `--depth`, with the ratio between them. The baseline is an operation known to be
flat, in the same run: `slice` of a plain session at 1k vs 100k events. Both stores:
SQLite, and PostgreSQL in a throwaway schema when it is reachable.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Table, summary
from corral.servers.session import EventStore, NewEvent, open_store

ROOT_EVENTS = 2000
PER_FORK = 2
TARGET = 1.5
DEFAULT_URL = "postgresql://corral:corral@127.0.0.1:5432/corral_test"


def fill(store: EventStore, sid: str, n: int, chunk: int = 10_000) -> None:
    for start in range(0, n, chunk):
        store.append(sid, [NewEvent(type="bench.fill", data={"i": i}) for i in range(start, min(n, start + chunk))])


def chain(store: EventStore, depth: int) -> dict[int, str]:
    """Session ids at depth 1 and `depth` of one fork chain over a root of ROOT_EVENTS events."""
    sid = store.create({"bench": "root"}).session_id
    fill(store, sid, ROOT_EVENTS)
    at: dict[int, str] = {}
    for level in range(1, depth + 1):
        sid = store.fork(sid, store.get(sid).length).session_id
        measured = level in (1, depth)  # a measured session's newest events are its own, at any depth
        store.append(
            sid, [NewEvent(type="bench.own", data={"level": level}) for _ in range(20 if measured else PER_FORK)]
        )
        if measured:
            at[level] = sid
    return at


def calls(sid: str) -> dict[str, tuple[str, dict]]:
    """Each tool, with arguments that read the same rows whatever the depth (the root's)."""
    return {
        "get_session": ("get_session", {"session_id": sid}),
        "get_events (100 after 500)": ("get_events", {"session_id": sid, "after": 499, "limit": 100}),
        "get_events (newest 10)": ("get_events", {"session_id": sid, "order": "desc", "limit": 10}),
        "slice [500, 600)": ("slice", {"session_id": sid, "start": 500, "end": 600}),
        "rewind 10 before 600": ("rewind", {"session_id": sid, "before": 600, "count": 10}),
        "fork at its end": ("fork", {"session_id": sid, "at": None}),
        "emit_event": ("emit_event", {"session_id": sid, "type": "bench.emit", "data": {"x": 1}}),
    }


async def time_pair(
    client, store: EventStore, small: tuple[str, dict], large: tuple[str, dict], n: int
) -> tuple[float, float]:
    """p50 ms of the same tool at the two sizes, called in turn (A B A B ...) so that drift hits both alike."""
    samples: tuple[list[float], list[float]] = ([], [])
    for i in range(n + 5):
        for side, (name, args) in enumerate((small, large)):
            if name == "fork":
                args = {**args, "at": store.get(args["session_id"]).length}
            t = time.perf_counter()
            result = await client.call_tool(name, args)
            if i >= 5:
                samples[side].append((time.perf_counter() - t) * 1000)
            assert not result.is_error, result.content
    return summary(samples[0])["p50"], summary(samples[1])["p50"]


def measure(
    store: EventStore, sessions: dict[int, str], flat: dict[str, str], n: int
) -> list[tuple[str, float, float]]:
    """(operation, p50 ms at the small size, p50 ms at the large size)."""
    from mcp.client import Client

    from corral.servers.session.server import build_server

    async def run() -> list[tuple[str, float, float]]:
        out = []
        async with Client(build_server(store)) as client:
            small, large = calls(sessions[min(sessions)]), calls(sessions[max(sessions)])
            for op in small:
                out.append((op, *await time_pair(client, store, small[op], large[op], n)))
            plain = [("slice", {"session_id": flat[k], "start": 500, "end": 600}) for k in ("1k", "100k")]
            out.append(
                (
                    "baseline: slice [500, 600) of a plain session",
                    *await time_pair(client, store, plain[0], plain[1], n),
                )
            )
        return out

    return anyio.run(run)


def report(table: Table, label: str, depth: int, rows: list[tuple[str, float, float]]) -> None:
    baseline = rows[-1][2] / rows[-1][1]
    for op, small, large in rows:
        ratio = large / small
        if op.startswith("baseline"):
            table.add(f"{label}: {op} 100k vs 1k events", f"{ratio:.2f}x", f"{small:.2f} -> {large:.2f} ms")
        else:
            table.add(
                f"{label}: {op} depth {depth} vs 1",
                f"{ratio:.2f}x",
                f"{small:.2f} -> {large:.2f} ms; flat op {baseline:.2f}x",
                f"<= {TARGET}x",
                ratio <= TARGET,
            )


def bench(table: Table, label: str, store: EventStore, depth: int, n: int) -> None:
    started = time.perf_counter()
    sessions = chain(store, depth)
    flat = {}
    for key, size in (("1k", 1000), ("100k", 100_000)):
        flat[key] = store.create({"bench": key}).session_id
        fill(store, flat[key], size)
    print(
        f"  ({label}: built a {depth}-deep fork chain and the plain sessions in {time.perf_counter() - started:.1f} s)",
        flush=True,
    )
    report(table, label, depth, measure(store, sessions, flat, n))


@contextmanager
def postgres_schema(url: str) -> Iterator[str | None]:
    """A throwaway schema's URL, or None (said why) when PostgreSQL is not reachable."""
    try:
        import psycopg

        admin = psycopg.connect(url, autocommit=True, connect_timeout=3)
    except Exception as err:  # any failure means "no PostgreSQL to measure"; printed
        print(f"  (PostgreSQL skipped: {' '.join(str(err).split())[:160]})")
        yield None
        return
    schema = "bench_" + uuid.uuid4().hex[:10]
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def with_store(opener: Callable[[], EventStore], fn: Callable[[EventStore], None]) -> None:
    store = opener()
    try:
        fn(store)
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=1000, help="the deep end of the fork chain")
    parser.add_argument("-n", type=int, default=100, help="calls timed per tool and size")
    parser.add_argument(
        "--url",
        default=os.environ.get("CORRAL_TEST_POSTGRES_URL", DEFAULT_URL),
        help="a PostgreSQL database (a throwaway schema is made in it)",
    )
    parser.add_argument("--no-postgres", action="store_true", help="measure SQLite only")
    args = parser.parse_args()
    table = Table("forks")
    print(
        f"session tools by fork depth (1 vs {args.depth}), through an in-memory MCP client; p50 of {args.n} calls each"
    )
    with tempfile.TemporaryDirectory() as d:
        with_store(
            lambda: open_store(str(Path(d) / "forks.db")), lambda s: bench(table, "SQLite", s, args.depth, args.n)
        )
    if not args.no_postgres:
        with postgres_schema(args.url) as url:
            if url is not None:
                with_store(lambda: open_store(url), lambda s: bench(table, "PostgreSQL", s, args.depth, args.n))
    print(f"  -> {table.save()}")


if __name__ == "__main__":
    main()
