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
            store.append(session_id, [NewEvent(type="work.step", data={"i": i, "worker": me}, event_id=f"{session_id}-step-{i}")], position)
        store.append(session_id, [NewEvent(type="session.status", data={"status": "idle", "worker": me})])

    return body
