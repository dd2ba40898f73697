"""The session server rides out a PostgreSQL outage: while the database is stopped every
`emit_event` answers `unavailable` with a retry hint, promptly (no hang); once it is back,
the same server (same store, same pool) serves again and every acknowledged event is there.

The cluster is the tests' own (`tests/workers/private_pg.py`): the shared server must never
go down under other tests.
"""

from __future__ import annotations

import json
import time

import anyio
import pytest
from mcp.client import Client

from corral.servers.session import open_store
from corral.servers.session.server import build_server
from tests.workers.private_pg import private_pg  # noqa: F401 - fixture

pytestmark = [pytest.mark.anyio, pytest.mark.requires("postgres")]
PROMPT_S = 3.0  # an answer while down comes within about a second (the store's down_wait_s); this bounds it loosely


async def test_emit_event_while_postgres_stops_and_returns(private_pg):  # noqa: F811
    store = open_store(private_pg.url)
    sid = store.create().session_id
    calls: list[tuple[float, float, bool, str]] = []  # (started, took, is_error, text)
    done = anyio.Event()

    async with Client(build_server(store)) as client:

        async def emit_forever() -> None:
            n = 0
            while not done.is_set():
                started = time.monotonic()
                result = await client.call_tool(
                    "emit_event", {"session_id": sid, "type": "test.tick", "data": {"n": n}}
                )
                calls.append((started, time.monotonic() - started, result.is_error, result.content[0].text))
                n += 1
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(emit_forever)
            await anyio.sleep(0.5)
            stopped_at = time.monotonic()
            await anyio.to_thread.run_sync(private_pg.stop)
            await anyio.sleep(4)
            await anyio.to_thread.run_sync(private_pg.start)
            back_at = time.monotonic()
            with anyio.fail_after(30):
                while not [c for c in calls if c[0] > back_at and not c[2]]:
                    await anyio.sleep(0.05)
            done.set()

        # The same server answers after the outage, with no restart.
        after = await client.call_tool("emit_event", {"session_id": sid, "type": "test.after"})
        assert not after.is_error, after.content[0].text

    during = [c for c in calls if stopped_at + 1 < c[0] < back_at - PROMPT_S]
    assert during and all(c[2] for c in during), "calls while the database was down answer with an error"
    assert all(c[1] < PROMPT_S for c in during), f"an answer while down took {max(c[1] for c in during):.1f}s"
    assert all("unavailable: " in c[3] and "retry in a few seconds" in c[3] for c in during), during[0][3]
    acknowledged = [json.loads(c[3])["position"] for c in calls if not c[2]]
    events = store.select(sid)
    store.close()
    assert [e.position for e in events] == list(range(len(events)))
    assert set(acknowledged) <= {e.position for e in events if e.type == "test.tick"}, (
        "an acknowledged event is missing"
    )
    assert events[-1].type == "test.after"
