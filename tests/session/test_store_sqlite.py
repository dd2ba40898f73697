"""The store contract on SQLite, plus what only SQLite has (WAL, the file on disk)."""

from __future__ import annotations

import sqlite3

import pytest

from corral.errors import Unavailable
from corral.servers.session import NewEvent, open_store
from tests.conftest import fill_disk
from tests.session.contract import StoreContract


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def store_url(self, tmp_path):
        return f"sqlite:///{tmp_path / 'sessions.db'}"


def test_database_is_in_wal_mode_with_the_primary_key(tmp_path):
    path = tmp_path / "s.db"
    open_store(str(path)).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    pk = [r[1] for r in db.execute("PRAGMA table_info(events)").fetchall() if r[5]]
    assert pk == ["session_id", "position"]


def test_unopenable_path_is_unavailable_with_a_hint(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(Unavailable, match="cannot open the session database"):
        open_store(str(blocker / "sub" / "s.db"))


# What a version-1 corral (before length, status and lineage were kept on the row) wrote.
VERSION_1 = """
CREATE TABLE sessions (session_id TEXT PRIMARY KEY, metadata TEXT NOT NULL, parent TEXT, forked_at INTEGER, created_at REAL NOT NULL);
CREATE INDEX sessions_created ON sessions (created_at);
CREATE INDEX sessions_parent ON sessions (parent);
CREATE TABLE events (session_id TEXT NOT NULL, position INTEGER NOT NULL, event_id TEXT NOT NULL, type TEXT NOT NULL,
    data TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (session_id, position));
CREATE UNIQUE INDEX events_event_id ON events (session_id, event_id);
CREATE INDEX events_type ON events (session_id, type, position);
CREATE TABLE leases (session_id TEXT PRIMARY KEY, owner TEXT, token INTEGER NOT NULL, expires_at REAL);
INSERT INTO sessions VALUES ('root', '{"title": "old"}', NULL, NULL, 1.0);
INSERT INTO events VALUES ('root', 0, 'r0', 'session.status', '{"status": "running"}', 1.0);
INSERT INTO events VALUES ('root', 1, 'r1', 'user.message', '{"i": 1}', 1.0);
INSERT INTO events VALUES ('root', 2, 'r2', 'session.status', '{"status": 3}', 1.0);
INSERT INTO sessions VALUES ('fork', '{}', 'root', 2, 2.0);
INSERT INTO events VALUES ('fork', 2, 'f2', 'agent.message', '{"i": 20}', 2.0);
INSERT INTO sessions VALUES ('deeper', '{}', 'fork', 3, 3.0);
INSERT INTO sessions VALUES ('empty', '{}', 'root', 0, 4.0);
INSERT INTO leases VALUES ('root', 'w1', 4, 4e9);
PRAGMA user_version = 1;
"""


def test_a_database_an_older_corral_made_opens_and_works(tmp_path):
    path = tmp_path / "sessions.db"
    db = sqlite3.connect(path)
    db.executescript(VERSION_1)
    db.close()
    store = open_store(str(path))
    try:
        got = {s.session_id: (s.length, s.status) for s in store.sessions()}
        assert got == {"root": (3, "3"), "fork": (3, "running"), "deeper": (3, "running"), "empty": (0, None)}
        assert [e.data["i"] for e in store.select("deeper", types=["user.message", "agent.message"])] == [1, 20]
        assert store.get("root").lease["token"] == 4 and store.get("root").metadata == {"title": "old"}
        assert store.append(
            "deeper", [NewEvent(type="x.y", data={}), NewEvent(type="x.y", data={}, event_id="r1")]
        ) == [3, 1]
        assert store.fork("deeper", 4).length == 4 and store.find_event("deeper", "f2").position == 2
    finally:
        store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
    open_store(str(path)).close()  # and it opens again, migrating nothing


def test_a_newer_database_is_refused_not_downgraded(tmp_path):
    path = tmp_path / "sessions.db"
    open_store(str(path)).close()
    sqlite3.connect(path).execute("PRAGMA user_version = 99").connection.close()
    with pytest.raises(Unavailable, match="newer than this corral"):
        open_store(str(path))


@pytest.mark.anyio
async def test_a_full_disk_is_named_and_appends_resume_once_space_is_freed(small_disk):
    from mcp.client import Client

    from corral.servers.session.server import build_server

    store = open_store(str(small_disk / "sessions.db"))
    sid = store.create().session_id
    filler = fill_disk(small_disk, leave=256 << 10)  # leave a little room
    acknowledged: list[int] = []
    try:
        async with Client(build_server(store)) as client:
            for i in range(2000):
                result = await client.call_tool(
                    "emit_event", {"session_id": sid, "type": "user.message", "data": {"i": i, "pad": "x" * 900}}
                )
                if result.is_error:
                    break
                acknowledged.append(result.structured_content["position"])
            assert result.is_error, "the disk never filled up"
            assert result.content[0].text.endswith(
                f"unavailable: no space left on device (free space under {small_disk})"
            )
            assert len(acknowledged) > 10 and acknowledged == list(range(len(acknowledged)))
            again = await client.call_tool("emit_event", {"session_id": sid, "type": "user.message", "data": {"i": -1}})
            assert again.is_error and "no space left on device" in again.content[0].text
            filler.unlink()  # space is freed: the same store, not reopened, takes appends again
            resumed = await client.call_tool(
                "emit_event", {"session_id": sid, "type": "user.message", "data": {"i": "after"}}
            )
            assert not resumed.is_error, resumed.content
            assert resumed.structured_content["position"] == len(acknowledged)
    finally:
        store.close()
    reopened = open_store(str(small_disk / "sessions.db"))
    try:
        events = reopened.select(sid)
    finally:
        reopened.close()
    assert [e.data["i"] for e in events] == [*range(len(acknowledged)), "after"]
