"""The fault test: three `corral worker` processes running the reference harness on one
PostgreSQL, twenty scripted sessions (fake Anthropic API on loopback), one worker SIGKILLed
mid-run and another stopped (SIGTERM) and restarted.

Every session completes, none is worked by two workers at once, no recorded model call is
requested again, and every history is valid.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter, defaultdict
from itertools import pairwise

import psycopg
import pytest

from corral.harness.pool import FENCED_EXIT, submit
from corral.servers.session import Event, EventStore, open_store
from tests.harness.fake_anthropic import FakeAnthropic, Script, Turn, text, tool
from tests.session.pg import pg_schema_url  # noqa: F401 - fixture
from tests.workers.helpers import Worker, harness_env, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
SESSIONS = 20
LEASE = 6.0
CLAIM = re.compile(r"^(\d+\.\d+) INFO corral\.worker: (claimed|released) session (\S+) \(lease (\d+)\)$", re.MULTILINE)


def script() -> Script:
    def turns(i: int) -> list:
        return [
            Turn([text(f"working on {i}"), tool("toolbox__slow", {"seconds": 0.2})]),
            Turn([tool("toolbox__put", {"key": f"k{i}", "value": str(i)})]),
            Turn([tool("toolbox__slow", {"seconds": 0.2})]),
            Turn([text(f"done {i}")]),
        ]

    return Script({f"FAULT-{i:02d}:": turns(i) for i in range(SESSIONS)})


def mid_session(store: EventStore, pool: list[Worker], spare: Worker | None = None) -> Worker | None:
    """A live worker (other than `spare`) that holds a session's lease right now."""
    held = {(s.lease or {}).get("worker") for s in store.sessions(limit=SESSIONS)}
    return next((w for w in pool if w.name in held and w.proc.poll() is None and w is not spare), None)


def assert_valid_history(log: list[Event]) -> None:
    assert [e.position for e in log] == list(range(len(log)))
    uses = [e.data["id"] for e in log if e.type == "agent.tool_use"]
    results = Counter(e.data["tool_use_id"] for e in log if e.type == "agent.tool_result")
    assert len(uses) == len(set(uses)) and set(results) <= set(uses)
    assert all(results[u] == 1 for u in uses), f"a tool_use without exactly one result: {results}"
    spans = [e.data["message_id"] for e in log if e.type == "span.model_request"]
    assert len(spans) == len(set(spans)) == 4


def assert_writes_in_lease_order(url: str, sid: str) -> None:
    """From the log itself: no event was written under a lease older than one already used."""
    with psycopg.connect(url) as conn:
        tokens = [
            r[0]
            for r in conn.execute(
                "SELECT lease_token FROM corral_events WHERE session_id = %s ORDER BY position", (sid,)
            )
        ]
    leased = [t for t in tokens if t is not None]
    assert leased == sorted(leased), f"{sid}: written under leases {leased}"
    assert tokens[0] is None and len(leased) == len(tokens) - 1, "every event but the user's came from a worker's lease"


def assert_never_two_at_once(workers: list[Worker], deaths: dict[str, float]) -> None:
    """From the workers' own journals: per session, each claim ends before the next begins.

    A worker that fenced itself (declared dead while working) is left out: the store
    refused its late writes, which `assert_writes_in_lease_order` checks from the log.
    """
    spans: dict[str, list[tuple[float, float, int, str]]] = defaultdict(list)
    for w in workers:
        if "declared dead" in w.log():
            continue
        open_claims: dict[str, tuple[float, int]] = {}
        for ts, what, sid, token in CLAIM.findall(w.log()):
            if what == "claimed":
                open_claims[sid] = (float(ts), int(token))
            else:
                start, tok = open_claims.pop(sid)
                spans[sid].append((start, float(ts), tok, w.name))
        for sid, (start, tok) in open_claims.items():  # a killed worker's claims end with it
            assert w.name in deaths, f"{w.name} never released {sid}"
            spans[sid].append((start, deaths[w.name], tok, w.name))
    # Defends against a log format change making this check vacuous.
    assert len(spans) >= SESSIONS - 2, f"claims of only {len(spans)} sessions parsed from the worker logs"
    for sid, claims in spans.items():
        claims.sort()
        for (_s1, e1, t1, w1), (s2, _, t2, w2) in pairwise(claims):
            assert e1 <= s2, f"{sid} worked by {w1} and {w2} at once"
            assert t2 > t1, f"{sid}: lease tokens must grow ({t1} then {t2})"


def test_three_workers_twenty_sessions_one_killed_one_restarted(pg_schema_url, tmp_path):  # noqa: F811
    store = open_store(pg_schema_url)
    pool: list[Worker] = []
    deaths: dict[str, float] = {}
    with FakeAnthropic(script(), delay_s=0.15) as fake:

        def start(name: str) -> Worker:
            w = Worker(
                pg_schema_url,
                name,
                tmp_path,
                lease=LEASE,
                body="corral.harness.pool_body:harness_body",
                env=harness_env(tmp_path, fake, name),
            )
            pool.append(w)
            return w

        def supervise() -> None:
            """Like systemd's Restart=: a worker that fenced itself (exit 75) is started again."""
            for w in [w for w in pool if w.proc.poll() == FENCED_EXIT]:
                if not w.restarted:
                    w.restarted = True
                    start(w.name + "+")

        try:
            sids = [submit(store, pg_schema_url, f"FAULT-{i:02d}: do the thing") for i in range(SESSIONS)]
            for name in ("a", "b", "c"):
                start(name)

            def idle() -> int:
                supervise()
                return sum(store.get(s).status == "idle" for s in sids)

            wait_until("some sessions done", lambda: idle() >= 3, timeout=120)
            killed: Worker = wait_until(
                "a worker mid-session", lambda: mid_session(store, pool), timeout=60, every=0.02
            )  # type: ignore[assignment]
            deaths[killed.name] = killed.signal(signal.SIGKILL)
            killed.wait()
            wait_until("more sessions done", lambda: idle() >= 8, timeout=120)
            stopped: Worker = wait_until(
                "another worker mid-session", lambda: mid_session(store, pool, killed), timeout=60, every=0.02
            )  # type: ignore[assignment]
            stopped.signal(signal.SIGTERM)  # its session goes back to the queue; its journal has every release
            # 0; or 75 if a loaded machine delayed its heartbeat past the lease first.
            assert stopped.wait(timeout=60) in (0, FENCED_EXIT), stopped.log()[-3000:]
            stopped.restarted = True
            again = start(stopped.name + "-again")
            wait_until("every session done", lambda: idle() == SESSIONS, timeout=240)
        finally:
            for w in pool:  # a claim still open at the end ends with its worker
                if w.proc.poll() is None:
                    deaths[w.name] = time.time()
                w.stop()
        requests = list(fake.requests)

    logs = {sid: store.select(sid) for sid in sids}
    store.close()
    for i, sid in enumerate(sids):
        log = logs[sid]
        assert_valid_history(log)
        assert [e.data["text"] for e in log if e.type == "agent.message"][-1] == f"done {i}"
        # No recorded model call requested again: nothing asked for turn t after its response was logged.
        spans = [e for e in log if e.type == "span.model_request"]
        for turn, span in enumerate(spans):
            late = [
                r for r in requests if r.key == (f"FAULT-{i:02d}:", turn) and r.received > span.created_at.timestamp()
            ]
            assert not late, f"session {i} turn {turn} was requested again after it was recorded"
        # The harness's own claims in the log never interleave either.
        writers = [e.data["writer"] for e in log if e.type == "session.status" and e.data.get("status") == "running"]
        assert len(writers) == len(set(writers))
        assert_writes_in_lease_order(pg_schema_url, sid)
    assert_never_two_at_once(pool, deaths)
    assert "claimed session" in again.log(), "the restarted worker took work"
    assert "handed session" in "".join(w.log() for w in pool), (
        "the killed worker's session was handed back by the reaper"
    )
