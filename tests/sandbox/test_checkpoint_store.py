"""The checkpoint store contract, the same tests against both stores: files + SQLite on one
host (`LocalCheckpointStore`) and PostgreSQL shared between hosts (`PostgresCheckpointStore`,
each test in a fresh schema of the real server)."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import Conflict, NotFound
from corral.servers.sandbox.checkpoints import open_store
from corral.servers.sandbox.checkpoints.manifest import Entry, delta, encode
from corral.servers.sandbox.checkpoints.store import CheckpointRecord, CheckpointStore, new_checkpoint_id
from tests.session.pg import pg_schema_url  # noqa: F401 - fixture

CAP = 1 << 30


@pytest.fixture(params=["local", pytest.param("postgres", marks=pytest.mark.requires("postgres"))])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CheckpointStore]:
    url = request.getfixturevalue("pg_schema_url") if request.param == "postgres" else str(tmp_path / "ckpt")
    opened = open_store(url, tmp_path / "home", CAP)
    assert opened is not None
    assert (
        type(opened).__name__ == {"local": "LocalCheckpointStore", "postgres": "PostgresCheckpointStore"}[request.param]
    )
    yield opened
    opened.close()


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(store: CheckpointStore, data: bytes) -> str:
    store.put_blob(digest_of(data), data)
    return digest_of(data)


def read(store: CheckpointStore, digest: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"out-{digest[:8]}"
    with out.open("wb") as f:
        store.copy_blob(digest, f.fileno())
    return out.read_bytes()


def checkpoint(store: CheckpointStore, sandbox_id: str, files: dict[str, bytes], label: str | None = None) -> str:
    """Commit a full checkpoint of `files` (path -> content), its blobs stored first."""
    manifest = {f"workspace/{p}": Entry("f", 0o644, len(d), 1, put(store, d)) for p, d in files.items()}
    record = CheckpointRecord(
        id=new_checkpoint_id(),
        sandbox_id=sandbox_id,
        backend="bubblewrap",
        template=None,
        parent=None,
        depth=0,
        label=label,
        created_at=time.time(),
        files=len(manifest),
        files_changed=len(manifest),
        bytes_added=0,
    )
    store.commit(record, encode(delta(None, manifest, full=True)), {e.ref for e in manifest.values() if e.ref})
    return record.id


def test_a_blob_is_stored_once_and_reads_back(store: CheckpointStore, tmp_path: Path) -> None:
    data = b"the same content"
    assert store.put_blob(digest_of(data), data) == len(data)
    assert store.put_blob(digest_of(data), data) == 0  # stored already
    staged = store.staging / "again"
    staged.write_bytes(data)
    assert store.put_blob(digest_of(data), staged) == 0
    assert not staged.exists()  # a staging file is consumed, stored or not
    assert read(store, digest_of(data), tmp_path) == data
    assert store.usage() == len(data)


def test_a_blob_larger_than_a_chunk_round_trips_from_a_staging_file(store: CheckpointStore, tmp_path: Path) -> None:
    data = os.urandom(9 << 20) + b"tail"  # more than two 4 MiB chunks, not a multiple of one
    staged = store.staging / "big"
    staged.write_bytes(data)
    assert store.put_blob(digest_of(data), staged) == len(data)
    assert not staged.exists()
    assert read(store, digest_of(data), tmp_path) == data
    empty = b""
    store.put_blob(digest_of(empty), empty)
    assert read(store, digest_of(empty), tmp_path) == b""


def test_a_missing_blob_is_not_found(store: CheckpointStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        read(store, "0" * 64, tmp_path)


def test_commit_list_latest_get(store: CheckpointStore) -> None:
    first = checkpoint(store, "sbx_a", {"a.txt": b"one"}, label="first")
    second = checkpoint(store, "sbx_a", {"a.txt": b"two"})
    other = checkpoint(store, "sbx_b", {"b.txt": b"other"})
    assert [c.id for c in store.list("sbx_a")] == [first, second]  # oldest first
    assert store.latest("sbx_a").id == second
    assert store.latest("sbx_none") is None and store.list("sbx_none") == []
    got = store.get(first)
    assert got is not None and got.label == "first" and got.sandbox_id == "sbx_a"
    assert store.get("ckpt_unknown") is None
    with pytest.raises(NotFound):
        store.raw_delta("ckpt_unknown")
    with pytest.raises(NotFound):
        store.require("ckpt_unknown", "bubblewrap")
    with pytest.raises(NotFound):  # another backend's checkpoint is foreign here
        store.require(other, "docker")
    assert store.manifest(other)["workspace/b.txt"].ref == digest_of(b"other")


def test_an_uncommitted_checkpoint_is_never_listed_and_its_blobs_are_collected(store: CheckpointStore) -> None:
    kept = checkpoint(store, "sbx_a", {"kept.txt": b"kept"})
    put(store, b"written by a checkpoint that never committed")
    assert [c.id for c in store.list("sbx_a")] == [kept]
    assert store.gc(grace_s=0) == len(b"written by a checkpoint that never committed")


def test_gc_keeps_referenced_blobs_and_blobs_within_the_grace(store: CheckpointStore, tmp_path: Path) -> None:
    checkpoint(store, "sbx_a", {"ref.txt": b"referenced"})
    loose = put(store, b"loose")
    assert store.gc() == 0  # the loose blob is younger than the grace: a checkpoint may be about to commit it
    assert store.gc(grace_s=0) == len(b"loose")
    assert read(store, digest_of(b"referenced"), tmp_path) == b"referenced"
    with pytest.raises(NotFound):
        read(store, loose, tmp_path)


def test_delete_sandboxes_then_gc_frees_their_blobs_only(store: CheckpointStore, tmp_path: Path) -> None:
    checkpoint(store, "sbx_a", {"a.txt": b"a's", "shared.txt": b"shared"})
    checkpoint(store, "sbx_a", {"a.txt": b"a's again"})
    checkpoint(store, "sbx_b", {"shared.txt": b"shared"})
    assert sorted(store.idle_sandboxes(time.time() + 1)) == ["sbx_a", "sbx_b"]
    assert store.idle_sandboxes(time.time() - 3600) == []
    assert store.delete_sandboxes(["sbx_a"]) == 2
    assert store.list("sbx_a") == []
    assert store.gc(grace_s=0) == len(b"a's") + len(b"a's again")
    assert read(store, digest_of(b"shared"), tmp_path) == b"shared"  # sbx_b still needs it


def test_usage_counts_blobs_and_deltas(store: CheckpointStore) -> None:
    assert store.usage() == 0
    put(store, b"12345")
    assert store.usage() == 5
    ckpt = checkpoint(store, "sbx_a", {"f": b"12345"})
    assert store.usage() == 5 + len(store.raw_delta(ckpt))
    store.delete_sandboxes(["sbx_a"])
    store.gc(grace_s=0)
    assert store.usage() == 0


# -- PostgreSQL only: what sharing one store between hosts adds ---------------------------


@pytest.fixture
def two_hosts(pg_schema_url: str, tmp_path: Path) -> Iterator[tuple[CheckpointStore, CheckpointStore]]:  # noqa: F811
    a = open_store(pg_schema_url, tmp_path / "a", CAP)
    b = open_store(pg_schema_url, tmp_path / "b", CAP)
    assert a is not None and b is not None
    yield a, b
    a.close()
    b.close()


@pytest.mark.requires("postgres")
def test_a_checkpoint_taken_on_one_host_restores_on_another(two_hosts, tmp_path: Path) -> None:
    a, b = two_hosts
    ckpt = checkpoint(a, "sbx_a", {"notes.txt": b"from host a"})
    assert b.manifest(ckpt)["workspace/notes.txt"].ref == digest_of(b"from host a")
    assert read(b, digest_of(b"from host a"), tmp_path) == b"from host a"


@pytest.mark.requires("postgres")
def test_a_commit_whose_blob_another_host_collected_is_refused_cleanly(two_hosts) -> None:
    a, b = two_hosts
    digest = put(a, b"in flight")
    assert b.gc(grace_s=0) == len(b"in flight")  # host b's gc, with no grace, takes it before a commits
    with pytest.raises(Conflict, match="take the checkpoint again"):
        a.commit(
            CheckpointRecord(
                id=new_checkpoint_id(),
                sandbox_id="sbx_a",
                backend="bubblewrap",
                template=None,
                parent=None,
                depth=0,
                label=None,
                created_at=time.time(),
                files=1,
                files_changed=1,
                bytes_added=9,
            ),
            encode(delta(None, {"workspace/f": Entry("f", 0o644, 9, 1, digest)}, full=True)),
            {digest},
        )
    assert a.list("sbx_a") == []  # never a listed checkpoint with a hole


@pytest.mark.requires("postgres")
def test_storing_a_blob_again_refreshes_it_against_another_hosts_gc(two_hosts, pg_schema_url: str) -> None:  # noqa: F811
    import psycopg

    a, b = two_hosts
    digest = put(a, b"old content")
    with psycopg.connect(pg_schema_url, autocommit=True) as conn:  # stored two hours ago
        conn.execute("UPDATE corral_ckpt_blobs SET stored_at = now() - interval '2 hours'")
    put(a, b"old content")  # a new checkpoint on host a needs it again
    assert b.gc() == 0  # so host b's gc keeps it for the grace
    with psycopg.connect(pg_schema_url, autocommit=True) as conn:
        conn.execute("UPDATE corral_ckpt_blobs SET stored_at = now() - interval '2 hours'")
    assert b.gc() == len(b"old content")
    assert a.gc() == 0 and digest


@pytest.mark.requires("postgres")
def test_a_big_blob_streams_through_without_being_held_in_memory(pg_schema_url: str, tmp_path: Path) -> None:  # noqa: F811
    store = open_store(pg_schema_url, tmp_path / "home", CAP)
    assert store is not None
    size = 48 << 20
    staged = store.staging / "big"
    with staged.open("wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    tracemalloc.start()
    try:
        store.put_blob(digest, staged)
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = tmp_path / "out"
        with out.open("wb") as f:
            store.copy_blob(digest, f.fileno())
        _, copy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        store.close()
    assert out.stat().st_size == size
    assert put_peak < size // 3 and copy_peak < size // 3, (put_peak, copy_peak)


@pytest.mark.requires("postgres")
def test_gc_racing_commits_on_another_host_never_leaves_a_hole(two_hosts, tmp_path: Path) -> None:
    """Host b collects with no grace at all while host a commits checkpoints that share content:
    each commit either lands whole or is refused; gc never fails; no listed checkpoint misses a blob."""
    import threading

    a, b = two_hosts
    stop, errors, rounds = threading.Event(), [], [0]

    def collect() -> None:
        while not stop.wait(0.002):  # a breath between rounds, so some commits get through
            try:
                b.gc(grace_s=0)
                rounds[0] += 1
            except Exception as err:  # any failure of gc is what this test looks for
                errors.append(err)
                return

    collector = threading.Thread(target=collect)
    collector.start()
    committed = refused = 0
    try:
        for i in range(40):
            try:
                checkpoint(a, "sbx_a", {"shared.txt": b"shared by all", f"own-{i}.txt": f"own {i}".encode()})
                committed += 1
            except Conflict:
                refused += 1
    finally:
        stop.set()
        collector.join(timeout=30)
    assert not errors, errors
    assert rounds[0] > 0 and committed > 0, (rounds, committed, refused)
    assert len(a.list("sbx_a")) == committed
    for saved in a.list("sbx_a"):
        for entry in a.manifest(saved.id).values():
            assert digest_of(read(a, entry.ref or "", tmp_path)) == entry.ref


@pytest.mark.requires("postgres")
def test_tables_of_a_newer_corral_are_refused(pg_schema_url: str, tmp_path: Path) -> None:  # noqa: F811
    import psycopg

    from corral.errors import Unavailable

    first = open_store(pg_schema_url, tmp_path / "a", CAP)  # makes the tables
    assert first is not None
    first.close()
    with psycopg.connect(pg_schema_url, autocommit=True) as conn:
        conn.execute("INSERT INTO corral_ckpt_schema_version VALUES (99)")
    with pytest.raises(Unavailable, match="the checkpoint store has schema version 99, newer than this corral"):
        open_store(pg_schema_url, tmp_path / "b", CAP)


CRASHING_PUT = """
import hashlib, os, sys
from pathlib import Path
from corral.servers.sandbox.checkpoints import open_store
store = open_store(sys.argv[1], Path(sys.argv[2]), 1 << 40)
staged = store.staging / "big"
with staged.open("wb") as f:
    for _ in range(256):
        f.write(os.urandom(1 << 20))
digest = hashlib.sha256(staged.read_bytes()).hexdigest()
print(digest, flush=True)
store.put_blob(digest, staged)
"""


@pytest.mark.requires("postgres")
def test_a_host_killed_while_storing_a_big_blob_leaves_no_torn_blob(pg_schema_url: str, tmp_path: Path) -> None:  # noqa: F811
    import subprocess
    import sys
    import uuid

    import psycopg

    from tests.conftest import wait_until

    app = f"ckpt-crash-{uuid.uuid4().hex[:8]}"
    url = f"{pg_schema_url}&application_name={app}"
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PUT, url, str(tmp_path / "child")], stdout=subprocess.PIPE, text=True
    )
    try:
        digest = (child.stdout.readline() if child.stdout else "").strip()
        assert len(digest) == 64, f"the child did not start: {child.poll()}"
        with psycopg.connect(pg_schema_url, autocommit=True) as conn:

            def copying() -> bool:  # mid-COPY: some chunks sent, the blob not committed
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND query LIKE 'COPY%%' "
                    "AND state IN ('active', 'idle in transaction')",
                    (app,),
                ).fetchone()
                return bool(row and row[0])

            wait_until(copying, "the child to be storing the blob")
            child.kill()
            child.wait(timeout=30)
            wait_until(
                lambda: (
                    not conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
                    ).fetchone()[0]
                ),
                "the server to end the dead host's session",
            )
            assert conn.execute("SELECT count(*) FROM corral_ckpt_blobs").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM corral_ckpt_blob_chunks").fetchone()[0] == 0
    finally:
        child.kill()
        child.wait(timeout=30)
    store = open_store(pg_schema_url, tmp_path / "survivor", CAP)
    assert store is not None
    try:
        with pytest.raises(NotFound):  # never half there: another host stores it whole again
            read(store, digest, tmp_path)
    finally:
        store.close()
