"""Riding out a database outage: a worker waits for PostgreSQL instead of failing the session.

A restart, a failover or a short outage makes store calls raise `StoreDown`. A worker treats
that as weather: `SteadyStore` retries the call with capped backoff for up to `budget_s`
(`CORRAL_WORKER_OUTAGE_S`), so the harness above it never sees the outage and carries on
from where it was, with nothing repeated: a model response waiting to be written is
written once the database is back, not asked for again. Only an outage longer than the
budget, or an error that is not an outage (bad credentials, a schema mismatch, a bug),
reaches the harness, which records it and fails the session.

Appends are retried safely: each event gets an idempotency key before the first attempt,
so a commit whose answer the outage swallowed is found on the retry, not written twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from corral.errors import Unavailable
from corral.servers.session import EventStore, NewEvent, new_id
from corral.servers.session.postgres import StoreDown

log = logging.getLogger("corral.worker")
T = TypeVar("T")
MAX_DELAY_S = 1.0  # a failed try costs one refused connection: retry often, so recovery is prompt


class OutageTooLong(Unavailable):
    """The store stayed down longer than the worker's outage budget."""


def ride_out(call: Callable[[], T], what: str, budget_s: float) -> T:
    """`call()`, retried while the store is down, for at most `budget_s` seconds."""
    deadline = time.monotonic() + budget_s
    delay = 0.1
    warned = False
    while True:
        try:
            result = call()
        except StoreDown as err:
            if time.monotonic() + delay > deadline:
                raise OutageTooLong(
                    f"{what}: the session database stayed unreachable for over {budget_s:g}s ({err.message})",
                    hint="bring PostgreSQL back, then `corral wake --detach SESSION` (or raise CORRAL_WORKER_OUTAGE_S)",
                ) from err
            if not warned:
                log.warning(
                    "%s: the session database is unreachable, waiting up to %gs: %s", what, budget_s, err.message
                )
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
        else:
            if warned:
                log.warning("%s: the session database is back", what)
            return result


class SteadyStore:
    """The store with every call ridden out (`ride_out`); appends carry idempotency keys."""

    def __init__(self, store: EventStore, budget_s: float) -> None:
        self._store = store
        self.budget_s = budget_s

    def append(
        self, session_id: str, events: Sequence[NewEvent], expected_position: int | None = None, **kwargs: Any
    ) -> list[int]:
        keyed = [e if e.event_id is not None else e.model_copy(update={"event_id": new_id("evt_")}) for e in events]
        return ride_out(
            lambda: self._store.append(session_id, keyed, expected_position, **kwargs),
            f"append to {session_id}",
            self.budget_s,
        )

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def steady(*args: Any, **kwargs: Any) -> Any:
            return ride_out(lambda: attr(*args, **kwargs), f"{name} {args[0] if args else ''}".strip(), self.budget_s)

        return steady
