"""Worker-pool benchmark (issue 7): pickup of a killed worker's session, throughput with 1, 2, 4 workers.

    python3 benchmarks/workers.py [--url postgresql://...] [--lease 5] [--sessions 12]

Real `corral worker` processes on PostgreSQL (a throwaway schema per measurement).
- pickup: a worker is SIGKILLed mid-session; the figure is the time from the kill to the
  next step written by another worker, beside the lease timeout (target: lease + 2 s).
- throughput: scripted harness sessions (fake Anthropic API on loopback, 0.3 s per model
  call, a toolbox MCP server per session) worked by 1, 2 and 4 workers; baseline 1 worker.
  The machine has 2 shared cores: the curve flattens once they are saturated.
- database faults (issue 18): on a private PostgreSQL cluster (initdb, as in
  tests/workers/test_outage.py), three workers on three scripted sessions while the server
  restarts (`pg_ctl restart -m fast`) or stops for 20 s; the figure is the time from the
  database's return to the first step completed after it, beside the lease timeout.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Table
from corral.harness.pool import submit
from corral.servers.session import EventStore, open_store
from tests.harness.fake_anthropic import FakeAnthropic, Script, Turn, text, tool
from tests.workers.helpers import Worker, harness_env, steps, wait_until
from tests.workers.private_pg import Cluster

DEFAULT_URL = "postgresql://corral:corral@127.0.0.1:5432/corral_test"


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    schema = "bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def pickup_once(url: str, tmp: Path, lease: float) -> float:
    env = {"CORRAL_TEST_STEPS": "400", "CORRAL_TEST_STEP_S": "0.05"}
    with fresh_schema(url) as schema_url:
        store = open_store(schema_url)
        pool: list[Worker] = []
        try:
            sid = submit(store, schema_url, "pickup")
            victim = Worker(schema_url, "victim", tmp, lease=lease, env=env)
            pool.append(victim)
            wait_until("a few steps", lambda: len(steps(store, sid)) >= 3, timeout=60)
            heir = Worker(schema_url, "heir", tmp, lease=lease, env=env)
            pool.append(heir)
            wait_until("the heir up", lambda: "corral worker heir" in heir.log(), timeout=60)
            time.sleep(0.5)
            killed_at = victim.signal(signal.SIGKILL)
            mine = f"pid{victim.pid}"
            taken = wait_until(
                "the session taken over",
                lambda: next((t for _, w, t in steps(store, sid) if w != mine), None),
                timeout=lease + 30,
                every=0.02,
            )
            return float(taken) - killed_at  # type: ignore[arg-type]
        finally:
            for w in pool:
                w.stop()
            store.close()


def script(n: int) -> Script:
    return Script(
        {
            f"BENCH-{i:03d}:": [
                Turn([text("go"), tool("toolbox__slow", {"seconds": 0.1})]),
                Turn([tool("toolbox__count_lines", {})]),
                Turn([text(f"done {i}")]),
            ]
            for i in range(n)
        }
    )


def all_idle(store: EventStore, sids: list[str]) -> bool:
    return all(store.get(s).status == "idle" for s in sids)


def throughput(url: str, tmp: Path, workers: int, sessions: int, lease: float) -> float:
    """Sessions per minute, from submitting them to the last one idle (workers already up)."""
    with fresh_schema(url) as schema_url, FakeAnthropic(script(sessions), delay_s=0.3) as fake:
        store = open_store(schema_url)
        pool = [
            Worker(
                schema_url,
                f"w{k}",
                tmp,
                lease=lease,
                body="corral.harness.pool_body:harness_body",
                env=harness_env(tmp, fake, f"{workers}-{k}"),
            )
            for k in range(workers)
        ]
        try:
            for w in pool:
                wait_until(f"{w.name} up", lambda w=w: f"corral worker {w.name}" in w.log(), timeout=60)
            time.sleep(1.0)  # let every worker register and poll
            t = time.monotonic()
            sids = [submit(store, schema_url, f"BENCH-{i:03d}: go") for i in range(sessions)]
            wait_until("every session done", lambda: all_idle(store, sids), timeout=600, every=0.1)
            return sessions / (time.monotonic() - t) * 60
        finally:
            for w in pool:
                w.stop()
            store.close()


def recovery_once(cluster: Cluster, tmp: Path, lease: float, fault: str) -> float:
    """Seconds from the database's return (after `fault`) to the first step written after it."""
    env = {"CORRAL_TEST_STEPS": "2000", "CORRAL_TEST_STEP_S": "0.05"}
    with fresh_schema(cluster.url) as schema_url:
        store = open_store(schema_url)
        pool = [Worker(schema_url, f"f{k}", tmp, lease=lease, env=env) for k in range(3)]
        try:
            sids = [submit(store, schema_url, f"fault {k}") for k in range(3)]
            wait_until("every session under way", lambda: all(len(steps(store, s)) >= 3 for s in sids), timeout=60)
            back_at = cluster.restart() if fault == "restart" else cluster.down_for(20)
            after = lambda: min((t for s in sids for _, _, t in steps(store, s) if t > back_at), default=None)  # noqa: E731
            first = wait_until("a step after the return", after, timeout=lease + 60, every=0.02)
            return float(first) - back_at  # type: ignore[arg-type]
        finally:
            for w in pool:
                w.stop()
            store.close()


def fault_recovery(table: Table, tmp: Path, lease: float, runs: int) -> dict[str, list[float]]:
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="corral-bench-pg-")))
    cluster.start()
    found: dict[str, list[float]] = {}
    try:
        for fault, label in (("restart", "PostgreSQL restarted (-m fast)"), ("stop20", "PostgreSQL stopped for 20 s")):
            found[fault] = [recovery_once(cluster, tmp, lease, fault) for _ in range(runs)]
            table.add(
                f"{label}: first step after its return (worst of {runs})",
                f"{max(found[fault]):.2f} s",
                f"lease {lease:g} s",
            )
    finally:
        if cluster.running():
            cluster.stop()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("CORRAL_TEST_POSTGRES_URL", DEFAULT_URL))
    parser.add_argument("--lease", type=float, default=5.0, help="worker lease timeout, seconds")
    parser.add_argument("--sessions", type=int, default=12, help="scripted sessions per throughput run")
    parser.add_argument("--pickups", type=int, default=3, help="kill-and-pickup repetitions")
    parser.add_argument("--faults", type=int, default=2, help="repetitions of each database fault (0: skip them)")
    args = parser.parse_args()
    try:
        psycopg.connect(args.url, connect_timeout=5).close()
    except psycopg.OperationalError as err:
        sys.exit(
            f"workers benchmark: no PostgreSQL at {args.url}: {' '.join(str(err).split())} (source .ci/services.sh && start_postgres)"
        )
    table = Table("workers")
    print(f"worker pool on PostgreSQL, lease {args.lease:g} s; a shared 2-core machine: numbers are noisy")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pickups = [pickup_once(args.url, tmp, args.lease) for _ in range(args.pickups)]
        worst = max(pickups)
        table.add(
            f"killed worker's session picked up (median of {len(pickups)})",
            f"{statistics.median(pickups):.2f} s",
            f"lease {args.lease:g} s",
        )
        table.add(
            f"killed worker's session picked up (worst of {len(pickups)})",
            f"{worst:.2f} s",
            f"lease {args.lease:g} s",
            f"<= {args.lease + 2:g} s",
            worst <= args.lease + 2,
        )
        rates = {}
        for n in (1, 2, 4):
            rates[n] = throughput(args.url, tmp, n, args.sessions, args.lease)
            table.add(
                f"throughput, {n} worker{'s' if n > 1 else ''} ({args.sessions} scripted sessions)",
                f"{rates[n]:.1f} sess/min",
                f"1 worker {rates[1]:.1f} sess/min",
                f"x{rates[n] / rates[1]:.2f}",
            )
        recovery = fault_recovery(table, tmp, args.lease, args.faults) if args.faults else {}
    print("  curve: " + "  ".join(f"{n} workers {r:.1f}/min" for n, r in rates.items()))
    print(f"  -> {table.save({'pickups_s': pickups, 'throughput_per_min': rates, 'fault_recovery_s': recovery})}")


if __name__ == "__main__":
    main()
