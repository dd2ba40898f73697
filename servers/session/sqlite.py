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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from corral.errors import Conflict, InvalidArgument, NotFound, Unavailable
from corral.servers.session.store import (
    DEFAULT_MAX_EVENT_BYTES,
    Event,
    EventStore,
    Lease,
    LeaseLost,
    NewEvent,
    Segment,
    SessionInfo,
    check_range,
    clip_segments,
    encode_data,
    new_id,
)

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
        """Segments in position order: ancestors' shared prefixes, then the session's own rows."""
        segments = [Segment(session_id=info.session_id, start=info.forked_at or 0, end=None)]
        while info.forked_at is not None and info.parent is not None:
            end = info.forked_at
            info = self._info(info.parent)
            segments.insert(0, Segment(session_id=info.session_id, start=info.forked_at or 0, end=end))
        return segments

    def _length(self, info: SessionInfo) -> int:
        row = self._db.execute("SELECT MAX(position) FROM events WHERE session_id = ?", (info.session_id,)).fetchone()
        if row[0] is not None:
            return row[0] + 1
        return info.forked_at or 0

    def _select(self, segments: list[Segment], gte: int, lt: int | None, types: Sequence[str] | None, desc: bool, limit: int | None) -> list[Event]:
        out: list[Event] = []
        for seg_id, lo, hi in clip_segments(segments, gte, lt, desc):
            want = None if limit is None else limit - len(out)
            if want is not None and want <= 0:
                break
            sql = f"SELECT {COLUMNS} FROM events WHERE session_id = ? AND position >= ?"
            params: list[Any] = [seg_id, lo]
            if hi is not None:
                sql += " AND position < ?"
                params.append(hi)
            if types:
                sql += f" AND type IN ({','.join('?' * len(types))})"
                params.extend(types)
            sql += " ORDER BY position DESC" if desc else " ORDER BY position"
            if want is not None:
                sql += " LIMIT ?"
                params.append(want)
            for sid, pos, eid, typ, data, created in self._db.execute(sql, params):
                out.append(Event(session_id=segments[-1].session_id, position=pos, event_id=eid, type=typ, data=json.loads(data), created_at=_ts(created)))
        return out

    def _find(self, segments: list[Segment], event_id: str) -> Event | None:
        for seg in segments:
            row = self._db.execute(f"SELECT {COLUMNS} FROM events WHERE session_id = ? AND event_id = ?", (seg.session_id, event_id)).fetchone()
            if row and row[1] >= seg.start and (seg.end is None or row[1] < seg.end):
                _, pos, eid, typ, data, created = row
                return Event(session_id=segments[-1].session_id, position=pos, event_id=eid, type=typ, data=json.loads(data), created_at=_ts(created))
        return None

    def _lease(self, session_id: str) -> tuple[str | None, int, float | None]:
        row = self._db.execute("SELECT owner, token, expires_at FROM leases WHERE session_id = ?", (session_id,)).fetchone()
        return row or (None, 0, None)

    def _check_lease(self, session_id: str, token: int) -> None:
        """Refuse a write under a lease that was released or taken over by another holder."""
        owner, current, _ = self._lease(session_id)
        if owner is None or current != token:
            holder = "nobody" if owner is None else f"{owner} (lease {current})"
            raise LeaseLost(
                f"lease {token} on session {session_id} is no longer held (now: {holder}); nothing was written",
            )

    def _complete(self, info: SessionInfo) -> SessionInfo:
        owner, token, expires = self._lease(info.session_id)
        if owner is not None:
            info.lease = {"worker": owner, "token": token, "expires_at": _ts(expires).isoformat()}
        info.length = self._length(info)
        last = self._select(self._lineage(info), 0, None, ["session.status"], True, 1)
        if last and isinstance(last[0].data, dict):
            info.status = last[0].data.get("status")
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
        if expected_position is not None and expected_position < 0:
            raise InvalidArgument(f"expected_position {expected_position} is negative")
        encoded = [(e, encode_data(e.data, self.max_event_bytes)) for e in events]
        now = time.time()
        with self._lock, self._write() as db:
            info = self._info(session_id)
            if lease is not None:
                self._check_lease(session_id, lease)
            segments = self._lineage(info)
            positions: list[int] = [-1] * len(encoded)
            alias: dict[int, int] = {}  # a repeated event_id within the batch -> its first index
            fresh: list[tuple[int, str, str, str]] = []  # (index, event_id, type, data)
            seen: dict[str, int] = {}
            for i, (event, data) in enumerate(encoded):
                if event.event_id is not None:
                    if event.event_id in seen:
                        alias[i] = seen[event.event_id]
                        continue
                    seen[event.event_id] = i
                    prior = self._find(segments, event.event_id)
                    if prior is not None:
                        positions[i] = prior.position
                        continue
                fresh.append((i, event.event_id or new_id("evt_"), event.type, data))
            if fresh:
                length = self._length(info)
                if expected_position is not None and expected_position != length:
                    raise Conflict(f"expected position {expected_position} but session {session_id} has {length} events; nothing was written")
            rows = []
            for offset, (i, eid, typ, data) in enumerate(fresh):
                positions[i] = length + offset
                rows.append((session_id, length + offset, eid, typ, data, now))
            for i, first in alias.items():
                positions[i] = positions[first]
            try:
                db.executemany(f"INSERT INTO events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.IntegrityError as err:  # defends against a writer that bypassed the lock
                raise Conflict(f"concurrent append to session {session_id}; nothing was written") from err
            return positions

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
            found = self._find(self._lineage(self._info(session_id)), event_id)
        if found is None:
            raise NotFound(f"no event {event_id!r} in session {session_id}")
        return found

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
