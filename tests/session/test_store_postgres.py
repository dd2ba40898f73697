"""The store contract on a real PostgreSQL, plus what only PostgreSQL has (schema versions, the pool)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from corral.errors import Unavailable
from corral.servers.session import NewEvent, open_store
from corral.servers.session.postgres import SCHEMA_VERSION, PostgresEventStore
from tests.session.contract import StoreContract
from tests.session.pg import pg_schema_url  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postgres


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def store_url(self, pg_schema_url):  # noqa: F811
        return pg_schema_url


def test_schema_is_created_versioned_and_reopening_migrates_nothing(pg_schema_url):  # noqa: F811
    store = open_store(pg_schema_url)
    assert isinstance(store, PostgresEventStore) and store.schema_version() == SCHEMA_VERSION
    sid = store.create().session_id
    store.append(sid, [NewEvent(type="user.message", data={"text": "hi"})])
    store.close()
    again = open_store(pg_schema_url)
    try:
        assert again.schema_version() == SCHEMA_VERSION and again.get(sid).length == 1
    finally:
        again.close()
    with psycopg.connect(pg_schema_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM corral_schema_version ORDER BY version")]
        pk = conn.execute(
            "SELECT array_agg(a.attname ORDER BY array_position(i.indkey, a.attnum)) FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = 'corral_events'::regclass AND i.indisprimary"
        ).fetchone()[0]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert pk == ["session_id", "position"]


def test_an_old_schema_is_migrated_in_place_keeping_its_data(pg_schema_url):  # noqa: F811
    from corral.servers.session.postgres import MIGRATIONS

    with psycopg.connect(pg_schema_url) as conn:  # a database a version-1 corral made
        conn.execute("CREATE TABLE corral_schema_version (version INTEGER NOT NULL)")
        conn.execute(MIGRATIONS[0])
        conn.execute("INSERT INTO corral_schema_version VALUES (1)")
        conn.execute("INSERT INTO corral_sessions (session_id, metadata, length) VALUES ('old', '{}', 1)")
        conn.execute(
            "INSERT INTO corral_events (session_id, position, event_id, type, data) VALUES ('old', 0, 'e0', 'user.message', '{\"text\": \"hi\"}')"
        )
    store = open_store(pg_schema_url)
    try:
        assert store.schema_version() == SCHEMA_VERSION > 1
        assert [e.data for e in store.select("old")] == [{"text": "hi"}]
        lease = store.acquire_lease("old", "w", ttl_s=30)
        store.append("old", [NewEvent(type="agent.message", data={})], lease=lease.token)
    finally:
        store.close()
    with psycopg.connect(pg_schema_url) as conn:
        tokens = [
            r[0]
            for r in conn.execute("SELECT lease_token FROM corral_events WHERE session_id = 'old' ORDER BY position")
        ]
    assert tokens == [None, lease.token]


def test_forks_a_version_2_store_made_read_through_their_lineage(pg_schema_url):  # noqa: F811
    from corral.servers.session.postgres import MIGRATIONS

    with psycopg.connect(pg_schema_url) as conn:  # version 2 kept no lineage on the row
        conn.execute("CREATE TABLE corral_schema_version (version INTEGER NOT NULL)")
        for version in (1, 2):
            conn.execute(MIGRATIONS[version - 1])
            conn.execute("INSERT INTO corral_schema_version VALUES (%s)", (version,))
        for sid, parent, at, length in (("root", None, None, 3), ("fork", "root", 2, 3), ("deeper", "fork", 3, 3)):
            conn.execute(
                "INSERT INTO corral_sessions (session_id, metadata, parent, forked_at, length) VALUES (%s, '{}', %s, %s, %s)",
                (sid, parent, at, length),
            )
        for sid, pos in (("root", 0), ("root", 1), ("root", 2), ("fork", 2)):
            conn.execute(
                "INSERT INTO corral_events (session_id, position, event_id, type, data) VALUES (%s, %s, %s, 'x.y', %s)",
                (sid, pos, f"{sid}{pos}", f'{{"i": "{sid}{pos}"}}'),
            )
    store = open_store(pg_schema_url)
    try:
        assert [e.data["i"] for e in store.select("deeper")] == ["root0", "root1", "fork2"]
        assert store.find_event("deeper", "root1").position == 1 and store.append(
            "deeper", [NewEvent(type="x.y", data={}, event_id="fork2")]
        ) == [2]
    finally:
        store.close()


def test_a_newer_schema_is_refused_not_downgraded(pg_schema_url):  # noqa: F811
    open_store(pg_schema_url).close()
    with psycopg.connect(pg_schema_url) as conn:
        conn.execute("INSERT INTO corral_schema_version VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(Unavailable, match="newer than this corral"):
        open_store(pg_schema_url)


def test_slices_are_index_seeks(pg_schema_url):  # noqa: F811
    store = open_store(pg_schema_url)
    try:
        sid = store.create().session_id
        store.append(sid, [NewEvent(type="x.y", data={"i": i}) for i in range(2000)])
    finally:
        store.close()
    with psycopg.connect(pg_schema_url) as conn:
        conn.execute("ANALYZE corral_events")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT * FROM corral_events WHERE session_id = %s AND position >= 1500 AND position < 1600 ORDER BY position",
                (sid,),
            )
        )
    # An index range scan (plain or bitmap) over the primary key, never a table scan.
    assert "Index Cond" in plan and "corral_events_pkey" in plan and "Seq Scan" not in plan, plan


def test_sqlite_only_options_are_refused_not_ignored(pg_schema_url):  # noqa: F811
    # SessionSettings.open_store passes CORRAL_SQLITE_SYNCHRONOUS to SQLite only; a
    # durability knob the store would ignore must not look accepted.
    with pytest.raises(TypeError, match="synchronous"):
        open_store(pg_schema_url, synchronous="FULL")


PAUSE_IN_A_TRANSACTION = """
import os, signal, sys
from corral.servers.session import open_store
store = open_store(sys.argv[1], idle_tx_timeout_s=1)
with store._tx() as conn:  # what an append does first: lock the session's row
    conn.execute("SELECT 1 FROM corral_sessions WHERE session_id = %s FOR NO KEY UPDATE", (sys.argv[2],))
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # paused (or swapped out, or cut off) holding it
    conn.execute("SELECT 1")
"""


def test_a_process_paused_inside_a_transaction_does_not_block_the_session(pg_schema_url):  # noqa: F811
    # A worker SIGSTOPped mid-append held the session's row lock, and every other writer
    # waited on it forever (a CI run saw the next worker never take the lease over).
    store = open_store(pg_schema_url)
    sid = store.create().session_id
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSE_IN_A_TRANSACTION, pg_schema_url, sid],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        written: list[int] = []
        started = time.monotonic()
        writer = threading.Thread(
            target=lambda: written.extend(store.append(sid, [NewEvent(type="user.message", data={})])), daemon=True
        )
        writer.start()
        writer.join(timeout=10)
        waited = time.monotonic() - started
        assert written == [0], f"the append was still blocked after {waited:.1f}s"
        assert 0.5 < waited < 5, f"{waited:.1f}s: the lock was not held, or held past the 1 s idle-transaction timeout"
        os.kill(child.pid, signal.SIGCONT)
        _, err = child.communicate(timeout=30)
        assert child.returncode != 0 and "terminat" in err, err  # its transaction was ended for it: it wrote nothing
        assert store.length(sid) == 1
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
        store.close()


def test_unreachable_server_is_unavailable_with_a_hint():
    with pytest.raises(Unavailable, match="cannot open the PostgreSQL session store") as err:
        open_store("postgresql://corral:corral@127.0.0.1:1/none", connect_timeout_s=2)
    assert "CORRAL_SESSION_STORE" in str(err.value)


@pytest.mark.anyio
async def test_the_session_tools_over_postgres(pg_schema_url):  # noqa: F811
    """`corral serve session` with CORRAL_SESSION_STORE=postgresql://...: the tools a client sees."""
    import json

    from mcp.client import Client

    from corral.servers.session.server import build_server

    store = open_store(pg_schema_url)
    try:
        async with Client(build_server(store)) as client:

            async def call(name, **args):
                result = await client.call_tool(name, args)
                return result.is_error, (
                    json.loads(result.content[0].text) if not result.is_error else result.content[0].text
                )

            _, created = await call("create_session", metadata={"title": "pg"})
            sid = created["session_id"]
            assert (
                await call("emit_event", session_id=sid, type="user.message", data={"text": "hi"}, expected_position=0)
            )[1]["position"] == 0
            is_error, text = await call(
                "emit_event", session_id=sid, type="user.message", data={"text": "again"}, expected_position=0
            )
            assert is_error and "conflict" in text
            lease = store.acquire_lease(sid, "worker-x", ttl_s=30)
            _, info = await call("get_session", session_id=sid)
            assert (
                info["length"] == 1 and info["lease"]["worker"] == "worker-x" and info["lease"]["token"] == lease.token
            )
    finally:
        store.close()
