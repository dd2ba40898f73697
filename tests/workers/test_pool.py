"""The worker pool with real `corral worker` processes on a real PostgreSQL.

The job body here is a scripted one (`tests/workers/bodies.py`) that writes through the
leased store like the harness does; `test_fault.py` runs the reference harness itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from corral.harness.pool import FENCED_EXIT, enqueue_session
from corral.servers.session import open_store
from tests.session.pg import pg_schema_url  # noqa: F401 - fixture
from tests.workers.helpers import (
    ROOT,
    Worker,
    assert_worked_in_turns,
    steps,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
LEASE = 4.0


@pytest.fixture
def store(pg_schema_url):  # noqa: F811
    s = open_store(pg_schema_url)
    yield s
    s.close()


@pytest.fixture
def workers(pg_schema_url, tmp_path):  # noqa: F811
    started: list[Worker] = []

    def start(name: str, **kwargs) -> Worker:
        w = Worker(pg_schema_url, name, tmp_path, lease=LEASE, **kwargs)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
        print(
            f"--- worker {w.name} (pid {w.pid}, exit {w.proc.returncode}) ---\n{w.log()[-4000:]}"
        )  # shown when the test failed


def jobs(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT lock, queueing_lock, status FROM procrastinate_jobs ORDER BY id").fetchall()


def test_a_session_is_one_job_locked_by_its_id(store, pg_schema_url):  # noqa: F811
    sid = store.create().session_id
    assert enqueue_session(sid, pg_schema_url) is True
    assert enqueue_session(sid, pg_schema_url) is False  # already waiting: the waiting job will see everything
    assert jobs(pg_schema_url) == [(sid, sid, "todo")]


def test_workers_complete_every_session_and_show_their_lease(store, workers, pg_schema_url):  # noqa: F811
    env = {"CORRAL_TEST_STEPS": "12", "CORRAL_TEST_STEP_S": "0.25"}
    sids = [store.create({"title": f"s{i}"}).session_id for i in range(4)]
    for sid in sids:
        enqueue_session(sid, pg_schema_url)
    pool = [workers("alpha", env=env), workers("beta", env=env)]
    held = wait_until("a lease", lambda: next((s.lease for s in store.sessions() if s.lease), None), timeout=30)
    assert held["worker"] in ("alpha", "beta")
    listing = subprocess.run(
        [sys.executable, "-m", "corral.cli", "sessions", "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "CORRAL_SESSION_STORE": pg_schema_url},
    )
    assert listing.returncode == 0 and ("alpha" in listing.stdout or "beta" in listing.stdout), (
        listing.stdout + listing.stderr
    )
    wait_until("every session idle", lambda: all(store.get(s).status == "idle" for s in sids), timeout=60)
    for sid in sids:
        assert_worked_in_turns(store, sid, 12)
        assert store.get(sid).lease is None
    both = {w for sid in sids for _, w, _ in steps(store, sid)}
    assert len(both) == 2, "both workers took sessions"
    assert all(w.proc.poll() is None for w in pool)


def test_a_killed_workers_session_is_picked_up_within_the_lease_plus_2s(store, workers, pg_schema_url):  # noqa: F811
    env = {"CORRAL_TEST_STEPS": "150", "CORRAL_TEST_STEP_S": "0.05"}
    sid = store.create().session_id
    enqueue_session(sid, pg_schema_url)
    first = workers("first", env=env)
    wait_until("a few steps", lambda: len(steps(store, sid)) >= 3, timeout=30)
    second = workers("second", env=env)
    wait_until("the second worker is up", lambda: "corral worker second" in second.log(), timeout=30)
    killed_at = first.signal(signal.SIGKILL)
    first.wait()
    assert store.get(sid).status != "idle", "the session must still be running when its worker dies"
    done_before = len(steps(store, sid))
    wait_until("the session taken over", lambda: len(steps(store, sid)) > done_before + 1, timeout=LEASE + 20)
    taken = next(t for i, w, t in steps(store, sid) if i >= done_before)
    wait_until("the session done", lambda: store.get(sid).status == "idle", timeout=30)
    turns = assert_worked_in_turns(store, sid, 150)
    assert len(turns) == 2
    # Pickup: the lease has to run out, then the next step is one step_s later.
    assert taken - killed_at <= LEASE + 2 + 0.05, f"picked up {taken - killed_at:.2f}s after the kill"


def test_a_paused_worker_that_lost_its_session_exits_without_writing(store, workers, pg_schema_url):  # noqa: F811
    env = {"CORRAL_TEST_STEPS": "150", "CORRAL_TEST_STEP_S": "0.05"}
    sid = store.create().session_id
    enqueue_session(sid, pg_schema_url)
    paused = workers("paused", env=env)
    wait_until("a few steps", lambda: len(steps(store, sid)) >= 3, timeout=30)
    paused.signal(signal.SIGSTOP)
    other = workers("other", env=env)
    wait_until(
        "the other worker's lease", lambda: (store.get(sid).lease or {}).get("worker") == "other", timeout=LEASE + 30
    )
    wait_until("a step by the other worker", lambda: steps(store, sid)[-1][1] != steps(store, sid)[0][1], timeout=10)
    paused.signal(signal.SIGCONT)  # it wakes up mid-session, holding a lease that is no longer its own
    assert paused.wait(timeout=30) == FENCED_EXIT, paused.log()
    assert "declared dead" in paused.log()
    wait_until("the session done", lambda: store.get(sid).status == "idle", timeout=30)
    assert len(assert_worked_in_turns(store, sid, 150)) == 2
    assert other.proc.poll() is None


def test_sigterm_hands_an_unfinished_session_to_another_worker(store, workers, pg_schema_url):  # noqa: F811
    env = {"CORRAL_TEST_STEPS": "150", "CORRAL_TEST_STEP_S": "0.05"}
    sid = store.create().session_id
    enqueue_session(sid, pg_schema_url)
    leaving = workers("leaving", env=env, extra=("--stop-grace", "0.3"))
    wait_until("a few steps", lambda: len(steps(store, sid)) >= 3, timeout=30)
    staying = workers("staying", env=env)
    wait_until("the second worker is up", lambda: "corral worker staying" in staying.log(), timeout=30)
    stopped_at = leaving.signal(signal.SIGTERM)
    assert leaving.wait(timeout=20) == 0, leaving.log()
    assert store.get(sid).status != "idle", "the session must still be running when its worker stops"
    assert time.time() - stopped_at < 10
    wait_until("the session done", lambda: store.get(sid).status == "idle", timeout=40)
    assert assert_worked_in_turns(store, sid, 150) == [f"pid{leaving.pid}", f"pid{staying.pid}"]


def test_a_worker_without_postgres_is_one_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "corral.cli", "worker"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "CORRAL_SESSION_STORE": f"sqlite:///{tmp_path / 's.db'}", "CORRAL_QUEUE_URL": ""},
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "corral: invalid_argument: the worker pool needs PostgreSQL (set CORRAL_SESSION_STORE (or CORRAL_QUEUE_URL) to postgresql://USER:PASSWORD@HOST/DB)"
    ]


def test_run_detach_queues_the_session_for_the_workers(store, workers, pg_schema_url):  # noqa: F811
    env = {**os.environ, "CORRAL_SESSION_STORE": pg_schema_url, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "corral.cli", "run", "--detach", "say hi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    sid = out.stdout.strip()
    assert [(e.type, e.data) for e in store.select(sid)] == [("user.message", {"text": "say hi"})]
    assert jobs(pg_schema_url) == [(sid, sid, "todo")]
    workers("solo", env={"CORRAL_TEST_STEPS": "2", "CORRAL_TEST_STEP_S": "0.01"})
    wait_until("the detached session done", lambda: store.get(sid).status == "idle", timeout=60)
    assert [e.type for e in store.select(sid)] == ["user.message", "work.step", "work.step", "session.status"]


def test_run_detach_without_postgres_is_one_clear_error(tmp_path):
    env = {**os.environ, "CORRAL_SESSION_STORE": f"sqlite:///{tmp_path / 's.db'}", "CORRAL_QUEUE_URL": ""}
    out = subprocess.run(
        [sys.executable, "-m", "corral.cli", "run", "--detach", "x"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1 and "needs PostgreSQL" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "s.db").exists(), "nothing was written"


def test_a_dead_workers_job_gives_way_to_a_newer_job_of_its_session(store, workers, pg_schema_url):  # noqa: F811
    env = {"CORRAL_TEST_STEPS": "150", "CORRAL_TEST_STEP_S": "0.05"}
    sid = store.create().session_id
    enqueue_session(sid, pg_schema_url)
    first = workers("first", env=env)
    wait_until("a few steps", lambda: len(steps(store, sid)) >= 3, timeout=30)
    assert enqueue_session(sid, pg_schema_url) is True  # a new message while it runs: one job waits behind it
    first.signal(signal.SIGKILL)
    first.wait()
    heir = workers("heir", env=env)
    wait_until("the session done", lambda: store.get(sid).status == "idle", timeout=LEASE + 60)
    assert len(assert_worked_in_turns(store, sid, 150)) == 2
    assert "superseded by the one waiting" in heir.log()
    wait_until("no job left to run", lambda: [s for *_, s in jobs(pg_schema_url)] == ["failed"], timeout=30)


def test_a_live_worker_keeps_a_session_longer_than_its_lease(store, workers, pg_schema_url):  # noqa: F811
    env = {"CORRAL_TEST_STEPS": "50", "CORRAL_TEST_STEP_S": "0.2"}  # 10 s: two and a half leases
    sid = store.create().session_id
    enqueue_session(sid, pg_schema_url)
    workers("holder", env=env)
    wait_until("the first step", lambda: steps(store, sid), timeout=30)
    workers("idle", env=env)  # reaps every poll: would take the session if the holder stopped beating
    wait_until("the session done", lambda: store.get(sid).status == "idle", timeout=60)
    assert len(assert_worked_in_turns(store, sid, 50)) == 1


def test_wake_detach_queues_an_existing_session_and_refuses_an_unknown_one(store, pg_schema_url):  # noqa: F811
    env = {**os.environ, "CORRAL_SESSION_STORE": pg_schema_url, "PYTHONPATH": str(ROOT)}
    sid = store.create().session_id
    out = subprocess.run(
        [sys.executable, "-m", "corral.cli", "wake", "--detach", sid],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == sid, out.stderr
    assert jobs(pg_schema_url) == [(sid, sid, "todo")]
    out = subprocess.run(
        [sys.executable, "-m", "corral.cli", "wake", "--detach", "ses_nope"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1 and out.stderr.startswith("corral: not_found: session 'ses_nope' not found"), out.stderr
    assert len(jobs(pg_schema_url)) == 1


def test_a_session_a_failed_job_left_running_is_resumed_by_the_pool(store, workers, pg_schema_url, tmp_path):  # noqa: F811
    sid = store.create().session_id
    enqueue_session(sid, pg_schema_url)
    env = {"CORRAL_TEST_STEPS": "3", "CORRAL_TEST_MARKER_DIR": str(tmp_path)}
    w = workers("solo", body="tests.workers.bodies:crashes_once", env=env)
    wait_until("the session done after its job failed", lambda: store.get(sid).status == "idle", timeout=60)
    assert [i for i, _, _ in steps(store, sid)] == [0, 1, 2]
    assert "resuming session " + sid in w.log()
    failed = [e.data for e in store.select(sid, types=["session.status"]) if e.data.get("status") == "failed"]
    assert [(d["kind"], d["message"], d["writer"]) for d in failed] == [
        ("RuntimeError", "a bug outside the harness", "worker solo")
    ]
    assert sorted(status for _, _, status in jobs(pg_schema_url)) == ["failed"], (
        "the failed job stays, the resumed one succeeded (deleted)"
    )
