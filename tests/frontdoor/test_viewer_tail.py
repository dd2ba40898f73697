"""The viewer opens a session of a million events at its tail at once (issue 15 item 5).

The viewer's routes are served by a real uvicorn on loopback over a real SQLite store
of its own (the shared `corral up` keeps its small database); the page runs in headless
Chromium, the JSON is read with httpx.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from corral.servers.session import EventStore, NewEvent, open_store
from corral.viewer.web import PAGE_LIMIT, viewer_routes
from tests.conftest import free_port, wait_until
from tests.frontdoor.test_viewer import CHROMIUM_ARGS
from tests.parts import CHROMIUM

MILLION = 1_000_000


def fill(store: EventStore, sid: str, n: int, chunk: int = 20_000) -> None:
    """`n` readable events, appended in big batches (the fastest way through the store)."""
    for start in range(0, n, chunk):
        store.append(
            sid,
            [
                NewEvent(type="agent.message", data={"text": f"event number {i}"})
                for i in range(start, min(n, start + chunk))
            ],
        )


@contextmanager
def viewer(store: EventStore) -> Iterator[str]:
    """The viewer's routes on a loopback port; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(Starlette(routes=viewer_routes(store)), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the viewer to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EventStore, str]]:
    store = open_store(str(tmp_path_factory.mktemp("big") / "sessions.db"))
    sid = store.create({"title": "a million events"}).session_id
    fill(store, sid, MILLION)
    yield store, sid
    store.close()


def positions(events: list[dict]) -> list[int]:
    return [e["position"] for e in events]


def test_events_json_reads_the_tail_pages_back_and_follows(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "sessions.db"))
    try:
        sid = store.create().session_id
        fill(store, sid, 1200)
        with viewer(store) as base, httpx.Client(base_url=base, timeout=10) as http:
            url = f"/sessions/{sid}/events.json"
            tail = http.get(url).json()
            assert (
                positions(tail["events"]) == list(range(1200 - PAGE_LIMIT, 1200)) and tail["session"]["length"] == 1200
            )
            assert positions(http.get(url, params={"before": 700}).json()["events"]) == list(range(200, 700))
            assert positions(http.get(url, params={"before": 200}).json()["events"]) == list(range(200))
            assert http.get(url, params={"before": 0}).json()["events"] == []
            assert positions(http.get(url, params={"after": 1197}).json()["events"]) == [1198, 1199]
            assert positions(http.get(url, params={"after": -1}).json()["events"]) == list(
                range(PAGE_LIMIT)
            )  # from the start, as before
            for bad in ({"before": "x"}, {"after": "1.5"}, {"before": -1}, {"before": 5, "after": 1}):
                answer = http.get(url, params=bad)
                assert answer.status_code == 400 and answer.json()["error"].startswith("invalid_argument"), (
                    bad,
                    answer.text,
                )
            assert http.get("/sessions/ses_nope/events.json").status_code == 404
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.requires("chromium")
async def test_a_million_event_session_opens_at_its_tail_at_once(big: tuple[EventStore, str]) -> None:
    from playwright.async_api import async_playwright, expect

    store, sid = big
    with viewer(store) as base:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page()
                await page.goto(f"{base}/sessions")  # the browser is warm: what is timed is opening the session
                started = time.monotonic()
                await page.goto(f"{base}/sessions/{sid}")
                last = page.locator(f"tr.event[data-position='{MILLION - 1}']")
                await expect(last).to_contain_text(f"event number {MILLION - 1}", timeout=10_000)
                opened = time.monotonic() - started
                assert opened < 1.0, f"the last event showed after {opened:.2f} s"
                await expect(last).to_be_in_viewport()  # the page is scrolled to the newest event
                rows = page.locator("tr.event")
                await expect(rows).to_have_count(PAGE_LIMIT)
                assert await rows.first.get_attribute("data-position") == str(MILLION - PAGE_LIMIT)
                await expect(page.locator("#heading")).to_contain_text(f"{MILLION} events")

                # Paging back on demand: each click shows the page before the oldest one shown.
                earlier = page.locator("#earlier")
                await earlier.click()
                await expect(rows).to_have_count(2 * PAGE_LIMIT)
                await expect(page.locator(f"tr.event[data-position='{MILLION - 2 * PAGE_LIMIT}']")).to_contain_text(
                    f"event number {MILLION - 2 * PAGE_LIMIT}"
                )
                assert await rows.first.get_attribute("data-position") == str(MILLION - 2 * PAGE_LIMIT)

                # Live events still appear, below the tail.
                store.append_one(sid, "agent.message", {"text": "written while the page is open"})
                await expect(page.locator(f"tr.event[data-position='{MILLION}']")).to_contain_text(
                    "written while the page is open", timeout=10_000
                )
                assert await rows.last.get_attribute("data-position") == str(MILLION)
            finally:
                await browser.close()


def test_paging_back_reaches_the_first_event(tmp_path: Path) -> None:
    """Following `before` from the tail, as the page's "load earlier" does, shows every event once, in order."""
    store = open_store(str(tmp_path / "sessions.db"))
    try:
        sid = store.create().session_id
        fill(store, sid, 2 * PAGE_LIMIT + 7)
        with viewer(store) as base, httpx.Client(base_url=base, timeout=10) as http:
            seen: list[int] = []
            query: dict[str, int] = {}
            while True:
                events = http.get(f"/sessions/{sid}/events.json", params=query).json()["events"]
                if not events:
                    break
                seen = positions(events) + seen
                query = {"before": events[0]["position"]}
            assert seen == list(range(2 * PAGE_LIMIT + 7))
    finally:
        store.close()
