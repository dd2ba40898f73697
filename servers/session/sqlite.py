"""The SQLite event store: the embedded default.

WAL mode, `PRIMARY KEY (session_id, position)` so a racing append fails instead of
overwriting, `BEGIN IMMEDIATE` so concurrent writers (threads or processes) queue on
the database lock. With `synchronous=NORMAL` a committed append survives a process
crash (it is in the WAL before `append` returns); `FULL` also survives power loss.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from corral.errors import Conflict, InvalidArgument, NotFound, Unavailable
from corral.servers.session import rules
from corral.servers.session.rules import Segment
from corral.servers.session.store import DEFAULT_MAX_EVENT_BYTES, Event, EventStore, Lease, NewEvent, SessionInfo, check_range, encode_data, new_id

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    metadata   TEXT NOT NULL,
    parent     TEXT,
    forked_at  INTEGER,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_created ON sessions (created_at);
CREATE INDEX IF NOT EXISTS sessions_parent ON sessions (parent);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL,
    position   INTEGER NOT NULL,
    event_id   TEXT NOT NULL,
    type       TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, position)
);
CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events (session_id, event_id);
CREATE INDEX IF NOT EXISTS events_type ON events (session_id, type, position);
CREATE TABLE IF NOT EXISTS leases (
    session_id TEXT PRIMARY KEY,
    owner      TEXT,
    token      INTEGER NOT NULL,
    expires_at REAL
);
"""
COLUMNS = "session_id, position, event_id, type, data, created_at"


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, tz=UTC)


def _event(reader: str, row: tuple[Any, ...]) -> Event:
    _, pos, eid, typ, data, created = row
    return Event(session_id=reader, position=pos, event_id=eid, type=typ, data=json.loads(data), created_at=_ts(created))


class SQLiteEventStore(EventStore):
    def __init__(self, path: str | os.PathLike[str], *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, synchronous: str = "NORMAL", busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.max_event_bytes = max_event_bytes
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN ourselves (BEGIN IMMEDIATE for writes).
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._db.executescript(f"BEGIN IMMEDIATE;{SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
        except (sqlite3.Error, OSError) as err:
            raise Unavailable(f"cannot open the session database {path}: {err}", hint="check the path and its permissions (CORRAL_SESSION_STORE / CORRAL_HOME)") from err
        self._lock = threading.RLock()

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the database's write lock from the start."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row_info(self, row: tuple[Any, ...]) -> SessionInfo:
        sid, metadata, parent, forked_at, created_at = row
        return SessionInfo(session_id=sid, metadata=json.loads(metadata), parent=parent, forked_at=forked_at, created_at=_ts(created_at))

    def _info(self, session_id: str) -> SessionInfo:
        row = self._db.execute("SELECT session_id, metadata, parent, forked_at, created_at FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        if row is None:
            raise NotFound(f"session {session_id!r} not found", hint="list_sessions shows the sessions there are")
        return self._row_info(row)

    def _lineage(self, info: SessionInfo) -> list[Segment]:
        return rules.lineage(info, self._info)

    def _length(self, info: SessionInfo) -> int:
        row = self._db.execute("SELECT MAX(position) FROM events WHERE session_id = ?", (info.session_id,)).fetchone()
        if row[0] is not None:
            return row[0] + 1
        return info.forked_at or 0

    def _range(self, reader: str, types: Sequence[str] | None, desc: bool) -> Callable[[str, int, int | None, int | None], list[Event]]:
        """SELECT one owner's rows in [lo, hi), shown as `reader`'s events."""

        def select_range(owner: str, lo: int, hi: int | None, want: int | None) -> list[Event]:
            query, params = rules.range_query(f"SELECT {COLUMNS} FROM events", "?", owner, lo, hi, want, types, desc)
            return [_event(reader, row) for row in self._db.execute(query, params)]

        return select_range

    def _select(self, segments: list[Segment], gte: int, lt: int | None, types: Sequence[str] | None, desc: bool, limit: int | None) -> list[Event]:
        return rules.read_segments(segments, gte, lt, desc, limit, self._range(segments[-1].session_id, types, desc))

    def _stored_ids(self, segments: list[Segment], event_ids: list[str]) -> dict[str, tuple[Any, ...]]:
        """event_id -> row, for those of `event_ids` this lineage shows."""
        marks = ",".join("?" * len(event_ids))
        rows = []
        for owner in {s.session_id for s in segments}:
            rows += self._db.execute(f"SELECT {COLUMNS} FROM events WHERE session_id = ? AND event_id IN ({marks})", (owner, *event_ids)).fetchall()
        return rules.first_visible(segments, rows)

    def _lease(self, session_id: str) -> tuple[str | None, int, float | None]:
        row = self._db.execute("SELECT owner, token, expires_at FROM leases WHERE session_id = ?", (session_id,)).fetchone()
        return row or (None, 0, None)

    def _check_lease(self, session_id: str, token: int) -> None:
        owner, current, _ = self._lease(session_id)
        rules.check_lease(session_id, token, owner, current)

    def _complete(self, info: SessionInfo) -> SessionInfo:
        owner, token, expires = self._lease(info.session_id)
        if owner is not None:
            info.lease = {"worker": owner, "token": token, "expires_at": _ts(expires).isoformat()}
        info.length = self._length(info)
        last = self._select(self._lineage(info), 0, None, [rules.STATUS_EVENT], True, 1)
        info.status = rules.status_of(last[0].data) if last else None
        return info

    # -- the verbs --------------------------------------------------------------------

    def create(self, metadata: dict[str, Any] | None = None, parent: str | None = None, session_id: str | None = None) -> SessionInfo:
        meta = encode_data(metadata or {}, self.max_event_bytes)
        sid = session_id or new_id("ses_")
        with self._lock, self._write() as db:
            if parent is not None:
                self._info(parent)
            try:
                db.execute("INSERT INTO sessions VALUES (?, ?, ?, NULL, ?)", (sid, meta, parent, time.time()))
            except sqlite3.IntegrityError as err:
                raise Conflict(f"session {sid!r} already exists") from err
            return self._info(sid)

    def fork(self, session_id: str, at: int, metadata: dict[str, Any] | None = None) -> SessionInfo:
        meta = encode_data(metadata or {}, self.max_event_bytes)
        with self._lock, self._write() as db:
            source = self._info(session_id)
            length = self._length(source)
            if not 0 <= at <= length:
                raise InvalidArgument(f"fork position {at} is out of range: session {session_id} has {length} events (0..{length})")
            sid = new_id("ses_")
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)", (sid, meta, session_id, at, time.time()))
            return self._complete(self._info(sid))

    def get(self, session_id: str) -> SessionInfo:
        with self._lock:
            return self._complete(self._info(session_id))

    def sessions(self, limit: int = 100, parent: str | None = None) -> list[SessionInfo]:
        check_range(None, None, limit)
        with self._lock:
            sql = "SELECT session_id, metadata, parent, forked_at, created_at FROM sessions"
            params: list[Any] = []
            if parent is not None:
                sql += " WHERE parent = ?"
                params.append(parent)
            sql += " ORDER BY created_at DESC LIMIT ?"
            params.append(limit)
            return [self._complete(self._row_info(r)) for r in self._db.execute(sql, params).fetchall()]

    def append(self, session_id: str, events: Sequence[NewEvent], expected_position: int | None = None, *, lease: int | None = None) -> list[int]:
        encoded = rules.encode_batch(events, expected_position, self.max_event_bytes)
        now = time.time()
        with self._lock, self._write() as db:
            info = self._info(session_id)
            if lease is not None:
                self._check_lease(session_id, lease)
            given = rules.given_ids(events)
            prior = {eid: row[1] for eid, row in self._stored_ids(self._lineage(info), given).items()} if given else {}
            plan = rules.plan_append(session_id, encoded, prior, length=self._length(info), status=None, expected_position=expected_position)
            try:
                db.executemany(f"INSERT INTO events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", [(session_id, *row, now) for row in plan.rows])
            except sqlite3.IntegrityError as err:  # defends against a writer that bypassed the lock
                raise Conflict(f"concurrent append to session {session_id}; nothing was written") from err
            return plan.positions

    def select(self, session_id: str, *, gte: int | None = None, lt: int | None = None, types: Sequence[str] | None = None, desc: bool = False, limit: int | None = None) -> list[Event]:
        check_range(gte, lt, limit)
        if limit == 0:
            with self._lock:
                self._info(session_id)
            return []
        with self._lock:
            return self._select(self._lineage(self._info(session_id)), gte or 0, lt, types, desc, limit)

    def find_event(self, session_id: str, event_id: str) -> Event:
        with self._lock:
            found = self._stored_ids(self._lineage(self._info(session_id)), [event_id]).get(event_id)
        if found is None:
            raise NotFound(f"no event {event_id!r} in session {session_id}")
        return _event(session_id, found)

    # -- leases (fencing tokens for the worker pool) --------------------------------------

    def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> Lease:
        with self._lock, self._write() as db:
            self._info(session_id)
            held_by, token, expires = self._lease(session_id)
            now = time.time()
            if held_by is not None and held_by != owner and expires is not None and expires > now:
                raise Conflict(f"session {session_id} is leased to {held_by} until {_ts(expires).isoformat()}", hint="wait for the lease to expire or be released")
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)", (session_id, owner, token + 1, now + ttl_s))
            return Lease(session_id=session_id, owner=owner, token=token + 1, expires_at=_ts(now + ttl_s))

    def renew_lease(self, session_id: str, token: int, ttl_s: float) -> Lease:
        with self._lock, self._write() as db:
            self._info(session_id)
            self._check_lease(session_id, token)
            expires = time.time() + ttl_s
            db.execute("UPDATE leases SET expires_at = ? WHERE session_id = ?", (expires, session_id))
            return Lease(session_id=session_id, owner=self._lease(session_id)[0], token=token, expires_at=_ts(expires))

    def release_lease(self, session_id: str, token: int) -> bool:
        with self._lock, self._write() as db:
            return db.execute("UPDATE leases SET owner = NULL, expires_at = NULL WHERE session_id = ? AND token = ?", (session_id, token)).rowcount == 1
