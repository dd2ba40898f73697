"""PostgreSQL session store benchmark (issue 7), side by side with SQLite in the same run.

    python3 benchmarks/postgres.py [--url postgresql://...] [--big 1000000]

Figures: append p50/p99 on loopback (target p99 <= 10 ms), batched appends/s, slice of 100
events in a 1,000,000-event session vs a 1k one (target <= 10 ms). Baselines: the SQLite
store and a bare psycopg INSERT+COMMIT. Everything lives in a throwaway schema.
The 1M-event session is filled with one INSERT ... SELECT generate_series (setup, not
measured); the machine is shared, so numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Table, summary, time_ms
from corral.servers.session import NewEvent, open_store

DEFAULT_URL = "postgresql://corral:corral@127.0.0.1:5432/corral_test"
PAYLOAD = {"text": "x" * 200, "n": 1}


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


def appends(table: Table, pg_url: str, tmp: Path, n: int) -> None:
    """Interleaved samples (store, SQLite, bare psycopg), so a busy moment hits all three alike."""
    pg = open_store(pg_url)
    lite = open_store(f"sqlite:///{tmp / 'append.db'}")
    pg_sid, lite_sid = pg.create().session_id, lite.create().session_id
    raw = psycopg.connect(pg_url)
    raw.execute("CREATE TABLE raw_e (s TEXT, p BIGINT, d TEXT, PRIMARY KEY (s, p))")
    raw.commit()
    data = json.dumps(PAYLOAD)
    event = [NewEvent(type="bench.append", data=PAYLOAD)]

    def raw_one(i: int) -> None:
        raw.execute("INSERT INTO raw_e VALUES ('s', %s, %s)", (i, data))
        raw.commit()

    samples: dict[str, list[float]] = {"pg": [], "sqlite": [], "raw": []}
    for i in range(n + 20):
        for key, call in (
            ("pg", lambda: pg.append(pg_sid, event)),
            ("sqlite", lambda: lite.append(lite_sid, event)),
            ("raw", lambda i=i: raw_one(i)),
        ):
            t = time.perf_counter()
            call()
            if i >= 20:  # warm-up
                samples[key].append((time.perf_counter() - t) * 1000)
    pg.close(), lite.close(), raw.close()
    mine, sq, bare = (summary(samples[k]) for k in ("pg", "sqlite", "raw"))
    table.add(
        "PostgreSQL append 1 event: p50",
        f"{mine['p50']:.3f} ms",
        f"sqlite {sq['p50']:.3f}, raw pg {bare['p50']:.3f} ms",
    )
    table.add(
        "PostgreSQL append 1 event: p99",
        f"{mine['p99']:.3f} ms",
        f"sqlite {sq['p99']:.3f}, raw pg {bare['p99']:.3f} ms",
        "<= 10 ms",
        mine["p99"] <= 10,
    )


def batches(table: Table, pg_url: str, tmp: Path) -> None:
    rates = {}
    batch = [NewEvent(type="bench.batch", data=PAYLOAD) for _ in range(500)]
    for label, url in (("postgres", pg_url), ("sqlite", f"sqlite:///{tmp / 'batch.db'}")):
        store = open_store(url)
        sid = store.create().session_id
        store.append(sid, batch)
        t = time.perf_counter()
        for _ in range(20):
            store.append(sid, batch)
        rates[label] = 20 * 500 / (time.perf_counter() - t)
        store.close()
    table.add(
        "PostgreSQL batched appends (500 per append)",
        f"{rates['postgres']:,.0f} ev/s",
        f"sqlite {rates['sqlite']:,.0f} ev/s",
    )


def fill(url: str, sid: str, n: int) -> None:
    """Setup: n events straight into the table, then the session's maintained length."""
    data = json.dumps({"i": 0, "text": "x" * 100})
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO corral_events (session_id, position, event_id, type, data) "
            "SELECT %s, g, 'evt_' || g, 'bench.fill', %s FROM generate_series(0, %s - 1) g",
            (sid, data, n),
        )
        conn.execute("UPDATE corral_sessions SET length = %s WHERE session_id = %s", (n, sid))
        conn.commit()
        conn.execute("ANALYZE corral_events")


def slices(table: Table, pg_url: str, tmp: Path, big: int) -> None:
    store = open_store(pg_url)
    sids = {}
    for label, n in (("1k", 1000), ("big", big)):
        sids[label] = (store.create().session_id, n)
        t = time.perf_counter()
        fill(pg_url, sids[label][0], n)
        print(f"  (filled a {n:,}-event session in {time.perf_counter() - t:.1f} s)", flush=True)
    rng = random.Random(7)
    got = {}
    for label, (sid, n) in sids.items():

        def one(sid: str = sid, n: int = n) -> None:
            start = rng.randrange(0, n - 100)
            assert len(store.select(sid, gte=start, lt=start + 100)) == 100

        got[label] = summary(time_ms(one, 300))
    store.close()
    small, large = got["1k"], got["big"]
    name = f"PostgreSQL slice 100 events in a {big:,}-event session"
    table.add(f"{name}: p50", f"{large['p50']:.3f} ms", f"1k session {small['p50']:.3f} ms")
    table.add(
        f"{name}: p99", f"{large['p99']:.3f} ms", f"1k session {small['p99']:.3f} ms", "<= 10 ms", large["p99"] <= 10
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--url",
        default=os.environ.get("CORRAL_TEST_POSTGRES_URL", DEFAULT_URL),
        help="a PostgreSQL database to use (a throwaway schema is made in it)",
    )
    parser.add_argument("--big", type=int, default=1_000_000, help="events in the large session")
    parser.add_argument("-n", type=int, default=2000, help="appends timed per store")
    args = parser.parse_args()
    schema = "bench_" + uuid.uuid4().hex[:8]
    try:
        with psycopg.connect(args.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as err:
        sys.exit(
            f"postgres benchmark: no server at {args.url}: {' '.join(str(err).split())} (source .ci/services.sh && start_postgres)"
        )
    url = with_schema(args.url, schema)
    table = Table("postgres")
    print(
        f"session log on PostgreSQL ({args.url.split('@')[-1]}, schema {schema}) vs SQLite; a shared machine: numbers are noisy"
    )
    try:
        with tempfile.TemporaryDirectory() as d:
            appends(table, url, Path(d), args.n)
            batches(table, url, Path(d))
            slices(table, url, Path(d), args.big)
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    print(f"  -> {table.save()}")


if __name__ == "__main__":
    main()
