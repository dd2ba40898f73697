"""Checkpoints on one host: blobs as files (`blobs/ab/<sha256>`), rows in SQLite (`index.db`).

A blob file is written under `staging/`, then renamed into place: a crash leaves a staging
file (removed at open) or an unreferenced blob (removed by `gc`), never a torn blob. The
file is the blob's only record (no row per blob: a first checkpoint of 10,000 files is one
transaction), and `refs` says which checkpoints need it.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from corral.diskfull import naming_disk_full
from corral.errors import NotFound

from .store import GRACE_S, CheckpointRecord, CheckpointStore

__all__ = ["LocalCheckpointStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    record TEXT NOT NULL,
    delta BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_sandbox ON checkpoints(sandbox_id, created_at);
CREATE TABLE IF NOT EXISTS refs (
    checkpoint_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (digest, checkpoint_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_checkpoint ON refs(checkpoint_id);
"""


class LocalCheckpointStore(CheckpointStore):
    def __init__(self, root: Path, cap_bytes: int) -> None:
        super().__init__(cap_bytes)
        self.root = root
        self.blobs = root / "blobs"
        self.staging = root / "staging"
        for path in (root, self.blobs, self.staging):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(self.staging, ignore_errors=True)  # what a crash left half-written
        self.staging.mkdir(mode=0o700, exist_ok=True)
        self._db = sqlite3.connect(root / "index.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._write = threading.Lock()
        # Bytes held, kept as a running total: `usage` is asked before every new blob.
        self._usage = sum(st.st_size for _, st in self._blob_files())
        self._usage += self._db.execute("SELECT COALESCE(SUM(LENGTH(delta)), 0) FROM checkpoints").fetchone()[0]

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._write, naming_disk_full(self.root):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _path(self, digest: str) -> Path:
        return self.blobs / digest[:2] / digest

    def put_blob(self, digest: str, data: bytes | Path) -> int:
        """A blob is its file: present means stored (renamed into place whole, never torn)."""
        target = self._path(digest)
        try:
            os.utime(target)  # fresh again: a gc running now keeps it for the checkpoint being written
        except FileNotFoundError:
            pass
        else:
            if isinstance(data, Path):
                data.unlink(missing_ok=True)
            return 0
        target.parent.mkdir(exist_ok=True, mode=0o700)
        with naming_disk_full(self.root):
            if isinstance(data, Path):
                size = data.stat().st_size
                os.replace(data, target)
            else:
                size = len(data)
                staged = self.staging / f"{digest}.{threading.get_ident()}"
                staged.write_bytes(data)
                os.replace(staged, target)
        with self._lock:
            self._usage += size
        return size

    def copy_blob(self, digest: str, fd: int) -> None:
        try:
            src = os.open(self._path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise NotFound(f"checkpoint content {digest[:12]} is missing from the store") from err
        try:
            size = os.fstat(src).st_size
            copied = 0
            while copied < size:
                n = os.copy_file_range(src, fd, size - copied)
                if n == 0:
                    break
                copied += n
        finally:
            os.close(src)

    def commit(self, record: CheckpointRecord, raw_delta: bytes, blobs: set[str]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                (record.id, record.sandbox_id, record.created_at, record.model_dump_json(), raw_delta),
            )
            db.executemany("INSERT OR IGNORE INTO refs VALUES (?, ?)", [(record.id, d) for d in blobs])
        with self._lock:
            self._usage += len(raw_delta)

    def get(self, checkpoint_id: str) -> CheckpointRecord | None:
        row = self._db.execute("SELECT record FROM checkpoints WHERE id = ?", (checkpoint_id,)).fetchone()
        return CheckpointRecord.model_validate_json(row[0]) if row else None

    def raw_delta(self, checkpoint_id: str) -> bytes:
        row = self._db.execute("SELECT delta FROM checkpoints WHERE id = ?", (checkpoint_id,)).fetchone()
        if row is None:
            raise NotFound(f"no checkpoint {checkpoint_id!r}")
        return bytes(row[0])

    def list(self, sandbox_id: str) -> builtins.list[CheckpointRecord]:
        rows = self._db.execute(
            "SELECT record FROM checkpoints WHERE sandbox_id = ? ORDER BY created_at, rowid", (sandbox_id,)
        ).fetchall()
        return [CheckpointRecord.model_validate_json(r[0]) for r in rows]

    def latest(self, sandbox_id: str) -> CheckpointRecord | None:
        row = self._db.execute(
            "SELECT record FROM checkpoints WHERE sandbox_id = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (sandbox_id,),
        ).fetchone()
        return CheckpointRecord.model_validate_json(row[0]) if row else None

    def delete_sandboxes(self, sandbox_ids: builtins.list[str]) -> int:
        gone = freed = 0
        with self._tx() as db:
            for sandbox_id in sandbox_ids:
                rows = db.execute("SELECT id, LENGTH(delta) FROM checkpoints WHERE sandbox_id = ?", (sandbox_id,))
                ids = [(i, size) for i, size in rows]
                db.executemany("DELETE FROM refs WHERE checkpoint_id = ?", [(i,) for i, _ in ids])
                gone += db.execute("DELETE FROM checkpoints WHERE sandbox_id = ?", (sandbox_id,)).rowcount
                freed += sum(size for _, size in ids)
        with self._lock:
            self._manifests.clear()
            self._usage -= freed
        return gone

    def idle_sandboxes(self, before: float) -> builtins.list[str]:
        rows = self._db.execute(
            "SELECT sandbox_id FROM checkpoints GROUP BY sandbox_id HAVING MAX(created_at) < ?", (before,)
        ).fetchall()
        return [r[0] for r in rows]

    def gc(self, grace_s: float = GRACE_S) -> int:
        referenced = {r[0] for r in self._db.execute("SELECT DISTINCT digest FROM refs")}
        freed, cutoff = 0, time.time() - grace_s
        for digest, st in self._blob_files():
            if digest not in referenced and st.st_mtime < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    self._path(digest).unlink()
                    freed += st.st_size
        with self._lock:
            self._usage -= freed
        return freed

    def _blob_files(self) -> Iterator[tuple[str, os.stat_result]]:
        for shard in os.scandir(self.blobs):
            if shard.is_dir(follow_symlinks=False):
                for item in os.scandir(shard.path):
                    with contextlib.suppress(FileNotFoundError):
                        yield item.name, item.stat(follow_symlinks=False)

    def usage(self) -> int:
        return self._usage

    def close(self) -> None:
        self._db.close()
