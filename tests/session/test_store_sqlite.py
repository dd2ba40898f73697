"""The store contract on SQLite, plus what only SQLite has (WAL, the file on disk)."""

from __future__ import annotations

import sqlite3

import pytest

from corral.errors import Unavailable
from corral.servers.session import open_store
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
