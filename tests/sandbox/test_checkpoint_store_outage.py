"""The PostgreSQL checkpoint store through a database restart: while the server is away a
call says `unavailable` (promptly, and nothing half-stored), and the same store serves again
once it is back. The cluster is the tests' own (`tests/workers/private_pg.py`)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from corral.errors import Unavailable
from corral.servers.sandbox.checkpoints import open_store
from corral.servers.sandbox.checkpoints.postgres import CHECK_AFTER_S
from tests.conftest import wait_until
from tests.workers.private_pg import private_pg  # noqa: F401 - fixture

pytestmark = pytest.mark.requires("postgres")


def test_a_database_outage_is_unavailable_then_served_again(private_pg, tmp_path: Path) -> None:  # noqa: F811
    store = open_store(private_pg.url, tmp_path, 1 << 30)
    assert store is not None
    try:
        before = b"stored before the outage"
        store.put_blob(hashlib.sha256(before).hexdigest(), before)
        private_pg.stop()
        during = b"stored during the outage"
        started = time.monotonic()
        with pytest.raises(Unavailable, match="checkpoint store") as err:
            store.put_blob(hashlib.sha256(during).hexdigest(), during)
        assert "CORRAL_CHECKPOINT_STORE" in (err.value.hint or "")
        time.sleep(CHECK_AFTER_S + 0.5)  # idle pooled connections are checked: the idle time is the point
        for _ in range(2):  # a connection just used, then one the pool checks and finds dead
            with pytest.raises(Unavailable, match="checkpoint store"):
                store.put_blob(hashlib.sha256(during).hexdigest(), during)
        assert time.monotonic() - started < CHECK_AFTER_S + 0.5 + 6  # promptly, not after the pool's 10 s
        private_pg.start()

        def served() -> bool:
            try:
                return store.put_blob(hashlib.sha256(during).hexdigest(), during) == len(during)
            except Unavailable:
                return False  # a connection the restart cut, found out on this call and replaced

        wait_until(served, "the store to serve again after the restart")
        out = tmp_path / "out"
        with out.open("wb") as f:
            store.copy_blob(hashlib.sha256(before).hexdigest(), f.fileno())
        assert out.read_bytes() == before
    finally:
        store.close()
        if not private_pg.running():
            private_pg.start()
