"""The worker pool: sessions that need work are procrastinate jobs; any worker may wake any session.

    enqueue_session(session_id)      a job `corral.wake_session`, lock = queueing_lock = session id
    corral worker                    a procrastinate worker running those jobs

Who holds a session, and why two never do at once:

1. The queue. A job's `lock` is its session id, so procrastinate runs at most one job per
   session at a time; `queueing_lock` keeps at most one more waiting (a second
   `enqueue_session` while one waits is a no-op: the waiting job will see the new message).
2. The log. A job first takes the session's lease in the store (a fencing token) and the
   harness writes through `LeasedStore`, so every append carries the token. The store
   refuses (`Conflict`, nothing written) an append under a lease someone else took.

Death. Each worker heartbeats (procrastinate) and renews its leases every third of
`lease_s`. A worker silent for `lease_s` is stalled: any live worker's reaper hands its
jobs back to the queue (`get_stalled_jobs` + `retry_job`), and the next worker to fetch one
takes the lease once it has expired. A worker that wakes up after being declared dead (it
was paused, or cut off) finds its lease gone or its heartbeat row pruned and exits at once:
its jobs belong to others now, and it must not touch them, not even to mark them done.
It finds out on its next append, its next renewal, or at the latest when it releases the
lease at the end of the job (whatever ended the job, e.g. its connection cut by the
server's idle-transaction timeout), before procrastinate could mark the job finished.

Database outages. A restart, a failover or an outage of up to `outage_s` is weather: the
job's store calls wait for the database (`outage.py`), the worker keeps fetching, beating
and acknowledging jobs through it (`SteadyWorker`), and nobody is declared dead for
having been silent while the database could not hear them: a reaper only reaps after it
has itself reached the database for a whole `lease_s` (every live worker has beaten by
then). A job that failed for a transient reason anyway is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import procrastinate
import procrastinate.worker
import psycopg
from procrastinate import exceptions as pq_exceptions
from procrastinate.job_context import JobContext
from procrastinate.retry import BaseRetryStrategy, RetryDecision

from corral.errors import Conflict, CorralError, Unavailable
from corral.harness.outage import SteadyStore, ride_out
from corral.servers.session import EventStore, LeaseLost, NewEvent
from corral.servers.session.postgres import StoreRefused
from corral.servers.session.rules import STATUS_EVENT

log = logging.getLogger("corral.worker")

QUEUE = "corral_sessions"
TASK = "corral.wake_session"
SCHEMA_LOCK = 0x636F7271  # pg_advisory_xact_lock key: one process installs the queue schema
FENCED_EXIT = 75  # EX_TEMPFAIL: a supervisor should just start the worker again

Body = Callable[[EventStore, str], Awaitable[None]]
"""A job's work: wake `session_id`, writing through the (leased) store."""


class SessionBusy(Unavailable):
    """The session's lease is held by a live worker; the job is retried later."""


# -- the queue ----------------------------------------------------------------------------


def make_app(queue_url: str) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=queue_url))
    app.task(name=TASK, queue=QUEUE, pass_context=True, retry=HandBack())(wake_session)
    return app


def ensure_queue_schema(queue_url: str) -> None:
    """Install procrastinate's tables once (first worker or first enqueue), race-free."""
    try:
        with psycopg.connect(queue_url, connect_timeout=10) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            if (conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone() or (None,))[0] is None:
                conn.execute(procrastinate.schema.SchemaManager.get_schema())
    except psycopg.OperationalError as err:
        raise Unavailable(
            f"cannot reach the job queue database: {' '.join(str(err).split())}",
            hint="check CORRAL_QUEUE_URL / CORRAL_SESSION_STORE",
        ) from err


def enqueue_session(session_id: str, queue_url: str) -> bool:
    """Queue `session_id` for the workers; False if a job for it is already waiting."""
    ensure_queue_schema(queue_url)
    app = make_app(queue_url)
    with app.open():
        try:
            app.configure_task(TASK, lock=session_id, queueing_lock=session_id).defer(session_id=session_id)
        except pq_exceptions.AlreadyEnqueued:
            return False
    return True


def submit(store: EventStore, queue_url: str, task: str, *, session_id: str | None = None) -> str:
    """What `corral run --detach` does: write the user's message, queue the session, return its id."""
    sid = session_id or store.create({"task": task[:200]}).session_id
    store.append(sid, [NewEvent(type="user.message", data={"text": task})])
    enqueue_session(sid, queue_url)
    return sid


class HandBack(BaseRetryStrategy):
    """Retry a job that could not run yet (lease busy), was cut short by a worker's shutdown,
    or met a database outage longer than the worker rides out (then with backoff, to 60 s).

    Anything else is final (`final`): the session log says what happened, and a new user
    message queues the session again.
    """

    def get_retry_decision(self, *, exception: BaseException, job: procrastinate.jobs.Job) -> RetryDecision | None:
        if isinstance(exception, SessionBusy | pq_exceptions.JobAborted | asyncio.CancelledError):
            return RetryDecision(retry_in={"seconds": 1})
        if isinstance(exception, Unavailable | pq_exceptions.ConnectorException) and not final(exception):
            return RetryDecision(retry_in={"seconds": min(60, 2 ** min(job.attempts, 6))})
        return None


# -- one job --------------------------------------------------------------------------------


def final(err: BaseException) -> bool:
    """Whether `err` ends a job for good: not a busy lease, a stop, a lost lease (the worker
    fences), or an outage (the store down, the queue unreachable): a bug, a schema mismatch,
    a refused login, an error the harness met."""
    if isinstance(err, StoreRefused):
        return True
    transient = SessionBusy | LeaseLost | Unavailable | pq_exceptions.ConnectorException | pq_exceptions.JobAborted
    return not isinstance(err, transient | asyncio.CancelledError)


def failure(err: BaseException, worker: str) -> NewEvent:
    """The `session.status` failed event a worker writes for a job that died of `err`."""
    kind = err.kind if isinstance(err, CorralError) else type(err).__name__
    message = err.message if isinstance(err, CorralError) else str(err)
    data = {
        "status": "failed",
        "writer": f"worker {worker}",
        "by": "worker",
        "kind": kind,
        "message": message,
        "reason": f"{kind}: {message}",
    }
    return NewEvent(type=STATUS_EVENT, data=data)


class LeasedStore:
    """The store as one job sees it: appends to its session carry the lease token.

    An append refused for a lost lease means this worker was declared dead: `on_fenced`
    ends the process before anything else (the harness, procrastinate) can act on it.
    """

    def __init__(
        self, store: EventStore | SteadyStore, session_id: str, token: int, on_fenced: Callable[[str], None]
    ) -> None:
        self._store = store
        self._session_id = session_id
        self._token = token
        self._on_fenced = on_fenced

    def append(self, session_id: str, events: Sequence[NewEvent], expected_position: int | None = None) -> list[int]:
        if session_id != self._session_id:  # e.g. a subagent's child session: not leased
            return self._store.append(session_id, events, expected_position)
        try:
            return self._store.append(session_id, events, expected_position, lease=self._token)
        except LeaseLost as err:
            self._on_fenced(err.message)
            raise

    def append_one(
        self,
        session_id: str,
        type: str,
        data: Any = None,
        *,
        expected_position: int | None = None,
        event_id: str | None = None,
    ) -> int:
        event = NewEvent(type=type, data={} if data is None else data, event_id=event_id)
        return self.append(session_id, [event], expected_position)[0]

    def __getattr__(self, name: str) -> Any:  # reads, create, fork: as the store does them
        return getattr(self._store, name)


@dataclass
class Runtime:
    """What every job of one worker process shares."""

    store: EventStore
    body: Body
    name: str
    lease_s: float
    outage_s: float = 300.0
    app: procrastinate.App | None = None
    exit_process: Callable[[int], None] = os._exit

    def fence(self, why: str) -> None:
        log.error("worker %s was declared dead and must not touch its sessions: %s; exiting", self.name, why)
        logging.shutdown()
        self.exit_process(FENCED_EXIT)

    async def acquire(self, session_id: str) -> int:
        """The session's lease; waits out a dead holder's lease, gives up on a live one."""
        deadline = time.monotonic() + self.lease_s + 2
        steady = SteadyStore(self.store, self.outage_s)
        while True:
            try:
                lease = await asyncio.to_thread(steady.acquire_lease, session_id, self.name, self.lease_s)
                return lease.token
            except Conflict as err:
                if time.monotonic() > deadline:
                    raise SessionBusy(f"session {session_id} is still leased: {err.message}") from err
                await asyncio.sleep(min(0.25, self.lease_s / 10))

    async def keep(self, session_id: str, token: int, worker_id: int | None) -> None:
        """Renew the lease while the job runs; fence if it was taken, or our worker row pruned."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await asyncio.to_thread(self.store.renew_lease, session_id, token, self.lease_s)
                pruned = worker_id is not None and self.app is not None and not await worker_alive(self.app, worker_id)
            except Conflict as err:
                self.fence(err.message)
            except (
                Unavailable,
                pq_exceptions.ConnectorException,
            ) as err:  # a blip: the lease has two more renewals' worth of slack
                log.warning("could not renew the lease on %s: %s", session_id, err)
                continue
            if pruned:
                self.fence(f"its heartbeat row {worker_id} was pruned by another worker")

    async def work(self, session_id: str, worker_id: int | None) -> None:
        token = await self.acquire(session_id)
        log.info("claimed session %s (lease %d)", session_id, token)
        keeper = asyncio.create_task(self.keep(session_id, token, worker_id))
        leased = LeasedStore(SteadyStore(self.store, self.outage_s), session_id, token, self.fence)
        start = 0  # the log's length when the job began: what it writes comes after
        try:
            start = await asyncio.to_thread(leased.length, session_id)
            await in_own_loop(lambda: self.body(leased, session_id))  # type: ignore[arg-type]
        except Exception as err:
            if final(err):
                await asyncio.to_thread(self.record_failure, leased, session_id, start, err)
            raise
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            try:
                released = await asyncio.to_thread(
                    ride_out,
                    lambda: self.store.release_lease(session_id, token),
                    f"release {session_id}",
                    self.outage_s,
                )
            except Unavailable as err:  # it expires on its own; the next worker waits that out
                log.warning("could not release the lease on %s: %s", session_id, err)
            else:
                if not released:  # taken over while we ran: the job is another worker's now
                    self.fence(f"lease {token} on session {session_id} was taken over while this job ran")
                log.info("released session %s (lease %d)", session_id, token)

    def record_failure(self, leased: LeasedStore, session_id: str, start: int, err: BaseException) -> None:
        """Say in the session's log why its job failed, unless the harness already did.

        Best effort: the job fails anyway, and the worker's log keeps the reason when the
        store cannot take it (it refused our login, or the lease was lost meanwhile).
        """
        log.error("job for session %s failed: %s: %s", session_id, type(err).__name__, err)
        if isinstance(err, StoreRefused):
            return  # nothing can be written with credentials the server refuses
        try:
            recorded = leased.select(session_id, gte=start, types=[STATUS_EVENT])
            if not any(e.data.get("status") == "failed" for e in recorded):  # the harness records its own failures
                leased.append(session_id, [failure(err, self.name)])
        except (CorralError, LeaseLost) as second:
            log.error("could not record the failure in session %s: %s", session_id, second)


async def in_own_loop(make: Callable[[], Awaitable[None]]) -> None:
    """Run a job body on its own event loop in a thread.

    The harness may block its loop (first imports, sync store calls, subprocess start-up);
    on the worker's loop that would delay heartbeats and lease renewals until the pool
    declares a busy worker dead. Cancelling this coroutine cancels the body in its loop and
    waits for it to wind down (the harness records that it was stopped).
    """
    ready = threading.Event()
    inner: dict[str, Any] = {}

    def thread_main() -> None:
        async def runner() -> None:
            inner["loop"], inner["task"] = asyncio.get_running_loop(), asyncio.current_task()
            ready.set()
            await make()

        asyncio.run(runner())

    done = asyncio.ensure_future(asyncio.to_thread(thread_main))
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        if await asyncio.to_thread(ready.wait, 5):
            inner["loop"].call_soon_threadsafe(inner["task"].cancel)
        with contextlib.suppress(BaseException):
            await done
        raise


async def wake_session(context: JobContext, session_id: str) -> None:
    """The task: work one session under its lease (the runtime comes with the worker)."""
    runtime: Runtime = context.additional_context["corral"]
    await runtime.work(session_id, context.job.worker_id)


async def worker_alive(app: procrastinate.App, worker_id: int) -> bool:
    row = await app.connector.execute_query_one_async(
        "SELECT count(*) AS n FROM procrastinate_workers WHERE id = %(id)s", id=worker_id
    )
    return bool(row["n"])


# -- the reaper -----------------------------------------------------------------------------


async def reap_stalled(
    app: procrastinate.App,
    worker: procrastinate.worker.Worker,
    lease_s: float,
    every_s: float,
    store: EventStore | None = None,
) -> None:
    """Hand the jobs of workers silent for `lease_s` back to the queue (runs in every worker).

    Silence only counts while the database could hear it: after this reaper failed to reach
    the database, it waits until it has reached it for a whole `lease_s` (each live worker
    has beaten by then) before it judges anyone.
    """
    reachable_since: float | None = None
    while True:
        await asyncio.sleep(every_s)
        if worker.worker_id is None:  # not registered yet, or stopping
            continue
        try:
            if reachable_since is None:
                await app.connector.execute_query_one_async("SELECT 1 AS up")
                reachable_since = time.monotonic()
            elif time.monotonic() - reachable_since >= lease_s:
                await reap_once(app, lease_s, worker.worker_id)
                if store is not None:
                    await resume_orphans(app, store)
        except (
            psycopg.Error,
            pq_exceptions.ConnectorException,
        ) as err:  # a blip or an outage: judge nobody until it is over
            if reachable_since is not None:
                log.warning("stalled-job check failed: %s", err)
            reachable_since = None


class SteadyWorker(procrastinate.worker.Worker):
    """procrastinate's worker, riding out database outages instead of stopping.

    Upstream, a failed heartbeat stops the worker and a failed fetch ends its run loop, and a
    job's outcome that cannot be written is lost. Here a heartbeat or fetch that fails is
    tried again on the next round, and a job's outcome is written once the database is back
    (for up to `outage_s`). Notifications are off: the worker polls (`poll_s`), so there is
    no listening connection to lose.
    """

    def __init__(self, *args: Any, outage_s: float, **kwargs: Any) -> None:
        kwargs["listen_notify"] = False  # polling only: no listening connection to lose
        super().__init__(*args, **kwargs)
        self.outage_s = outage_s

    async def _update_heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.update_heartbeat_interval)
            if self.worker_id is None:  # not registered yet, or stopping
                continue
            try:
                await self.app.job_manager.update_heartbeat(self.worker_id)
            except pq_exceptions.ConnectorException as err:
                log.warning("heartbeat failed (the next one retries): %s", err)

    async def _fetch_and_process_jobs(self) -> None:
        try:
            await super()._fetch_and_process_jobs()
        except pq_exceptions.ConnectorException as err:  # the run loop polls again after poll_s
            log.warning("fetching a job failed (retrying): %s", err)

    async def _persist_job_status(self, *args: Any, **kwargs: Any) -> None:
        deadline = time.monotonic() + self.outage_s
        delay = 0.1
        while True:
            try:
                return await super()._persist_job_status(*args, **kwargs)
            except pq_exceptions.ConnectorException as err:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("recording a job's outcome failed (retrying): %s", err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


async def reap_once(app: procrastinate.App, lease_s: float, own_id: int | None = None) -> list[int]:
    manager = app.job_manager
    handed: list[int] = []
    for job in await manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=lease_s):
        if own_id is not None and job.worker_id == own_id:  # we are running it: alive, if late to beat
            continue
        if job.id is None:  # a job read from the database always has its id
            continue
        session_id = job.task_kwargs.get("session_id")
        try:
            await manager.retry_job(job, retry_at=datetime.datetime.now(datetime.UTC))
        except pq_exceptions.UniqueViolation:  # a newer job of the session already waits: it covers this one
            await manager.finish_job_by_id_async(job.id, status=procrastinate.jobs.Status.FAILED, delete_job=False)
            log.warning("stalled job %s of session %s superseded by the one waiting", job.id, session_id)
        except pq_exceptions.ConnectorException as err:  # another worker's reaper handed it back first
            log.info("stalled job %s already handled: %s", job.id, err)
        else:
            handed.append(job.id)
            log.warning("handed session %s back to the queue: worker %s stopped beating", session_id, job.worker_id)
    await manager.prune_stalled_workers(lease_s)
    return handed


RESUME_LIMIT = 3  # a session whose job keeps failing is left for a person after this many
ORPHANS = """
SELECT lock AS session_id FROM procrastinate_jobs WHERE queue_name = %(queue)s AND lock IS NOT NULL
GROUP BY lock
HAVING bool_and(status NOT IN ('todo', 'doing')) AND count(*) FILTER (WHERE status = 'failed') BETWEEN 1 AND %(limit)s
"""


def failed_by_worker(store: EventStore, session_id: str) -> bool:
    """Whether the session's last status is a failure its worker recorded (`failure`), e.g.
    a bug outside the harness: worth another try (up to RESUME_LIMIT failed jobs)."""
    last = store.select(session_id, types=[STATUS_EVENT], desc=True, limit=1)
    return bool(last) and last[0].data.get("by") == "worker"


async def resume_orphans(app: procrastinate.App, store: EventStore) -> list[str]:
    """Queue again each session a failed job left `running` (its harness recorded no outcome),
    or `failed` by its worker (`failure`: an error outside the harness), with no live lease
    and nothing queued. A session the harness marked `failed` stays so: its log says why."""
    resumed: list[str] = []
    for row in await app.connector.execute_query_all_async(ORPHANS, queue=QUEUE, limit=RESUME_LIMIT):
        sid = row["session_id"]
        try:
            info = await asyncio.to_thread(store.get, sid)
            resumable = info.status == "running" or (
                info.status == "failed" and await asyncio.to_thread(failed_by_worker, store, sid)
            )
        except (Unavailable, LookupError):  # down again, or not a session of this store
            continue
        live = info.lease is not None and datetime.datetime.fromisoformat(
            info.lease["expires_at"]
        ) > datetime.datetime.now(datetime.UTC)
        if live or not resumable:
            continue
        with contextlib.suppress(pq_exceptions.AlreadyEnqueued):
            await app.configure_task(TASK, lock=sid, queueing_lock=sid).defer_async(session_id=sid)
            resumed.append(sid)
            log.warning("resuming session %s: its last job failed and left it %s", sid, info.status)
    return resumed


# -- the worker -------------------------------------------------------------------------------


def load_body(spec: str) -> Body:
    """`module:factory` -> the body the factory builds (called once, at the edge)."""
    module, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    return factory()


async def run_worker(
    runtime: Runtime, queue_url: str, *, concurrency: int = 1, stop_grace_s: float = 10.0, poll_s: float = 0.5
) -> None:
    """Run jobs until SIGINT/SIGTERM; a stop hands unfinished sessions back after `stop_grace_s`."""
    ensure_queue_schema(queue_url)
    app = make_app(queue_url)
    runtime.app = app
    async with app.open_async():
        worker = SteadyWorker(
            app,
            outage_s=runtime.outage_s,
            queues=[QUEUE],
            name=runtime.name,
            concurrency=concurrency,
            fetch_job_polling_interval=poll_s,
            abort_job_polling_interval=max(poll_s, 1.0),
            update_heartbeat_interval=runtime.lease_s / 3,
            stalled_worker_timeout=runtime.lease_s,
            shutdown_graceful_timeout=stop_grace_s,
            additional_context={"corral": runtime},
            delete_jobs="successful",
        )
        reaper = asyncio.create_task(reap_stalled(app, worker, runtime.lease_s, poll_s, runtime.store))
        try:
            await worker.run()
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
