"""Session log benchmark (issue 2): append latency and throughput, slice at 1k vs 1M, MCP overhead.

    python3 benchmarks/session.py [--big 1000000]

Each figure is printed beside its baseline, measured in the same run: raw sqlite3 for the
store, the direct store call for the MCP server, the 1k-event session for the 1M one.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Table, summary, time_ms
from corral.servers.session import NewEvent, open_store

PAYLOAD = {"text": "x" * 200, "n": 1}


def raw_sqlite_append(path: Path, synchronous: str, n: int) -> list[float]:
    """Baseline: one INSERT + COMMIT on a bare WAL table, no checks."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("CREATE TABLE IF NOT EXISTS e (s TEXT, p INTEGER, d TEXT, PRIMARY KEY (s, p))")
    pos = iter(range(10**9))
    data = json.dumps(PAYLOAD)

    def one() -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO e VALUES ('s', ?, ?)", (next(pos), data))
        db.execute("COMMIT")

    return time_ms(one, n)


def appends(table: Table, tmp: Path) -> None:
    for sync in ("NORMAL", "FULL"):
        store = open_store(str(tmp / f"append-{sync}.db"), synchronous=sync)
        sid = store.create().session_id
        mine = summary(
            time_ms(lambda store=store, sid=sid: store.append(sid, [NewEvent(type="bench.append", data=PAYLOAD)]), 2000)
        )
        base = summary(raw_sqlite_append(tmp / f"raw-{sync}.db", sync, 2000))
        table.add(
            f"append 1 event, synchronous={sync}: p50", f"{mine['p50']:.3f} ms", f"raw sqlite {base['p50']:.3f} ms"
        )
        table.add(
            f"append 1 event, synchronous={sync}: p99",
            f"{mine['p99']:.3f} ms",
            f"raw sqlite {base['p99']:.3f} ms",
            "<= 2 ms",
            mine["p99"] <= 2 if sync == "NORMAL" else None,
        )
        store.close()
    store = open_store(str(tmp / "batch.db"))
    sid = store.create().session_id
    batch = [NewEvent(type="bench.batch", data=PAYLOAD) for _ in range(500)]
    t = time.perf_counter()
    for _ in range(40):
        store.append(sid, batch)
    rate = 40 * 500 / (time.perf_counter() - t)
    db = sqlite3.connect(tmp / "raw-batch.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE e (s TEXT, p INTEGER, d TEXT, PRIMARY KEY (s, p))")
    data = json.dumps(PAYLOAD)
    t = time.perf_counter()
    for b in range(40):
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO e VALUES ('s', ?, ?)", ((b * 500 + i, data) for i in range(500)))
        db.execute("COMMIT")
    raw_rate = 40 * 500 / (time.perf_counter() - t)
    table.add(
        "batched appends (500 per append)",
        f"{rate:,.0f} ev/s",
        f"raw sqlite {raw_rate:,.0f} ev/s",
        ">= 20,000/s",
        rate >= 20000,
    )
    store.close()


def slices(table: Table, tmp: Path, big: int) -> None:
    store = open_store(str(tmp / "slice.db"))
    small_sid = store.create().session_id
    big_sid = store.create().session_id
    store.append(small_sid, [NewEvent(type="bench.fill", data={"i": i}) for i in range(1000)])
    t = time.perf_counter()
    chunk = 10000
    for start in range(0, big, chunk):
        store.append(
            big_sid, [NewEvent(type="bench.fill", data={"i": i}) for i in range(start, min(big, start + chunk))]
        )
    print(f"  (filled a {big:,}-event session in {time.perf_counter() - t:.1f} s)", flush=True)
    rng = random.Random(7)
    for sid, length, label in ((small_sid, 1000, "1k"), (big_sid, big, f"{big // 1000}k")):

        def one(sid=sid, length=length) -> None:
            start = rng.randrange(0, length - 100)
            assert len(store.select(sid, gte=start, lt=start + 100)) == 100

        s = summary(time_ms(one, 300))
        table.rows.append({"figure": f"slice 100 @ {label}", "p50": f"{s['p50']:.3f}", "p99": f"{s['p99']:.3f}"})
        yield label, s
    store.close()


def mcp_overhead(table: Table, tmp: Path) -> None:
    from mcp.client import Client

    from corral.servers.session.server import build_server

    store = open_store(str(tmp / "mcp.db"))
    sid = store.create().session_id
    store.append(sid, [NewEvent(type="bench.fill", data=PAYLOAD) for _ in range(1000)])

    async def measure() -> tuple[dict, dict]:
        async with Client(build_server(store)) as client:

            async def via_mcp() -> None:
                result = await client.call_tool("get_events", {"session_id": sid, "after": 499, "limit": 10})
                assert not result.is_error

            samples = []
            for i in range(520):
                t = time.perf_counter()
                await via_mcp()
                if i >= 20:
                    samples.append((time.perf_counter() - t) * 1000)
        direct = time_ms(lambda: store.select(sid, gte=500, limit=10), 500)
        return summary(samples), summary(direct)

    mcp, direct = anyio.run(measure)
    overhead = mcp["p50"] - direct["p50"]
    table.add(
        "get_events(10) via in-memory MCP client: p50", f"{mcp['p50']:.3f} ms", f"direct store {direct['p50']:.3f} ms"
    )
    table.add("MCP overhead over the direct call: p50", f"{overhead:.3f} ms", "", "<= 2 ms", overhead <= 2)
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--big", type=int, default=1_000_000, help="events in the large session")
    args = parser.parse_args()
    table = Table("session")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("session log (SQLite)")
        appends(table, tmp)
        results = dict(slices(table, tmp, args.big))
        small, large = results["1k"], results[f"{args.big // 1000}k"]
        table.rows = [r for r in table.rows if not r["figure"].startswith("slice")]
        table.add(
            f"slice 100 events in a {args.big:,}-event session: p50",
            f"{large['p50']:.3f} ms",
            f"1k session {small['p50']:.3f} ms",
            "<= 5 ms",
            large["p99"] <= 5,
        )
        table.add(
            f"slice 100 events in a {args.big:,}-event session: p99",
            f"{large['p99']:.3f} ms",
            f"1k session {small['p99']:.3f} ms",
            "<= 5 ms",
            large["p99"] <= 5,
        )
        mcp_overhead(table, tmp)
    print(f"  -> {table.save()}")


if __name__ == "__main__":
    main()
