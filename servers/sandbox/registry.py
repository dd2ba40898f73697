"""The server's record of its sandboxes: a small SQLite file in the data dir.

A restarted server reads it back, so a `sandbox_id` handed out before the restart still
works where the backend kept the sandbox. Destroyed and lost sandboxes stay as
tombstones, so their ids answer `sandbox_lost` rather than `not_found`, until `prune`
removes destroyed ones older than the retention (a tombstone's `last_used_at` is when it
ended). Every query a tool or the reaper makes is served by an index, and listings page.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from corral.diskfull import naming_disk_full

from .backend import SandboxRef

__all__ = ["Record", "Registry"]

State = Literal["running", "lost", "destroyed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    state TEXT NOT NULL,
    label TEXT,
    idempotency_key TEXT,
    ref TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    idle_timeout_s REAL NOT NULL,
    last_used_at REAL NOT NULL,
    reason TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS sandboxes_idem ON sandboxes(backend, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND state = 'running';
-- live sandboxes in listing order (partial: tombstones cost a page nothing); old tombstones
CREATE INDEX IF NOT EXISTS sandboxes_live ON sandboxes(backend, created_at, id) WHERE state IN ('running', 'lost');
CREATE INDEX IF NOT EXISTS sandboxes_ended ON sandboxes(backend, state, last_used_at);
-- A client's default sandbox, by the client's durable key (its session id, or "default" for
-- whoever sends none: this registry is per CORRAL_HOME), so it outlives restarts of both ends.
CREATE TABLE IF NOT EXISTS defaults (
    backend TEXT NOT NULL,
    client TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    PRIMARY KEY (backend, client)
);
"""
_LIVE_SQL = "state IN ('running', 'lost')"  # the partial index's own condition, verbatim, so queries use it
LIVE = ("running", "lost")


class Record(BaseModel):
    id: str
    backend: str
    state: State
    label: str | None
    idempotency_key: str | None
    ref: SandboxRef
    created_at: float
    expires_at: float
    idle_timeout_s: float
    last_used_at: float
    reason: str | None = None

    def reapable(self, now: float) -> str | None:
        """Why this sandbox should be reaped now, if it should."""
        if self.state == "lost":
            return "lost"
        if now >= self.expires_at:
            return "expired"
        if now - self.last_used_at >= self.idle_timeout_s:
            return "idle"
        return None


class Registry:
    """SQLite in WAL mode; one connection guarded by a lock (calls are sub-millisecond)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._open()

    def _open(self) -> sqlite3.Connection:
        with naming_disk_full(self.path.parent):
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        self._conn = db
        return db

    @property
    def _db(self) -> sqlite3.Connection:
        """The connection; a registry closed at a server's shutdown reopens if it is used again
        (an in-process server is run again by its next client)."""
        return self._conn or self._open()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write under the lock; a full disk is named (each statement commits alone, so a
        failed one leaves nothing behind, and the next write after space is freed succeeds)."""
        with self._lock, naming_disk_full(self.path.parent):
            yield

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _row(self, row: tuple) -> Record:
        keys = (
            "id",
            "backend",
            "state",
            "label",
            "idempotency_key",
            "ref",
            "created_at",
            "expires_at",
            "idle_timeout_s",
            "last_used_at",
            "reason",
        )  # the columns of `sandboxes`, in order
        data = dict(zip(keys, row, strict=True))
        data["ref"] = SandboxRef.model_validate_json(data["ref"])
        return Record(**data)

    def add(self, record: Record) -> None:
        with self._writing():
            self._db.execute(
                "INSERT INTO sandboxes VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (record.id, record.backend, record.state, record.label, record.idempotency_key,
                 record.ref.model_dump_json(), record.created_at, record.expires_at, record.idle_timeout_s,
                 record.last_used_at, record.reason),
            )  # fmt: skip

    def get(self, sandbox_id: str) -> Record | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
        return self._row(row) if row else None

    def by_idempotency_key(self, backend: str, key: str) -> Record | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM sandboxes WHERE backend = ? AND idempotency_key = ? AND state = 'running'",
                (backend, key),
            ).fetchone()
        return self._row(row) if row else None

    def running(self, backend: str) -> list[Record]:
        return self.all(backend, states=LIVE)

    def page(self, backend: str, after: tuple[float, str] | None, limit: int) -> list[Record]:
        """Live sandboxes in creation order, the `limit` after the (created_at, id) key `after`:
        one index range, as cheap at the 10,000th sandbox as at the first."""
        key = after or (float("-inf"), "")
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM sandboxes WHERE backend = ? AND {_LIVE_SQL} AND (created_at, id) > (?, ?)"
                " ORDER BY created_at, id LIMIT ?",
                (backend, *key, limit),
            ).fetchall()
        return [self._row(r) for r in rows]

    def reapable(self, backend: str, now: float) -> list[Record]:
        """Live sandboxes that are lost, expired or idle at `now` (the reaper's one query)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM sandboxes WHERE backend = ? AND {_LIVE_SQL}"
                " AND (state = 'lost' OR expires_at <= ? OR last_used_at + idle_timeout_s <= ?) ORDER BY created_at, id",
                (backend, now, now),
            ).fetchall()
        return [self._row(r) for r in rows]

    def prune(self, backend: str, before: float) -> int:
        """Forget destroyed sandboxes that ended before `before`; returns how many."""
        with self._writing():
            return self._db.execute(
                "DELETE FROM sandboxes WHERE backend = ? AND state = 'destroyed' AND last_used_at < ?",
                (backend, before),
            ).rowcount

    def all(self, backend: str, states: tuple[str, ...] = ("running", "lost", "destroyed")) -> list[Record]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM sandboxes WHERE backend = ? AND state IN ({marks}) ORDER BY created_at",
                (backend, *states),
            ).fetchall()
        return [self._row(r) for r in rows]

    def touch(self, sandbox_id: str, now: float | None = None) -> None:
        with self._writing():
            self._db.execute("UPDATE sandboxes SET last_used_at = ? WHERE id = ?", (now or time.time(), sandbox_id))

    def set_state(self, sandbox_id: str, state: State, reason: str | None = None) -> None:
        """Also stamps `last_used_at`: for a tombstone, when it ended (what `prune` goes by)."""
        with self._writing():
            self._db.execute(
                "UPDATE sandboxes SET state = ?, reason = ?, last_used_at = ? WHERE id = ?",
                (state, reason, time.time(), sandbox_id),
            )

    # -- default sandboxes bound to clients -------------------------------------------

    def bound(self, backend: str, client: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT sandbox_id FROM defaults WHERE backend = ? AND client = ?", (backend, client)
            ).fetchone()
        return row[0] if row else None

    def bind(self, backend: str, client: str, sandbox_id: str) -> None:
        with self._writing():
            self._db.execute("INSERT OR REPLACE INTO defaults VALUES (?,?,?)", (backend, client, sandbox_id))

    def unbind(self, sandbox_id: str) -> None:
        with self._writing():
            self._db.execute("DELETE FROM defaults WHERE sandbox_id = ?", (sandbox_id,))
