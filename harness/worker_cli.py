"""`corral worker`: run queued sessions (a pool of these on any hosts share one PostgreSQL)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

DEFAULT_BODY = "corral.harness.pool_body:harness_body"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="work queued sessions (needs a postgresql:// session store)",
        description=__doc__
        + "\n\nSIGINT/SIGTERM stop it: running sessions get --stop-grace seconds to finish, then go back to the queue.",
    )
    p.add_argument("--name", help="lease holder name shown by `corral sessions list` (default HOST:PID)")
    p.add_argument("--concurrency", type=int, help="sessions worked at once (default CORRAL_WORKER_CONCURRENCY, 1)")
    p.add_argument("--lease", type=float, metavar="SECONDS", help="lease timeout (default CORRAL_WORKER_LEASE_S, 15)")
    p.add_argument("--stop-grace", type=float, metavar="SECONDS", help="default CORRAL_WORKER_STOP_GRACE_S, 10")
    p.add_argument(
        "--body",
        default=DEFAULT_BODY,
        metavar="MODULE:FACTORY",
        help="what a job runs (default: the reference harness's wake)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every claim and release")
    p.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    from corral.harness.pool import Runtime, load_body, run_worker
    from corral.harness.worker_config import WorkerSettings

    overrides = {
        key: value
        for key, value in {
            "worker_name": args.name,
            "worker_concurrency": args.concurrency,
            "worker_lease_s": args.lease,
            "worker_stop_grace_s": args.stop_grace,
        }.items()
        if value is not None
    }
    settings = WorkerSettings(**overrides)
    queue_url = settings.queue_dsn()
    _log_to_stderr(logging.INFO if args.verbose else logging.WARNING)
    body = load_body(args.body)
    settings.store_dsn()  # many hosts share one store: refuse SQLite before opening anything
    store = settings.open_store()
    runtime = Runtime(
        store=store,
        body=body,
        name=settings.worker_name,
        lease_s=settings.worker_lease_s,
        outage_s=settings.worker_outage_s,
    )
    print(
        f"corral worker {settings.worker_name}: lease {settings.worker_lease_s:g}s, rides out {settings.worker_outage_s:g}s of database outage, concurrency {settings.worker_concurrency}",
        file=sys.stderr,
        flush=True,
    )
    try:
        asyncio.run(
            run_worker(
                runtime,
                queue_url,
                concurrency=settings.worker_concurrency,
                stop_grace_s=settings.worker_stop_grace_s,
                poll_s=settings.worker_poll_s,
            )
        )
    finally:
        store.close()
    return 0


def _log_to_stderr(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(created).3f %(levelname)s %(name)s: %(message)s"))
    for name in ("corral.worker", "procrastinate"):
        logger = logging.getLogger(name)
        logger.setLevel(level if name == "corral.worker" else logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False


def run_detached(task: str | None, session_id: str | None, model: str | None) -> int:
    """`corral run --detach` (write the task as a user message) / `corral wake --detach`: queue the session."""
    from corral.errors import InvalidArgument
    from corral.harness.pool import enqueue_session, submit
    from corral.harness.worker_config import WorkerSettings

    if model:
        raise InvalidArgument("--model does not apply to --detach", hint="the workers' CORRAL_MODEL chooses the model")
    settings = WorkerSettings()
    queue_url = settings.queue_dsn()
    settings.store_dsn()  # many hosts share one store: refuse SQLite before opening anything
    store = settings.open_store()
    try:
        if task is None:
            sid = store.get(session_id or "").session_id  # NotFound for an unknown session
            enqueue_session(sid, queue_url)
        else:
            sid = submit(store, queue_url, task, session_id=session_id)
    finally:
        store.close()
    print(sid)
    print(f"queued for the workers; follow it with `corral sessions tail {sid}`", file=sys.stderr)
    return 0
