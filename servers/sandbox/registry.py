"""The server's record of its sandboxes: a small SQLite file in the data dir.

A restarted server reads it back, so a `sandbox_id` handed out before the restart still
works where the backend kept the sandbox. Destroyed and lost sandboxes stay as
tombstones, so their ids answer `sandbox_lost` rather than `not_found`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

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
-- A client's default sandbox, by the client's durable key (its session id, or "default" for
-- whoever sends none: this registry is per CORRAL_HOME), so it outlives restarts of both ends.
CREATE TABLE IF NOT EXISTS defaults (
    backend TEXT NOT NULL,
    client TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    PRIMARY KEY (backend, client)
);
"""


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
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def _row(self, row: tuple) -> Record:
        keys = ("id", "backend", "state", "label", "idempotency_key", "ref", "created_at", "expires_at")
        keys += ("idle_timeout_s", "last_used_at", "reason")
        data = dict(zip(keys, row))
        data["ref"] = SandboxRef.model_validate_json(data["ref"])
        return Record(**data)

    def add(self, record: Record) -> None:
        with self._lock:
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
                "SELECT * FROM sandboxes WHERE backend = ? AND idempotency_key = ? AND state = 'running'", (backend, key)
            ).fetchone()
        return self._row(row) if row else None

    def running(self, backend: str) -> list[Record]:
        return self.all(backend, states=("running", "lost"))

    def all(self, backend: str, states: tuple[str, ...] = ("running", "lost", "destroyed")) -> list[Record]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM sandboxes WHERE backend = ? AND state IN ({marks}) ORDER BY created_at", (backend, *states)
            ).fetchall()
        return [self._row(r) for r in rows]

    def touch(self, sandbox_id: str, now: float | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE sandboxes SET last_used_at = ? WHERE id = ?", (now or time.time(), sandbox_id))

    def set_state(self, sandbox_id: str, state: State, reason: str | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE sandboxes SET state = ?, reason = ? WHERE id = ?", (state, reason, sandbox_id))

    # -- default sandboxes bound to clients -------------------------------------------

    def bound(self, backend: str, client: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT sandbox_id FROM defaults WHERE backend = ? AND client = ?", (backend, client)).fetchone()
        return row[0] if row else None

    def bind(self, backend: str, client: str, sandbox_id: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO defaults VALUES (?,?,?)", (backend, client, sandbox_id))

    def unbind(self, sandbox_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM defaults WHERE sandbox_id = ?", (sandbox_id,))
