"""Worker-pool settings (`CORRAL_QUEUE_URL`, `CORRAL_WORKER_*`), read once by the CLI."""

from __future__ import annotations

import os
import socket

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from corral.errors import InvalidArgument
from corral.servers.session.config import SessionSettings


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerSettings(SessionSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    queue_url: str = Field(
        "",
        description="PostgreSQL database of the job queue (procrastinate); empty: the session store's, which must then be postgresql://",
    )
    worker_name: str = Field(
        default_factory=default_worker_name, description="how this worker appears as a lease holder"
    )
    worker_lease_s: float = Field(
        15.0,
        ge=1.0,
        description="lease timeout: a worker silent this long is dead; its sessions go to another worker (heartbeat every third of it)",
    )
    worker_concurrency: int = Field(1, ge=1, description="sessions one worker process works at once")
    worker_stop_grace_s: float = Field(
        10.0,
        ge=0,
        description="on SIGTERM, how long running sessions may finish before they are handed back to the queue",
    )
    worker_outage_s: float = Field(
        300.0,
        ge=0,
        description="how long a worker waits out an unreachable session database (restart, failover, outage) before the session fails: "
        "a restart takes seconds and a managed failover one to two minutes; longer is an incident someone should see",
    )
    worker_poll_s: float = Field(
        0.5, gt=0, description="how often an idle worker looks for jobs and for stalled workers' jobs"
    )

    def queue_dsn(self) -> str:
        url = self.queue_url or self.session_store
        if not url.startswith(("postgresql://", "postgres://")):
            raise InvalidArgument(
                "the worker pool needs PostgreSQL",
                hint="set CORRAL_SESSION_STORE (or CORRAL_QUEUE_URL) to postgresql://USER:PASSWORD@HOST/DB",
            )
        return url

    def store_dsn(self) -> str:
        url = self.store_url()
        if not url.startswith(("postgresql://", "postgres://")):
            raise InvalidArgument(
                "workers on many hosts need a shared session store",
                hint="set CORRAL_SESSION_STORE=postgresql://USER:PASSWORD@HOST/DB",
            )
        return url
