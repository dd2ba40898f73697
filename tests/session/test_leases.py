"""Leases: the fencing tokens that keep a worker that lost its session from writing to it.

Run on both backends: the worker pool needs PostgreSQL, but the store interface is one.
"""

from __future__ import annotations

import time

import pytest

from corral.errors import Conflict
from corral.servers.session import LeaseLost, NewEvent, open_store
from tests.session.pg import pg_schema_url  # noqa: F401 - fixture


def ev(**data) -> NewEvent:
    return NewEvent(type="agent.message", data=data)


class LeaseContract:
    @pytest.fixture
    def store(self, store_url):
        s = open_store(store_url)
        yield s
        s.close()

    def test_a_lease_fences_appends_once_taken_over(self, store):
        sid = store.create().session_id
        first = store.acquire_lease(sid, "worker-a", ttl_s=0.2)
        assert store.append(sid, [ev(i=0)], lease=first.token) == [0]
        with pytest.raises(Conflict, match="leased to worker-a"):
            store.acquire_lease(sid, "worker-b", ttl_s=5)
        time.sleep(0.3)  # worker-a stalls past its lease
        second = store.acquire_lease(sid, "worker-b", ttl_s=5)
        assert second.token > first.token
        with pytest.raises(LeaseLost, match="no longer held"):
            store.append(sid, [ev(i=1, stale=True)], lease=first.token)
        with pytest.raises(Conflict):
            store.renew_lease(sid, first.token, ttl_s=5)
        assert store.append(sid, [ev(i=1)], lease=second.token) == [1]
        assert [e.data for e in store.select(sid)] == [{"i": 0}, {"i": 1}]
        assert store.get(sid).lease["worker"] == "worker-b"

    def test_append_one_writes_under_a_lease_too(self, store):
        sid = store.create().session_id
        first = store.acquire_lease(sid, "worker-a", ttl_s=5)
        assert store.append_one(sid, "agent.message", {"i": 0}, lease=first.token) == 0
        store.release_lease(sid, first.token)
        with pytest.raises(LeaseLost, match="no longer held"):
            store.append_one(sid, "agent.message", {"i": 1}, lease=first.token)
        assert store.length(sid) == 1

    def test_an_expired_lease_nobody_took_still_writes(self, store):
        # Fencing is by token, not by clock: a slow holder that nobody replaced loses nothing.
        sid = store.create().session_id
        lease = store.acquire_lease(sid, "worker-a", ttl_s=0.05)
        time.sleep(0.1)
        assert store.append(sid, [ev()], lease=lease.token) == [0]
        assert store.renew_lease(sid, lease.token, ttl_s=5).token == lease.token

    def test_release_ends_the_lease_and_unleased_writers_are_unaffected(self, store):
        sid = store.create().session_id
        lease = store.acquire_lease(sid, "worker-a", ttl_s=30)
        store.append(sid, [ev(by="user")])  # a user message needs no lease
        assert store.release_lease(sid, lease.token) is True
        assert store.get(sid).lease is None
        with pytest.raises(Conflict):
            store.append(sid, [ev(late=True)], lease=lease.token)
        assert store.acquire_lease(sid, "worker-b", ttl_s=30).token == lease.token + 1
        assert store.release_lease(sid, lease.token) is False  # a stale release changes nothing, and says so
        assert store.get(sid).lease["worker"] == "worker-b"
        assert store.length(sid) == 1

    def test_the_same_owner_may_reacquire_with_a_new_token(self, store):
        sid = store.create().session_id
        a = store.acquire_lease(sid, "worker-a", ttl_s=30)
        b = store.acquire_lease(sid, "worker-a", ttl_s=30)
        assert b.token == a.token + 1
        with pytest.raises(Conflict):
            store.append(sid, [ev()], lease=a.token)


class TestSQLiteLeases(LeaseContract):
    @pytest.fixture
    def store_url(self, tmp_path):
        return f"sqlite:///{tmp_path / 'sessions.db'}"


@pytest.mark.postgres
class TestPostgresLeases(LeaseContract):
    @pytest.fixture
    def store_url(self, pg_schema_url):  # noqa: F811
        return pg_schema_url
