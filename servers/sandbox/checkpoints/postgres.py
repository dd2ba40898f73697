"""Checkpoints every host can restore: blobs and manifests in PostgreSQL (`CORRAL_CHECKPOINT_STORE=postgresql://...`).

Why PostgreSQL rather than an S3-compatible store: every host that shares a session store
already reaches this database (so a session picked up on another host finds its
workspace with no new service to run, secure or back up); one transaction commits a
checkpoint's manifest delta together with its references to the blobs it needs, so a
listed checkpoint always has all its content (an object store has no transaction: it
would need a second index and a repair pass after every crash); and the garbage
collector's race with a checkpoint in flight on another host is settled by row locks,
not by clocks. What S3 does better, cheap bulk storage of huge trees, matters less here:
blobs are deduplicated, a checkpoint stores only what changed, and a cap bounds the total.

Layout (tables prefixed `corral_ckpt_`, created idempotently under an advisory lock and
versioned in `corral_ckpt_schema_version`, beside the session store's tables):

- `blobs(digest PK, size, stored_at)` and `blob_chunks(digest, seq, data)`: a blob is
  its row plus 4 MiB chunks, streamed in with binary COPY and read back a chunk per query,
  so a 2 GB file never sits in memory. Row and chunks are written in one transaction (a
  file of one chunk: one statement), so a blob row exists only with all its chunks.
- `checkpoints(id PK, seq, sandbox_id, created_at, record, delta)`: the record as JSON.
- `refs(checkpoint_id -> checkpoints ON DELETE CASCADE, digest -> blobs)`: the foreign key
  is the database's guarantee that a committed checkpoint's blobs exist.

The race across hosts. `put_blob` of a digest already stored refreshes its `stored_at`,
and `gc` removes only blobs older than the grace that no ref names. `gc` locks its
candidates (`FOR UPDATE SKIP LOCKED`) and deletes them in a second statement that looks
at the refs again, so a checkpoint that committed in between keeps its blobs; a commit
whose blob went meanwhile fails its foreign key check, and the checkpoint is refused
cleanly (nothing stored) instead of listed with a hole.

Speed: a blob costs one round trip and no WAL flush of its own (connections run in
autocommit with `synchronous_commit` off); the checkpoint's commit is synchronous, and
flushing the log up to it makes every blob stored before it durable too.

The storage cap is the database's total (every host shares it); `usage` is read at most
once a second, plus what this process added since.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg
import psycopg_pool
from psycopg import sql

from corral.errors import Conflict, NotFound, Unavailable
from corral.servers.session.postgres import _one_line, migrate, refused

from .store import GRACE_S, CheckpointRecord, CheckpointStore

__all__ = ["CHUNK", "PostgresCheckpointStore"]

CHUNK = 4 << 20
GC_BATCH = 1000
USAGE_TTL_S = 1.0

MIGRATIONS: list[str] = [
    """
    CREATE TABLE corral_ckpt_blobs (
        digest    TEXT PRIMARY KEY,
        size      BIGINT NOT NULL,
        stored_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
    );
    CREATE TABLE corral_ckpt_blob_chunks (
        digest TEXT NOT NULL,
        seq    INTEGER NOT NULL,
        data   BYTEA NOT NULL,
        PRIMARY KEY (digest, seq)
    );
    CREATE TABLE corral_ckpt_checkpoints (
        id         TEXT PRIMARY KEY,
        seq        BIGSERIAL NOT NULL,
        sandbox_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        record     TEXT NOT NULL,
        delta      BYTEA NOT NULL
    );
    CREATE INDEX corral_ckpt_checkpoints_sandbox ON corral_ckpt_checkpoints (sandbox_id, created_at, seq);
    CREATE TABLE corral_ckpt_refs (
        checkpoint_id TEXT NOT NULL REFERENCES corral_ckpt_checkpoints (id) ON DELETE CASCADE,
        digest        TEXT NOT NULL REFERENCES corral_ckpt_blobs (digest),
        PRIMARY KEY (digest, checkpoint_id)
    );
    CREATE INDEX corral_ckpt_refs_checkpoint ON corral_ckpt_refs (checkpoint_id);
    """,
]
MIGRATION_LOCK = 0x636B7074  # pg_advisory_xact_lock key ("ckpt"): one migrator at a time
IDLE_TX_TIMEOUT_MS = 60_000  # a host paused mid-transaction must not hold blob locks forever
CHECK_AFTER_S = 2.0  # a pooled connection idle longer is asked whether it still works
DOWN_WAIT_S = 1.0  # no pooled connection within this: ask the server itself whether it is there
HINT = (
    "check CORRAL_CHECKPOINT_STORE (or CORRAL_SESSION_STORE, whose PostgreSQL database it defaults to) "
    "and that the server is up"
)


class PostgresCheckpointStore(CheckpointStore):
    def __init__(self, url: str, cap_bytes: int, *, staging: Path, max_connections: int = 4) -> None:
        super().__init__(cap_bytes)
        self.url = url
        self.staging = staging
        staging.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in staging.iterdir():  # what a crash left half-read (ours alone: the dir is per host)
            stale.unlink(missing_ok=True)
        self._usage: tuple[float, int] | None = None  # (monotonic time read, bytes)
        self._used: dict[int, float] = {}  # id(connection) -> when it last answered (monotonic)
        self._added = 0  # bytes this process stored since that read
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            timeout=10.0,
            check=self._check,
            reconnect_timeout=2.0,
            configure=_autocommit,
            open=False,
            name="corral-checkpoints",
        )
        try:
            psycopg.connect(url, connect_timeout=10).close()  # fails fast, saying why
            self._pool.open(wait=True, timeout=10.0)
            self._migrate()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as err:
            self._pool.close()
            raise Unavailable(f"cannot open the PostgreSQL checkpoint store: {_one_line(err)}", hint=HINT) from err
        except BaseException:
            self._pool.close()
            raise

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in autocommit mode (one statement, one round trip; several
        statements that must hold together go in `conn.transaction()`); an unreachable
        server becomes `Unavailable`."""
        try:
            with ExitStack() as stack:
                conn = self._borrow(stack)
                yield conn
                self._used[id(conn)] = time.monotonic()
        except psycopg_pool.PoolTimeout as err:
            raise Unavailable(f"no connection to the PostgreSQL checkpoint store: {_one_line(err)}", hint=HINT) from err
        except psycopg.OperationalError as err:
            why = "refused this login" if refused(err) else "is unreachable"
            raise Unavailable(f"the PostgreSQL checkpoint store {why}: {_one_line(err)}", hint=HINT) from err

    def _borrow(self, stack: ExitStack) -> psycopg.Connection:
        """A pooled connection; none within a second: a server that is down (or refuses us)
        is said at once, a busy pool is waited for."""
        try:
            return stack.enter_context(self._pool.connection(timeout=DOWN_WAIT_S))
        except psycopg_pool.PoolTimeout:
            psycopg.connect(self.url, connect_timeout=2).close()  # raises OperationalError if it is away
        return stack.enter_context(self._pool.connection())

    def _check(self, conn: psycopg.Connection) -> None:
        """Ask the server about a connection idle a while (a restart may have cut it), not one
        in use a moment ago: a restore of 10,000 files borrows one per file."""
        if time.monotonic() - self._used.get(id(conn), float("-inf")) > CHECK_AFTER_S:
            psycopg_pool.ConnectionPool.check_connection(conn)

    def _migrate(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            migrate(
                conn,
                table="corral_ckpt_schema_version",
                lock=MIGRATION_LOCK,
                migrations=MIGRATIONS,
                what="the checkpoint store",
            )

    def close(self) -> None:
        self._pool.close()

    # -- blobs ------------------------------------------------------------------------

    def put_blob(self, digest: str, data: bytes | Path) -> int:
        """Insert the blob's row and chunks at once, or refresh the row that is there."""
        try:
            size = data.stat().st_size if isinstance(data, Path) else len(data)
            while not self._insert(digest, size, data):
                # Stored already (by anyone): fresh again, so a gc running now keeps it for this checkpoint.
                with self._conn() as conn:
                    if conn.execute(
                        "UPDATE corral_ckpt_blobs SET stored_at = clock_timestamp() WHERE digest = %s", (digest,)
                    ).rowcount:
                        return 0
                # A gc removed it between the two statements: store it again.
        finally:
            if isinstance(data, Path):
                data.unlink(missing_ok=True)
        with self._lock:
            self._added += size
        return size

    def _insert(self, digest: str, size: int, data: bytes | Path) -> bool:
        """Store a blob that is not there; False if it is (a row with all its chunks, or none)."""
        with self._conn() as conn:
            if isinstance(data, bytes) and size <= CHUNK:  # the common case: one statement
                return bool(
                    conn.execute(
                        "WITH b AS (INSERT INTO corral_ckpt_blobs (digest, size) VALUES (%s, %s) "
                        "ON CONFLICT DO NOTHING RETURNING digest) "
                        "INSERT INTO corral_ckpt_blob_chunks (digest, seq, data) SELECT digest, 0, %s FROM b",
                        (digest, size, data),
                    ).rowcount
                )
            with conn.transaction():
                if not conn.execute(
                    "INSERT INTO corral_ckpt_blobs (digest, size) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                    (digest, size),
                ).fetchone():
                    return False
                _write_chunks(conn, digest, data)
                return True

    def copy_blob(self, digest: str, fd: int) -> None:
        """Chunk by chunk (one in memory at a time); a blob of one chunk is one query."""
        with self._conn() as conn:
            row = conn.execute(
                "SELECT b.size, c.data FROM corral_ckpt_blobs b LEFT JOIN corral_ckpt_blob_chunks c "
                "ON c.digest = b.digest AND c.seq = 0 WHERE b.digest = %s",
                (digest,),
            ).fetchone()
            if row is None:
                raise NotFound(f"checkpoint content {digest[:12]} is missing from the store")
            size, chunk, seq, written = row[0], row[1], 0, 0
            while written < size:
                if chunk is None:
                    raise NotFound(f"checkpoint content {digest[:12]} is incomplete in the store (chunk {seq})")
                view = memoryview(chunk)
                written += len(view)
                while view:
                    view = view[os.write(fd, view) :]
                seq += 1
                if written < size:
                    found = conn.execute(
                        "SELECT data FROM corral_ckpt_blob_chunks WHERE digest = %s AND seq = %s", (digest, seq)
                    ).fetchone()
                    chunk = found[0] if found else None

    # -- checkpoints ------------------------------------------------------------------

    def commit(self, record: CheckpointRecord, raw_delta: bytes, blobs: set[str]) -> None:
        """One transaction, flushed before it returns: the row and its refs (one statement).
        The refs' foreign key locks each blob (FOR KEY SHARE) and refuses one that is gone."""
        try:
            with self._conn() as conn, conn.transaction():
                conn.execute("SET LOCAL synchronous_commit TO on")  # a listed checkpoint survives a crash
                conn.execute(
                    "WITH c AS (INSERT INTO corral_ckpt_checkpoints (id, sandbox_id, created_at, record, delta) "
                    "VALUES (%s, %s, %s, %s, %s) RETURNING id) "
                    "INSERT INTO corral_ckpt_refs (checkpoint_id, digest) SELECT c.id, d FROM c, unnest(%s::text[]) d "
                    "ON CONFLICT DO NOTHING",
                    (
                        record.id,
                        record.sandbox_id,
                        record.created_at,
                        record.model_dump_json(),
                        raw_delta,
                        sorted(blobs),
                    ),
                )
        except psycopg.errors.ForeignKeyViolation as err:
            raise Conflict(
                "content of this checkpoint was garbage-collected (on some host) while it was being taken; "
                "nothing was stored",
                hint="take the checkpoint again",
            ) from err
        with self._lock:
            self._added += len(raw_delta)

    def get(self, checkpoint_id: str) -> CheckpointRecord | None:
        with self._conn() as conn:
            row = conn.execute("SELECT record FROM corral_ckpt_checkpoints WHERE id = %s", (checkpoint_id,)).fetchone()
        return CheckpointRecord.model_validate_json(row[0]) if row else None

    def raw_delta(self, checkpoint_id: str) -> bytes:
        with self._conn() as conn:
            row = conn.execute("SELECT delta FROM corral_ckpt_checkpoints WHERE id = %s", (checkpoint_id,)).fetchone()
        if row is None:
            raise NotFound(f"no checkpoint {checkpoint_id!r}")
        return bytes(row[0])

    def list(self, sandbox_id: str) -> builtins.list[CheckpointRecord]:
        return self._records(sandbox_id, "")

    def latest(self, sandbox_id: str) -> CheckpointRecord | None:
        found = self._records(sandbox_id, " DESC", limit=1)
        return found[0] if found else None

    def _records(self, sandbox_id: str, order: str, limit: int | None = None) -> builtins.list[CheckpointRecord]:
        query = sql.SQL(
            "SELECT record FROM corral_ckpt_checkpoints WHERE sandbox_id = %s ORDER BY created_at{o}, seq{o}"
        ).format(o=sql.SQL(order))
        if limit is not None:
            query += sql.SQL(" LIMIT {}").format(limit)
        with self._conn() as conn:
            rows = conn.execute(query, (sandbox_id,)).fetchall()
        return [CheckpointRecord.model_validate_json(r[0]) for r in rows]

    def delete_sandboxes(self, sandbox_ids: builtins.list[str]) -> int:
        with self._conn() as conn:  # their refs go with them (ON DELETE CASCADE)
            rows = conn.execute(
                "DELETE FROM corral_ckpt_checkpoints WHERE sandbox_id = ANY(%s) RETURNING octet_length(delta)",
                (sandbox_ids,),
            ).fetchall()
        with self._lock:
            self._manifests.clear()
            self._added -= sum(r[0] for r in rows)
        return len(rows)

    def idle_sandboxes(self, before: float) -> builtins.list[str]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT sandbox_id FROM corral_ckpt_checkpoints GROUP BY sandbox_id HAVING max(created_at) < %s",
                (before,),
            ).fetchall()
        return [r[0] for r in rows]

    # -- space ------------------------------------------------------------------------

    def gc(self, grace_s: float = GRACE_S) -> int:
        """Remove unreferenced blobs older than the grace, a batch per transaction."""
        freed = 0
        while True:
            with self._conn() as conn, conn.transaction():
                # Lock the candidates: a commit referencing one now waits for us (and then finds it gone).
                candidates = [
                    r[0]
                    for r in conn.execute(
                        "SELECT digest FROM corral_ckpt_blobs b WHERE stored_at < clock_timestamp() - "
                        "make_interval(secs => %s) AND NOT EXISTS (SELECT 1 FROM corral_ckpt_refs r "
                        "WHERE r.digest = b.digest) LIMIT %s FOR UPDATE SKIP LOCKED",
                        (grace_s, GC_BATCH),
                    )
                ]
                if not candidates:
                    break
                # A new statement sees refs committed since the first one looked: those blobs stay.
                gone = conn.execute(
                    "DELETE FROM corral_ckpt_blobs b WHERE digest = ANY(%s) AND NOT EXISTS "
                    "(SELECT 1 FROM corral_ckpt_refs r WHERE r.digest = b.digest) RETURNING digest, size",
                    (candidates,),
                ).fetchall()
                conn.execute("DELETE FROM corral_ckpt_blob_chunks WHERE digest = ANY(%s)", ([g[0] for g in gone],))
            freed += sum(g[1] for g in gone)
            if len(candidates) < GC_BATCH:
                break
        with self._lock:
            self._added -= freed
        return freed

    def usage(self) -> int:
        with self._lock:
            cached = self._usage
            if cached is not None and time.monotonic() - cached[0] < USAGE_TTL_S:
                return cached[1] + self._added
        with self._conn() as conn:
            row = conn.execute(
                "SELECT (SELECT COALESCE(sum(size), 0) FROM corral_ckpt_blobs) + "
                "(SELECT COALESCE(sum(octet_length(delta)), 0) FROM corral_ckpt_checkpoints)"
            ).fetchone()
        total = int(row[0]) if row else 0
        with self._lock:
            self._usage, self._added = (time.monotonic(), total), 0
        return total


def _autocommit(conn: psycopg.Connection) -> None:
    """Autocommit, and no WAL flush per blob: a checkpoint's commit flushes (synchronously) the
    log up to itself, so every blob stored before it is durable when it is."""
    conn.autocommit = True
    conn.execute(
        "SELECT set_config('idle_in_transaction_session_timeout', %s, false), "
        "set_config('synchronous_commit', 'off', false)",
        (str(IDLE_TX_TIMEOUT_MS),),
    )


def _write_chunks(conn: psycopg.Connection, digest: str, data: bytes | Path) -> None:
    """The blob's bytes as CHUNK-sized rows, streamed with binary COPY (a file never whole in memory)."""
    with conn.cursor().copy("COPY corral_ckpt_blob_chunks (digest, seq, data) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["text", "int4", "bytea"])
        for seq, chunk in enumerate(_chunks(data)):
            copy.write_row((digest, seq, chunk))


def _chunks(data: bytes | Path) -> Iterator[bytes]:
    if isinstance(data, bytes):
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]
        return
    with data.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk
