"""The event-store contract: one suite every backend must pass.

A backend's test module subclasses `StoreContract` and provides a `store_url` fixture
(a fresh, empty store per test). Tests open stores with `open_store(url)`, also from
other processes, so the suite checks what a user of the URL gets.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from corral.errors import Conflict, InvalidArgument, NotFound
from corral.servers.session import EventStore, NewEvent, open_store

ROOT = Path(__file__).resolve().parents[2]


def ev(type: str = "user.message", event_id: str | None = None, **data) -> NewEvent:
    return NewEvent(type=type, data=data, event_id=event_id)


def positions(store: EventStore, sid: str) -> list[int]:
    return [e.position for e in store.select(sid)]


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


class StoreContract:
    @pytest.fixture
    def store(self, store_url):
        s = open_store(store_url, max_event_bytes=4096)
        yield s
        s.close()

    # -- sessions ------------------------------------------------------------------

    def test_new_session_is_empty_and_keeps_metadata(self, store):
        info = store.create({"title": "t", "n": 1})
        got = store.get(info.session_id)
        assert (got.length, got.metadata, got.parent, got.forked_at) == (0, {"title": "t", "n": 1}, None, None)
        assert store.select(info.session_id) == []

    def test_unknown_session_is_not_found_everywhere(self, store):
        for call in (
            lambda: store.get("nope"),
            lambda: store.select("nope"),
            lambda: store.append("nope", [ev()]),
            lambda: store.fork("nope", 0),
            lambda: store.find_event("nope", "x"),
            lambda: store.create(parent="nope"),
        ):
            with pytest.raises(NotFound, match="nope"):
                call()

    def test_sessions_are_listed_newest_first_and_by_parent(self, store):
        a = store.create({"i": 0})
        b = store.create({"i": 1})
        child = store.create({"i": 2}, parent=a.session_id)
        listed = [s.session_id for s in store.sessions()]
        assert listed[:3] == [child.session_id, b.session_id, a.session_id]
        assert [s.session_id for s in store.sessions(parent=a.session_id)] == [child.session_id]
        assert child.parent == a.session_id and store.get(child.session_id).length == 0
        assert len(store.sessions(limit=2)) == 2

    def test_status_is_the_latest_session_status_event(self, store):
        sid = store.create().session_id
        assert store.get(sid).status is None
        store.append_one(sid, "session.status", {"status": "running"})
        store.append_one(sid, "agent.message", {"text": "hi"})
        store.append_one(sid, "session.status", {"status": "idle"})
        assert store.get(sid).status == "idle"

    def test_a_status_that_is_not_a_string_is_shown_as_text(self, store):
        # A session.status event is any JSON; the status a session shows is always text or
        # null (it is a string field of list_sessions/get_session output), the same on every store.
        sid = store.create().session_id
        for raw, shown in ((7, "7"), ({"a": [1]}, '{"a": [1]}'), (None, None), ([True], "[true]"), ("idle", "idle")):
            store.append_one(sid, "session.status", {"status": raw})
            listed = next(s for s in store.sessions() if s.session_id == sid)
            assert (store.get(sid).status, listed.status) == (shown, shown), raw
        store.append_one(sid, "session.status", {"status": 1.5})
        assert store.fork(sid, store.get(sid).length).status == "1.5"
        store.append_one(sid, "session.status", "not an object")
        assert store.get(sid).status is None

    # -- append and select ------------------------------------------------------------

    def test_positions_are_dense_from_zero(self, store):
        sid = store.create().session_id
        assert store.append(sid, [ev(i=0), ev(i=1)]) == [0, 1]
        assert store.append_one(sid, "agent.message", {"i": 2}) == 2
        events = store.select(sid)
        assert [(e.position, e.data["i"]) for e in events] == [(0, 0), (1, 1), (2, 2)]
        assert all(e.session_id == sid and e.event_id and e.created_at for e in events)
        assert store.get(sid).length == 3

    def test_data_round_trips_any_json(self, store):
        sid = store.create().session_id
        values = [{"nested": {"list": [1, 2.5, None, True, "é✓"]}}, [1, 2], "text", 3, None]
        for v in values:
            store.append(sid, [NewEvent(type="x.y", data=v)])
        assert [e.data for e in store.select(sid)] == values

    def test_select_by_range_type_order_and_limit(self, store):
        sid = store.create().session_id
        store.append(sid, [ev("a.x" if i % 2 else "b.x", i=i) for i in range(10)])
        assert [e.position for e in store.select(sid, gte=3, lt=6)] == [3, 4, 5]
        assert [e.position for e in store.select(sid, types=["a.x"])] == [1, 3, 5, 7, 9]
        assert [e.position for e in store.select(sid, types=["a.x"], gte=4, limit=2)] == [5, 7]
        assert [e.position for e in store.select(sid, desc=True, limit=3)] == [9, 8, 7]
        assert [e.position for e in store.select(sid, lt=4, desc=True, limit=2)] == [3, 2]
        assert store.select(sid, gte=10) == [] and store.select(sid, limit=0) == []

    @pytest.mark.parametrize("kwargs", [{"gte": -1}, {"lt": -2}, {"gte": 5, "lt": 2}, {"limit": -1}])
    def test_bad_ranges_are_invalid_arguments(self, store, kwargs):
        sid = store.create().session_id
        with pytest.raises(InvalidArgument):
            store.select(sid, **kwargs)

    def test_expected_position_conflict_writes_nothing(self, store):
        sid = store.create().session_id
        store.append(sid, [ev(), ev()], expected_position=0)
        with pytest.raises(Conflict, match="expected position 1"):
            store.append(sid, [ev(i=99)], expected_position=1)
        with pytest.raises(Conflict):
            store.append(sid, [ev(i=99)], expected_position=5)
        assert store.append(sid, [ev(i=2)], expected_position=2) == [2]
        assert [e.data.get("i") for e in store.select(sid)] == [None, None, 2]
        with pytest.raises(InvalidArgument):
            store.append(sid, [ev()], expected_position=-1)

    def test_event_id_makes_append_idempotent(self, store):
        sid = store.create().session_id
        assert store.append(sid, [ev(event_id="e-1", i=1)], expected_position=0) == [0]
        store.append(sid, [ev(i=2)])
        # A re-send (even with the now-stale expected_position) returns the original position.
        assert store.append(sid, [ev(event_id="e-1", i=1)], expected_position=0) == [0]
        assert store.find_event(sid, "e-1").position == 0
        # Mixed batch: the known one is not rewritten, the new one is appended.
        assert store.append(sid, [ev(event_id="e-1"), ev(event_id="e-3"), ev(event_id="e-3")]) == [0, 2, 2]
        assert positions(store, sid) == [0, 1, 2]
        with pytest.raises(NotFound):
            store.find_event(sid, "missing")

    def test_oversized_and_non_json_events_are_refused_and_write_nothing(self, store):
        sid = store.create().session_id
        with pytest.raises(InvalidArgument, match="over the 4096-byte limit"):
            store.append(sid, [ev(i=1), ev(blob="x" * 5000)])
        with pytest.raises(InvalidArgument, match="not JSON"):
            store.append(sid, [NewEvent(type="x.y", data={"v": math.nan})])
        with pytest.raises(InvalidArgument, match="not JSON"):
            store.append(sid, [NewEvent(type="x.y", data={"v": object()})])
        assert store.select(sid) == []

    def test_event_type_must_be_domain_dot_action(self):
        with pytest.raises(ValueError):
            NewEvent(type="nodot", data={})
        assert NewEvent(type="some.new.kind", data={}).type == "some.new.kind"

    # -- fork ----------------------------------------------------------------------

    def test_fork_shares_the_prefix_and_diverges(self, store):
        sid = store.create().session_id
        store.append(sid, [ev(event_id=f"p{i}", i=i) for i in range(5)])
        child = store.fork(sid, 3)
        assert (child.parent, child.forked_at, child.length) == (sid, 3, 3)
        assert [e.data["i"] for e in store.select(child.session_id)] == [0, 1, 2]
        assert store.append(child.session_id, [ev(i=30)], expected_position=3) == [3]
        store.append(sid, [ev(i=5)])
        assert [e.data["i"] for e in store.select(child.session_id)] == [0, 1, 2, 30]
        assert [e.data["i"] for e in store.select(sid)] == [0, 1, 2, 3, 4, 5]
        assert all(e.session_id == child.session_id for e in store.select(child.session_id))
        # Shared events are found through the child; ones past the fork point are not.
        assert store.find_event(child.session_id, "p1").position == 1
        assert store.append(child.session_id, [ev(event_id="p2")]) == [2]
        with pytest.raises(NotFound):
            store.find_event(child.session_id, "p4")

    def test_fork_of_a_fork_reads_through_every_ancestor(self, store):
        root = store.create().session_id
        store.append(root, [ev(i=i) for i in range(4)])
        a = store.fork(root, 2).session_id
        store.append(a, [ev(i=20), ev(i=21)])
        b = store.fork(a, 3).session_id
        store.append(b, [ev(i=300)])
        assert [e.data["i"] for e in store.select(b)] == [0, 1, 20, 300]
        assert [e.position for e in store.select(b)] == [0, 1, 2, 3]
        assert [e.data["i"] for e in store.select(b, desc=True, limit=3)] == [300, 20, 1]
        assert [e.data["i"] for e in store.select(b, gte=1, lt=3)] == [1, 20]
        assert store.get(b).length == 4

    def test_fork_at_the_ends_and_out_of_range(self, store):
        sid = store.create().session_id
        store.append(sid, [ev(), ev()])
        assert store.fork(sid, 0).length == 0
        assert store.fork(sid, 2).length == 2
        for bad in (-1, 3):
            with pytest.raises(InvalidArgument, match="out of range"):
                store.fork(sid, bad)

    def test_fork_status_comes_from_its_lineage(self, store):
        sid = store.create().session_id
        store.append_one(sid, "session.status", {"status": "running"})
        child = store.fork(sid, 1)
        assert store.get(child.session_id).status == "running"

    def test_a_random_fork_tree_reads_as_if_every_fork_were_a_copy(self, store):
        # Forks of forks at random points, deep chains included: every read of every session
        # must match a model in which a fork copies its parent's first `at` events.
        rng = random.Random(15)
        model: dict[str, list[tuple[str, str, object]]] = {}  # session -> [(event_id, type, status or i)]
        root = store.create().session_id
        model[root] = []
        order = [root]
        for step in range(160):
            source = order[-1] if rng.random() < 0.6 else rng.choice(order)  # mostly deepen one chain
            at = rng.randint(0, len(model[source]))
            sid = store.fork(source, at).session_id
            model[sid] = model[source][:at]
            order.append(sid)
            for k in range(rng.randint(0, 3)):
                eid, status = f"e{step}-{k}", rng.choice([None, "running", "idle"])
                typ = "session.status" if status and rng.random() < 0.5 else "x.y"
                assert store.append(sid, [ev(typ, event_id=eid, status=status)]) == [len(model[sid])]
                model[sid].append((eid, typ, status))
        for sid in rng.sample(order, 40):
            want = model[sid]
            got = store.select(sid)
            assert [(e.event_id, e.position) for e in got] == [(w[0], i) for i, w in enumerate(want)]
            statuses = [w[2] for w in want if w[1] == "session.status"]
            assert (store.get(sid).length, store.get(sid).status) == (len(want), statuses[-1] if statuses else None)
            for _ in range(3):
                gte = rng.randint(0, len(want))
                lt = rng.randint(gte, len(want))
                limit = rng.choice([None, 1, 3])
                assert [e.event_id for e in store.select(sid, gte=gte, lt=lt, limit=limit)] == [
                    w[0] for w in want[gte:lt]
                ][:limit]
                assert [e.event_id for e in store.select(sid, lt=lt, desc=True, limit=limit)] == [
                    w[0] for w in reversed(want[:lt])
                ][:limit]
            if want:  # an id of its view is found (and not re-written); one from elsewhere is not
                i = rng.randrange(len(want))
                assert store.find_event(sid, want[i][0]).position == i
                assert store.append(sid, [ev(event_id=want[i][0])]) == [i]
            stranger = rng.choice([w[0] for other in order for w in model[other] if w not in want] or ["none"])
            with pytest.raises(NotFound):
                store.find_event(sid, stranger)

    # -- concurrency and durability ---------------------------------------------------

    def test_threads_appending_at_once_keep_positions_dense(self, store):
        sid = store.create().session_id

        def writer(w: int) -> None:
            for i in range(25):
                store.append(sid, [ev(w=w, i=i)])

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert positions(store, sid) == list(range(100))

    def test_processes_appending_at_once_keep_positions_dense(self, store, store_url):
        sid = store.create().session_id
        code = """
            import sys
            from corral.servers.session import NewEvent, open_store
            from corral.errors import Conflict
            store = open_store(sys.argv[1])
            conflicts = 0
            for i in range(40):
                store.append(sys.argv[2], [NewEvent(type="w.append", data={"w": sys.argv[3], "i": i})])
                length = store.get(sys.argv[2]).length
                try:  # a racing optimistic append: either lands at `length` or conflicts cleanly
                    store.append(sys.argv[2], [NewEvent(type="w.cas", data={"w": sys.argv[3]})], expected_position=length)
                except Conflict:
                    conflicts += 1
            print(conflicts)
        """
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(code), store_url, sid, str(w)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for w in range(4)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        conflicts = sum(int(o[0]) for o in outs)
        events = store.select(sid)
        assert [e.position for e in events] == list(range(len(events)))
        assert sum(e.type == "w.append" for e in events) == 160
        assert sum(e.type == "w.cas" for e in events) == 160 - conflicts
        assert len({e.event_id for e in events}) == len(events)

    def test_an_append_that_returned_survives_kill_9(self, store, store_url):
        sid = store.create().session_id
        code = """
            import sys, time
            from corral.servers.session import NewEvent, open_store
            store = open_store(sys.argv[1])
            for i in range(1000):
                pos = store.append(sys.argv[2], [NewEvent(type="w.append", data={"i": i})])[0]
                print(pos, flush=True)
            time.sleep(60)
        """
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), store_url, sid], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        acknowledged = -1
        for line in proc.stdout:
            acknowledged = int(line)
            if acknowledged >= 200:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=30)
        reopened = open_store(store_url)
        try:
            got = positions(reopened, sid)
        finally:
            reopened.close()
        assert acknowledged >= 200
        assert got[: acknowledged + 1] == list(range(acknowledged + 1))
        assert got == list(range(len(got)))
