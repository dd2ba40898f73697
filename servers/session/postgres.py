"""The PostgreSQL event store: the scale-out backend (`CORRAL_SESSION_STORE=postgresql://...`).

Same semantics as `sqlite.py` (both pass `tests/session/contract.py`):

- `PRIMARY KEY (session_id, position)`: a slice is an index range scan, and a racing
  append that slipped past the row lock would fail instead of overwrite.
- An append locks its session's row (`SELECT ... FOR NO KEY UPDATE`) for the whole
  transaction, so appends from any number of processes queue per session, positions stay
  dense, and `expected_position` / the lease token are checked against the truth.
- A process that stops inside a transaction (paused, swapped out, cut off) would hold
  that row lock forever; every connection sets `idle_in_transaction_session_timeout`,
  so the server ends such a transaction after `idle_tx_timeout_s` and the others go on.
- The row keeps the session's `length` and `status`, so `get`/`sessions` never scan
  events, and its place in the lineage tree (`lineage.py`), so no call walks a fork's
  ancestry: every call costs the same at fork depth 1 and 1,000.
- The schema lives in tables prefixed `corral_` (a database may hold other things, e.g.
  the worker pool's procrastinate tables); it is created and migrated here, in order,
  under an advisory lock, and its version is kept in `corral_schema_version`. Another
  PostgreSQL schema than `public`: `?options=-csearch_path%3DNAME` in the URL.

Thread-safe: every call borrows a connection from a psycopg_pool ConnectionPool.

Outages. A restart, failover or stopped server is weather, not a bug: every call that
cannot reach the server raises `StoreDown` (an `Unavailable` with a retry hint), and the
same store object serves again once the server is back (the pool checks a connection
before lending it, so a restart's dead connections are replaced, not handed out). While
the server is known down a call waits at most `down_wait_s` for a connection, so a
client hears `unavailable` promptly instead of after the full `connect_timeout_s`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql

from corral.errors import Conflict, NotFound, Unavailable
from corral.servers.session import lineage, rules
from corral.servers.session.store import (
    DEFAULT_MAX_EVENT_BYTES,
    Event,
    EventStore,
    Lease,
    NewEvent,
    SessionInfo,
    check_range,
    encode_data,
    new_id,
)

# Each migration runs once, in order, in one transaction; never edit a released one.
MIGRATIONS: list[str] = [
    # 1: sessions with maintained length/status and a lease (fencing token), events.
    """
    CREATE TABLE corral_sessions (
        seq         BIGSERIAL NOT NULL UNIQUE,
        session_id  TEXT PRIMARY KEY,
        metadata    TEXT NOT NULL,
        parent      TEXT,
        forked_at   BIGINT,
        created_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        length      BIGINT NOT NULL DEFAULT 0,
        status      TEXT,
        lease_owner TEXT,
        lease_token BIGINT NOT NULL DEFAULT 0,
        lease_expires_at TIMESTAMPTZ
    );
    CREATE INDEX corral_sessions_parent ON corral_sessions (parent, seq);
    CREATE TABLE corral_events (
        session_id TEXT NOT NULL,
        position   BIGINT NOT NULL,
        event_id   TEXT NOT NULL,
        type       TEXT NOT NULL,
        data       TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (session_id, position)
    );
    CREATE UNIQUE INDEX corral_events_event_id ON corral_events (session_id, event_id);
    CREATE INDEX corral_events_type ON corral_events (session_id, type, position);
    """,
    # 2: the lease an event was written under (an audit trail of who held the session).
    """
    ALTER TABLE corral_events ADD COLUMN lease_token BIGINT;
    """,
    # 3: each session's lineage node on its row (filled in for existing sessions by
    # `_fill_nodes`), so no call walks a fork's ancestry; event ids indexed first, so a
    # re-sent id is found in one seek.
    """
    ALTER TABLE corral_sessions ADD COLUMN below TEXT;
    ALTER TABLE corral_sessions ADD COLUMN jump TEXT;
    ALTER TABLE corral_sessions ADD COLUMN rank BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE corral_sessions ADD COLUMN base_status TEXT;
    DROP INDEX corral_events_event_id;
    CREATE UNIQUE INDEX corral_events_event_id ON corral_events (event_id, session_id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
MIGRATION_LOCK = 0x636F7272616C  # pg_advisory_xact_lock key ("corral"): one migrator at a time

SESSION_COLUMNS = (
    "session_id, metadata, parent, forked_at, created_at, length, status, lease_owner, lease_token, lease_expires_at"
)
EVENT_COLUMNS = "session_id, position, event_id, type, data, created_at"
NODE_SELECT = "SELECT session_id, COALESCE(forked_at, 0), below, jump, rank, base_status FROM corral_sessions WHERE session_id = %s"
DOWN_HINT = "the session database is unreachable (restarting, failing over, or down); retry in a few seconds"


class StoreDown(Unavailable):
    """The server could not be reached: transient, retrying the same call later is right.

    Appends are safe to retry when their events carry event ids (a commit whose answer was
    lost is then found, not written twice).
    """

    default_hint = DOWN_HINT


class StoreRefused(Unavailable):
    """The server answered, and refused us: bad credentials, no such role or database.

    Not an outage: retrying the same call will not help until a person fixes the
    configuration, so a worker fails the session at once, saying why.
    """

    default_hint = "check the user, password and database in CORRAL_SESSION_STORE (and the server's pg_hba.conf)"


# What the server says when it refuses a login (connection errors carry no SQLSTATE in psycopg).
_REFUSALS = ("authentication failed", "no pg_hba.conf entry", "does not exist")


def refused(err: psycopg.Error) -> bool:
    """True when `err` is the server refusing these credentials, not the server being away."""
    state = getattr(err, "sqlstate", None) or ""
    if state.startswith("28") or state == "3D000":  # invalid authorization; invalid catalog name
        return True
    return not state and any(text in str(err) for text in _REFUSALS)


class PostgresEventStore(EventStore):
    def __init__(
        self,
        url: str,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        min_connections: int = 1,
        max_connections: int = 8,
        connect_timeout_s: float = 10.0,
        idle_tx_timeout_s: float = 5.0,
        down_wait_s: float = 1.0,
    ) -> None:
        self.url = url
        self._wait_s = connect_timeout_s
        self._down_wait_s = min(down_wait_s, connect_timeout_s)
        self._down_since: float | None = None  # monotonic time of the first failure of this outage
        self.max_event_bytes = max_event_bytes
        self._nodes = lineage.NodeCache()
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=min_connections,
            max_size=max_connections,
            timeout=connect_timeout_s,
            check=psycopg_pool.ConnectionPool.check_connection,
            reconnect_timeout=2.0,  # give up a reconnect early: the next borrow starts a fresh one at once, not after an ever longer backoff
            configure=partial(_configure, idle_tx_timeout_ms=max(1, int(idle_tx_timeout_s * 1000))),
            open=False,
            name="corral-session",
        )
        try:
            psycopg.connect(url, connect_timeout=max(1, int(connect_timeout_s))).close()  # fails fast, saying why
            self._pool.open(wait=True, timeout=connect_timeout_s)
            self._migrate()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as err:
            self._pool.close()
            raise Unavailable(
                f"cannot open the PostgreSQL session store: {_one_line(err)}",
                hint="check CORRAL_SESSION_STORE (postgresql://USER:PASSWORD@HOST:PORT/DB) and that the server is up",
            ) from err
        except BaseException:  # e.g. a schema newer than this code: no pool threads left behind
            self._pool.close()
            raise

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        """One transaction on a pooled connection; vendor errors become Corral's."""
        try:
            with ExitStack() as stack:
                yield self._borrow(stack)
        except psycopg_pool.PoolTimeout as err:
            raise self._down(f"no PostgreSQL connection: {_one_line(err)}") from err
        except psycopg.OperationalError as err:
            if refused(err):
                raise StoreRefused(f"the PostgreSQL session store refused this login: {_one_line(err)}") from err
            raise self._down(f"PostgreSQL session store unreachable: {_one_line(err)}") from err
        self._down_since = None

    def _borrow(self, stack: ExitStack) -> psycopg.Connection:
        """A pooled connection: a short wait, then, if none came, ask the server itself
        whether it is down (answer now), refuses us (say so now: no wait will help), or the
        pool is just busy (wait the full time)."""
        try:
            return stack.enter_context(self._pool.connection(timeout=self._down_wait_s))
        except psycopg_pool.PoolTimeout:
            if self._down_since is not None or not self._reachable():
                raise
        return stack.enter_context(self._pool.connection(timeout=self._wait_s))

    def _reachable(self) -> bool:
        """Whether a fresh connection gets through; a refused login raises (it is not an outage)."""
        try:
            psycopg.connect(self.url, connect_timeout=2).close()
        except psycopg.OperationalError as err:
            if refused(err):
                raise
            return False
        return True

    def _down(self, why: str) -> StoreDown:
        if self._down_since is None:
            self._down_since = time.monotonic()
        return StoreDown(f"{why} (down for {time.monotonic() - self._down_since:.0f}s)")

    def _migrate(self) -> None:
        with self._pool.connection() as conn:
            migrate(
                conn,
                table="corral_schema_version",
                lock=MIGRATION_LOCK,
                migrations=MIGRATIONS,
                what="the session database",
                after=lambda version: self._fill_nodes(conn) if version == 3 else None,
            )

    def close(self) -> None:
        self._pool.close()

    def schema_version(self) -> int:
        with self._tx() as conn:
            return _one(conn.execute("SELECT max(version) FROM corral_schema_version").fetchone())[0]

    def _info(self, conn: psycopg.Connection, session_id: str, *, lock: bool = False) -> SessionInfo:
        query = f"SELECT {SESSION_COLUMNS} FROM corral_sessions WHERE session_id = %s" + (
            " FOR NO KEY UPDATE" if lock else ""
        )
        row = conn.execute(query, (session_id,)).fetchone()
        if row is None:
            raise NotFound(f"session {session_id!r} not found", hint="list_sessions shows the sessions there are")
        return _row_info(row)

    def _node(self, conn: psycopg.Connection, session_id: str) -> lineage.Node:
        row = conn.execute(NODE_SELECT, (session_id,)).fetchone()
        if row is None:
            raise NotFound(f"session {session_id!r} not found", hint="list_sessions shows the sessions there are")
        return lineage.Node(*row)

    def _fill_nodes(self, conn: psycopg.Connection) -> None:
        """Version 2 kept no lineage node on the row: compute each once, oldest session first."""
        rows = conn.execute("SELECT session_id, parent, forked_at FROM corral_sessions ORDER BY seq").fetchall()
        found = lineage.backfill(
            rows,
            self._range(conn, "", [rules.STATUS_EVENT], True),
            rules.status_of,
            lineage.Nodes(partial(self._node, conn)),
        )
        for node in found:
            conn.execute(
                "UPDATE corral_sessions SET below = %s, jump = %s, rank = %s, base_status = %s WHERE session_id = %s",
                (node.below, node.jump, node.rank, node.base_status, node.session_id),
            )

    def _range(
        self, conn: psycopg.Connection, reader: str, types: Sequence[str] | None, desc: bool
    ) -> Callable[[str, int, int | None, int | None], list[Event]]:
        """SELECT one owner's rows in [lo, hi), shown as `reader`'s events."""

        def select_range(owner: str, lo: int, hi: int | None, want: int | None) -> list[Event]:
            query, params = rules.range_query(
                f"SELECT {EVENT_COLUMNS} FROM corral_events", "%s", owner, lo, hi, want, types, desc
            )
            return [_event(reader, row) for row in conn.execute(query, params)]

        return select_range

    def _stored_ids(
        self, conn: psycopg.Connection, session_id: str, event_ids: list[str]
    ) -> dict[str, tuple[Any, ...]]:
        """event_id -> row, for those of `event_ids` this session's view shows (one index seek per id)."""
        rows = conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM corral_events WHERE event_id = ANY(%s)", (event_ids,)
        ).fetchall()
        nodes = self._nodes.nodes(partial(self._node, conn))
        start = nodes(session_id)  # NotFound for an unknown session, found ids or not
        return lineage.visible(start, rows, nodes)

    # -- the verbs --------------------------------------------------------------------

    def create(
        self, metadata: dict[str, Any] | None = None, parent: str | None = None, session_id: str | None = None
    ) -> SessionInfo:
        meta = encode_data(metadata or {}, self.max_event_bytes)
        sid = session_id or new_id("ses_")
        with self._tx() as conn:
            if parent is not None:
                self._info(conn, parent)
            row = conn.execute(
                f"INSERT INTO corral_sessions (session_id, metadata, parent, jump) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING {SESSION_COLUMNS}",
                (sid, meta, parent, sid),
            ).fetchone()
            if row is None:
                raise Conflict(f"session {sid!r} already exists")
            return _row_info(row)

    def fork(self, session_id: str, at: int, metadata: dict[str, Any] | None = None) -> SessionInfo:
        meta = encode_data(metadata or {}, self.max_event_bytes)
        with self._tx() as conn:
            source = self._info(conn, session_id)
            node = rules.plan_fork(
                source,
                at,
                self._nodes.nodes(partial(self._node, conn)),
                self._range(conn, "", [rules.STATUS_EVENT], True),
            )
            row = conn.execute(
                "INSERT INTO corral_sessions (session_id, metadata, parent, forked_at, length, status, below, jump, rank, base_status) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {SESSION_COLUMNS}",
                (
                    node.session_id,
                    meta,
                    session_id,
                    at,
                    at,
                    node.base_status,
                    node.below,
                    node.jump,
                    node.rank,
                    node.base_status,
                ),
            ).fetchone()
            return _row_info(_one(row))

    def get(self, session_id: str) -> SessionInfo:
        with self._tx() as conn:
            return self._info(conn, session_id)

    def sessions(self, limit: int = 100, parent: str | None = None) -> list[SessionInfo]:
        check_range(None, None, limit)
        query, params = rules.sessions_query(
            f"SELECT {SESSION_COLUMNS} FROM corral_sessions", "%s", parent, "seq", limit
        )
        with self._tx() as conn:
            return [_row_info(r) for r in conn.execute(query, params).fetchall()]

    def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        expected_position: int | None = None,
        *,
        lease: int | None = None,
    ) -> list[int]:
        encoded = rules.encode_batch(events, expected_position, self.max_event_bytes)
        with self._tx() as conn:
            info = self._info(conn, session_id, lock=True)  # appends to this session queue here
            if lease is not None:
                rules.check_lease(session_id, lease, *rules.lease_holder(info))
            given = rules.given_ids(events)
            prior = {eid: row[1] for eid, row in self._stored_ids(conn, session_id, given).items()} if given else {}
            plan = rules.plan_append(
                session_id, encoded, prior, length=info.length, status=info.status, expected_position=expected_position
            )
            if not plan.rows:
                return plan.positions
            try:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO corral_events (session_id, position, event_id, type, data, lease_token) VALUES (%s, %s, %s, %s, %s, %s)",
                        [(session_id, *row, lease) for row in plan.rows],
                    )
            except psycopg.errors.UniqueViolation as err:  # defends against a writer that bypassed the row lock
                raise Conflict(f"concurrent append to session {session_id}; nothing was written") from err
            conn.execute(
                "UPDATE corral_sessions SET length = %s, status = %s WHERE session_id = %s",
                (plan.length, plan.status, session_id),
            )
            return plan.positions

    def select(
        self,
        session_id: str,
        *,
        gte: int | None = None,
        lt: int | None = None,
        types: Sequence[str] | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> list[Event]:
        check_range(gte, lt, limit)
        with self._tx() as conn:
            nodes = self._nodes.nodes(partial(self._node, conn))
            start = nodes(session_id)
            if limit == 0:
                return []
            return lineage.read(start, gte or 0, lt, desc, limit, self._range(conn, session_id, types, desc), nodes)

    def find_event(self, session_id: str, event_id: str) -> Event:
        with self._tx() as conn:
            found = self._stored_ids(conn, session_id, [event_id]).get(event_id)
        if found is None:
            raise NotFound(f"no event {event_id!r} in session {session_id}")
        return _event(session_id, found)

    # -- leases (fencing tokens for the worker pool) --------------------------------------

    def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> Lease:
        with self._tx() as conn:
            info = self._info(conn, session_id, lock=True)
            held = info.lease
            if held is not None and held["worker"] != owner:
                live = _one(
                    conn.execute(
                        "SELECT lease_expires_at > clock_timestamp() FROM corral_sessions WHERE session_id = %s",
                        (session_id,),
                    ).fetchone()
                )[0]
                if live:
                    raise Conflict(
                        f"session {session_id} is leased to {held['worker']} until {held['expires_at']}",
                        hint="wait for the lease to expire or be released",
                    )
            row = conn.execute(
                "UPDATE corral_sessions SET lease_owner = %s, lease_token = lease_token + 1, "
                "lease_expires_at = clock_timestamp() + make_interval(secs => %s) WHERE session_id = %s "
                "RETURNING lease_token, lease_expires_at",
                (owner, ttl_s, session_id),
            ).fetchone()
            row = _one(row)
            return Lease(session_id=session_id, owner=owner, token=row[0], expires_at=row[1])

    def renew_lease(self, session_id: str, token: int, ttl_s: float) -> Lease:
        with self._tx() as conn:
            info = self._info(conn, session_id, lock=True)
            rules.check_lease(session_id, token, *rules.lease_holder(info))
            row = conn.execute(
                "UPDATE corral_sessions SET lease_expires_at = clock_timestamp() + make_interval(secs => %s) "
                "WHERE session_id = %s RETURNING lease_owner, lease_expires_at",
                (ttl_s, session_id),
            ).fetchone()
            row = _one(row)
            return Lease(session_id=session_id, owner=row[0], token=token, expires_at=row[1])

    def release_lease(self, session_id: str, token: int) -> bool:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE corral_sessions SET lease_owner = NULL, lease_expires_at = NULL WHERE session_id = %s AND lease_token = %s",
                (session_id, token),
            )
            return cur.rowcount == 1


def migrate(
    conn: psycopg.Connection,
    *,
    table: str,
    lock: int,
    migrations: list[str],
    what: str,
    after: Callable[[int], object] | None = None,
) -> None:
    """Apply the `migrations` not applied yet, in order, in the caller's transaction, one
    migrator at a time (an advisory lock); `table` keeps the version. A schema newer than
    this code is refused. `after(version)` runs right after each (a data backfill)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (version INTEGER NOT NULL)").format(sql.Identifier(table)))
    row = conn.execute(sql.SQL("SELECT max(version) FROM {}").format(sql.Identifier(table))).fetchone()
    current = (row[0] if row else None) or 0
    if current > len(migrations):
        raise Unavailable(
            f"{what} has schema version {current}, newer than this corral ({len(migrations)})", hint="upgrade corral"
        )
    for version in range(current + 1, len(migrations) + 1):
        conn.execute(migrations[version - 1])
        if after is not None:
            after(version)
        conn.execute(sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(sql.Identifier(table)), (version,))


def _one(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    """The row a statement that always yields one (an aggregate, a RETURNING of a row held
    locked in this transaction) gave; None would be a bug here, not a missing session."""
    if row is None:
        raise RuntimeError("expected one row from the database, got none")
    return row


def _row_info(row: tuple[Any, ...]) -> SessionInfo:
    return rules.info_from_row(row, lambda when: when)


def _event(reader: str, row: tuple[Any, ...]) -> Event:
    _, pos, eid, typ, data, created = row
    return Event(session_id=reader, position=pos, event_id=eid, type=typ, data=json.loads(data), created_at=created)


def _configure(conn: psycopg.Connection, *, idle_tx_timeout_ms: int) -> None:
    conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, false)", (str(idle_tx_timeout_ms),))
    conn.commit()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
