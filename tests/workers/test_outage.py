"""Database faults under a running fleet: PostgreSQL restarted (`pg_ctl restart -m fast`) or
stopped for 20 s while three `corral worker`s run six sessions of the reference harness.

Every session completes, each tool command ran exactly once (`append_line` is not
idempotent: a re-run shows as a second line), no recorded model call is asked again, every
history is valid, and every worker is still alive at the end. The cluster is the tests'
own (`private_pg.py`): the shared server must never go down under other tests.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import psycopg
import pytest

from corral.harness.pool import submit
from corral.servers.session import Event, open_store
from tests.harness.fake_anthropic import FakeAnthropic, Script, Turn, text, tool
from tests.session.pg import with_search_path
from tests.workers.helpers import Worker, harness_env, wait_until
from tests.workers.private_pg import private_pg  # noqa: F401 - fixture

pytestmark = [pytest.mark.requires("postgres"), pytest.mark.slow]
SESSIONS = 6
LEASE = 4.0


def script() -> Script:
    def turns(i: int) -> list:
        return [
            Turn([text(f"writing {i}"), tool("toolbox__append_line", {"text": f"s{i}-a"})]),
            Turn([tool("toolbox__slow", {"seconds": 0.3})]),
            Turn([tool("toolbox__append_line", {"text": f"s{i}-b"})]),
            Turn([text(f"done {i}")]),
        ]

    return Script({f"OUTAGE-{i}:": turns(i) for i in range(SESSIONS)})


def fresh_schema(url: str) -> str:
    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return with_search_path(url, schema)


def assert_valid_history(log: list[Event]) -> None:
    assert [e.position for e in log] == list(range(len(log)))
    uses = [e.data["id"] for e in log if e.type == "agent.tool_use"]
    results = Counter(e.data["tool_use_id"] for e in log if e.type == "agent.tool_result")
    assert len(uses) == len(set(uses)) == 3 and set(results) == set(uses), (uses, results)
    assert all(n == 1 for n in results.values()), f"a tool_use without exactly one result: {results}"
    spans = [e.data["message_id"] for e in log if e.type == "span.model_request"]
    assert len(spans) == len(set(spans)) == 4


def run_fleet_through(cluster, tmp_path, fault) -> dict:
    """Six sessions, three workers, `fault(cluster)` once some tool has run; returns what happened."""
    url = fresh_schema(cluster.url)
    store = open_store(url)
    pool: list[Worker] = []
    lines = tmp_path / "toolbox" / "lines.txt"
    with FakeAnthropic(script(), delay_s=0.1) as fake:
        try:
            sids = [submit(store, url, f"OUTAGE-{i}: write two lines") for i in range(SESSIONS)]
            for name in ("a", "b", "c"):
                env = {**harness_env(tmp_path, fake, name), "CORRAL_WORKER_OUTAGE_S": "120"}
                pool.append(
                    Worker(url, name, tmp_path, lease=LEASE, body="corral.harness.pool_body:harness_body", env=env)
                )
            wait_until("a tool ran", lambda: lines.exists() and lines.read_text().strip(), timeout=120, every=0.02)
            back_at = fault(cluster)
            wait_until(
                "every session idle", lambda: all(store.get(s).status == "idle" for s in sids), timeout=240, every=0.25
            )
            alive = [w.name for w in pool if w.proc.poll() is None]
        finally:
            logs = {w.name: w.log() for w in pool}
            for w in pool:
                w.stop()
        requests = list(fake.requests)
    histories = {sid: store.select(sid) for sid in sids}
    store.close()
    return {
        "sids": sids,
        "histories": histories,
        "alive": alive,
        "logs": logs,
        "lines": lines.read_text().splitlines(),
        "requests": requests,
        "back_at": back_at,
    }


def check(outcome: dict) -> None:
    assert outcome["alive"] == ["a", "b", "c"], {k: v[-3000:] for k, v in outcome["logs"].items()}
    assert sorted(outcome["lines"]) == sorted(f"s{i}-{x}" for i in range(SESSIONS) for x in "ab"), (
        "each command ran exactly once"
    )
    for i, sid in enumerate(outcome["sids"]):
        log = outcome["histories"][sid]
        assert_valid_history(log)
        assert [e.data["text"] for e in log if e.type == "agent.message"][-1] == f"done {i}"
        assert not [e for e in log if e.type == "session.status" and e.data.get("status") == "failed"], (
            f"session {i} failed on the way"
        )
        for turn, span in enumerate(e for e in log if e.type == "span.model_request"):
            late = [
                r
                for r in outcome["requests"]
                if r.key == (f"OUTAGE-{i}:", turn) and r.received > span.created_at.timestamp()
            ]
            assert not late, f"session {i} turn {turn} was requested again after it was recorded"


@pytest.mark.parametrize("run", range(3))
def test_a_database_restart_fails_no_session(private_pg, tmp_path, run):  # noqa: F811
    check(run_fleet_through(private_pg, tmp_path, lambda c: c.restart()))


@pytest.mark.parametrize("run", range(2))
def test_a_20s_database_outage_fails_no_session(private_pg, tmp_path, run):  # noqa: F811
    check(run_fleet_through(private_pg, tmp_path, lambda c: c.down_for(20)))


def test_the_clock_of_the_outage(private_pg):  # noqa: F811
    """The fixture's own faults do what they say: connections cut by a restart, refused while stopped."""
    with psycopg.connect(private_pg.url) as conn:
        private_pg.restart()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    private_pg.stop()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(private_pg.url, connect_timeout=2)
    assert time.monotonic() - started < 2
    private_pg.start()
    psycopg.connect(private_pg.url).close()
