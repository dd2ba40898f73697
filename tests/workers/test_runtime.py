"""The pieces of a worker's job in-process (SQLite store, no queue): lease-carrying appends,
self-fencing, and a job body on its own loop that a stop can cancel."""

from __future__ import annotations

import asyncio
import time

import pytest

from corral.errors import InvalidArgument, Timeout, Unavailable
from corral.harness.outage import OutageTooLong, ride_out
from corral.harness.pool import FENCED_EXIT, HandBack, LeasedStore, Runtime, in_own_loop
from corral.servers.session import LeaseLost, NewEvent, open_store
from corral.servers.session.postgres import StoreRefused


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path / 's.db'}")
    yield s
    s.close()


def ev(**data) -> NewEvent:
    return NewEvent(type="agent.message", data=data)


def test_leased_appends_carry_the_token_and_a_lost_lease_fences(store):
    sid, other = store.create().session_id, store.create().session_id
    lease = store.acquire_lease(sid, "me", ttl_s=0.01)
    fenced: list[str] = []
    leased = LeasedStore(store, sid, lease.token, fenced.append)
    assert leased.append(sid, [ev(i=0)], 0) == [0]
    assert leased.append_one(sid, "agent.message", {"i": 1}) == 1
    time.sleep(0.05)
    store.acquire_lease(sid, "someone-else", ttl_s=30)  # mine expired: taken over
    with pytest.raises(LeaseLost):
        leased.append(sid, [ev(i=2)], 2)
    assert len(fenced) == 1 and "no longer held" in fenced[0]
    assert leased.append(other, [ev()]) == [0]  # another session (a subagent's): not leased
    assert store.length(sid) == 2 and leased.get(sid).lease["worker"] == "someone-else"


def test_a_worker_whose_lease_is_taken_mid_job_exits_with_75(store):
    sid = store.create().session_id
    exits: list[int] = []
    runtime = Runtime(store=store, body=None, name="me", lease_s=0.3, exit_process=exits.append)  # type: ignore[arg-type]
    token = store.acquire_lease(sid, "me", ttl_s=0.3).token

    async def main():
        keeper = asyncio.create_task(runtime.keep(sid, token, None))
        await asyncio.sleep(0.15)
        # As if this worker had stalled past its lease: the lease lapses and another worker takes it.
        store.release_lease(sid, token)
        store.acquire_lease(sid, "heir", ttl_s=30)
        await asyncio.sleep(0.3)  # the next renewal finds out
        keeper.cancel()

    asyncio.run(main())
    assert exits and set(exits) == {FENCED_EXIT}


def test_a_job_that_ends_after_its_lease_was_taken_fences_before_the_queue_hears_of_it(store):
    # E.g. a worker paused mid-append: the server cut its connection, the append failed
    # with `unavailable` rather than a lost lease, and the job ended. Marking that job
    # failed would finish another worker's run of it; the worker must exit instead.
    sid = store.create().session_id
    exits: list[int] = []

    async def body(leased, session_id):
        await asyncio.sleep(0.1)  # stalled past its lease...
        store.acquire_lease(session_id, "heir", ttl_s=30)  # ...and taken over behind this job's back
        raise Unavailable(
            "PostgreSQL session store unreachable: terminating connection due to idle-in-transaction timeout"
        )

    runtime = Runtime(store=store, body=body, name="me", lease_s=0.05, exit_process=exits.append)
    runtime.keep = lambda *_: asyncio.sleep(30)  # type: ignore[method-assign] # renewals would fence first: this is about the end
    with pytest.raises(Unavailable):
        asyncio.run(runtime.work(sid, None))
    assert exits == [FENCED_EXIT]
    assert store.get(sid).lease["worker"] == "heir"


def test_a_job_that_ends_holding_its_lease_releases_it_and_does_not_fence(store):
    sid = store.create().session_id
    exits: list[int] = []

    async def body(leased, session_id):
        leased.append_one(session_id, "agent.message", {"done": True})

    asyncio.run(Runtime(store=store, body=body, name="me", lease_s=5, exit_process=exits.append).work(sid, None))
    assert exits == [] and store.get(sid).lease is None and store.length(sid) == 1


def test_a_body_on_its_own_loop_is_cancelled_and_winds_down():
    seen: list[str] = []

    async def body():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled in its own loop")
            raise

    async def main():
        task = asyncio.create_task(in_own_loop(body))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == ["cancelled in its own loop"]


def test_a_body_error_comes_back_to_the_worker():
    async def body():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(in_own_loop(body))


def status_events(store, sid) -> list[dict]:
    return [e.data for e in store.select(sid, types=["session.status"])]


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        (RuntimeError("a bug outside the harness"), "RuntimeError", "a bug outside the harness"),
        (
            InvalidArgument("the session log has schema version 9, this worker reads 2"),
            "invalid_argument",
            "the session log has schema version 9, this worker reads 2",
        ),
    ],
)
def test_a_job_that_dies_outside_the_harness_records_why_in_the_log_before_it_fails(store, error, kind, message):
    sid = store.create().session_id

    async def body(leased, session_id):
        leased.append(session_id, [NewEvent(type="session.status", data={"status": "running"})])
        raise error

    runtime = Runtime(store=store, body=body, name="w1", lease_s=5)
    with pytest.raises(type(error)):
        asyncio.run(runtime.work(sid, None))
    last = status_events(store, sid)[-1]
    assert (last["status"], last["kind"], last["message"]) == ("failed", kind, message)
    assert last["reason"] == f"{kind}: {message}" and last["writer"] == "worker w1"
    assert store.get(sid).status == "failed" and store.get(sid).lease is None
    assert HandBack().get_retry_decision(exception=error, job=None) is None  # type: ignore[arg-type]  # final: not retried


def test_a_failure_the_harness_recorded_is_not_recorded_twice_and_an_outage_fails_nothing(store):
    sid = store.create().session_id

    async def harness_failed(leased, session_id):
        leased.append(
            session_id,
            [NewEvent(type="session.status", data={"status": "failed", "reason": "timeout: the model did not answer"})],
        )
        raise Timeout("the model did not answer")

    with pytest.raises(Timeout):
        asyncio.run(Runtime(store=store, body=harness_failed, name="w1", lease_s=5).work(sid, None))
    assert [d["status"] for d in status_events(store, sid)] == ["failed"]

    other = store.create().session_id

    async def outage(leased, session_id):
        raise OutageTooLong("append: the session database stayed unreachable for over 300s")

    with pytest.raises(OutageTooLong):
        asyncio.run(Runtime(store=store, body=outage, name="w1", lease_s=5).work(other, None))
    assert status_events(store, other) == []  # weather: the job is retried, the session is not failed


def test_a_refused_login_is_final_not_an_outage():
    refused = StoreRefused("the PostgreSQL session store refused this login: password authentication failed")
    assert HandBack().get_retry_decision(exception=refused, job=None) is None  # type: ignore[arg-type]
    with pytest.raises(StoreRefused):  # not ridden out for the outage budget: raised at once
        ride_out(lambda: (_ for _ in ()).throw(refused), "append", budget_s=300)
