"""Job bodies for worker tests: deterministic, resumable work that writes through the leased store.

`scripted` appends `CORRAL_TEST_STEPS` `work.step` events, one every `CORRAL_TEST_STEP_S`
seconds, each at the position it expects (so a resumed session carries on where the log
ends), then a `session.status` idle. Every step names the worker process that wrote it,
so a test can read from the log alone who worked the session, and when.
"""

from __future__ import annotations

import asyncio
import os

from corral.servers.session import EventStore, NewEvent


def scripted():
    steps = int(os.environ.get("CORRAL_TEST_STEPS", "5"))
    step_s = float(os.environ.get("CORRAL_TEST_STEP_S", "0.05"))
    me = f"pid{os.getpid()}"

    async def body(store: EventStore, session_id: str) -> None:
        done = sum(1 for e in store.select(session_id, types=["work.step"]))
        start = store.length(session_id)
        for i in range(done, steps):
            await asyncio.sleep(step_s)
            position = start + (i - done)
            store.append(
                session_id,
                [NewEvent(type="work.step", data={"i": i, "worker": me}, event_id=f"{session_id}-step-{i}")],
                position,
            )
        store.append(session_id, [NewEvent(type="session.status", data={"status": "idle", "worker": me})])

    return body


def crashes_once():
    """`scripted`, but its first job in this directory dies mid-session of an error outside
    the harness (a bug), leaving the session `running` with no outcome recorded."""
    marker = os.path.join(os.environ["CORRAL_TEST_MARKER_DIR"], "crashed")
    body = scripted()

    async def crashing(store: EventStore, session_id: str) -> None:
        if not os.path.exists(marker):
            store.append(session_id, [NewEvent(type="session.status", data={"status": "running"})])
            open(marker, "w").close()
            raise RuntimeError("a bug outside the harness")
        await body(store, session_id)

    return crashing
