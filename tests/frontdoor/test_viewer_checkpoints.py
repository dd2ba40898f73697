"""The viewer marks `sandbox.checkpoint` events (issue 11): a marked row per checkpoint with its
id, its own anchor (#checkpoint-ID, which the page scrolls to when opened with it) and the fork
that continues from it; the terminal timeline marks them too."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from rich.console import Console

from corral.servers.session import EventStore, NewEvent, open_store
from corral.viewer.timeline import render_timeline
from tests.frontdoor.test_viewer import CHROMIUM_ARGS
from tests.frontdoor.test_viewer_tail import viewer
from tests.parts import CHROMIUM

CP = "cp_0123456789ab"


def session_with_a_checkpoint(store: EventStore) -> tuple[str, int]:
    sid = store.create({"title": "with a checkpoint"}).session_id
    store.append_one(sid, "user.message", {"text": "write a file"})
    position = store.append(
        sid,
        [
            NewEvent(type="agent.tool_result", data={"tool_use_id": "toolu_1", "name": "sandbox__write_file"}),
            NewEvent(
                type="sandbox.checkpoint",
                data={
                    "sandbox_id": "sbx_1",
                    "checkpoint_id": CP,
                    "at": "2026-12-03T23:00:00+00:00",
                    "tool_use_id": "toolu_1",
                    "default": True,
                },
            ),
        ],
    )[1]
    store.append(sid, [NewEvent(type="agent.message", data={"text": f"later {i}"}) for i in range(200)])
    return sid, position


def test_events_json_and_the_terminal_timeline_mark_checkpoints(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "sessions.db"))
    try:
        sid, position = session_with_a_checkpoint(store)
        with viewer(store) as base, httpx.Client(base_url=base, timeout=10) as http:
            events = http.get(f"/sessions/{sid}/events.json").json()["events"]
        marked = [e for e in events if e["checkpoint"]]
        assert [(e["position"], e["checkpoint"], e["kind"]) for e in marked] == [(position, CP, "checkpoint")]
        assert "sbx_1" in marked[0]["text"]
        console = Console(width=200, record=True)
        console.print(render_timeline(store.select(sid, lt=position + 1)))
        line = next(row for row in console.export_text().splitlines() if CP in row)
        assert "⚑" in line and "sandbox.checkpoint" in line
    finally:
        store.close()


@pytest.mark.anyio
@pytest.mark.requires("chromium")
async def test_the_page_marks_each_checkpoint_with_an_anchor(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    store = open_store(str(tmp_path / "sessions.db"))
    try:
        sid, position = session_with_a_checkpoint(store)
        with viewer(store) as base:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                try:
                    page = await browser.new_page(viewport={"width": 1200, "height": 600})
                    await page.goto(f"{base}/sessions/{sid}#checkpoint-{CP}")
                    row = page.locator(f"tr#checkpoint-{CP}")
                    await expect(row).to_have_class("event checkpoint")
                    await expect(row).to_have_attribute("data-position", str(position))
                    link = row.locator(f"a[href='#checkpoint-{CP}']")
                    await expect(link).to_have_text(f"⚑ checkpoint {CP}")
                    await expect(row).to_contain_text(f"corral sessions fork {sid} --at {position + 1}")
                    await expect(row).to_be_in_viewport()  # opened at its anchor, not at the tail
                    await expect(page.locator("tr.checkpoint")).to_have_count(1)
                finally:
                    await browser.close()
    finally:
        store.close()
