"""A session's events as a readable timeline: one line per event, for terminals."""

from __future__ import annotations

import json
from typing import Any

from rich.text import Text

from servers.session.store import Event

STYLES = {
    "user": "bold cyan",
    "agent": "green",
    "span": "dim",
    "sandbox": "magenta",
    "context": "yellow",
    "session": "blue",
}
SUMMARY_KEYS = ("text", "summary", "status", "error", "name", "command", "content")


def _short(value: Any, width: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def summarize(event: Event, width: int = 100) -> str:
    """The gist of an event: its most telling field, or its data in short."""
    data = event.data
    if isinstance(data, dict):
        for key in SUMMARY_KEYS:
            if key in data and data[key] not in (None, "", []):
                rest = {k: v for k, v in data.items() if k != key}
                head = _short(data[key], width)
                return head if not rest or len(head) > width // 2 else f"{head}  {_short(rest, width - len(head) - 2)}"
    return _short(data, width)


def line(event: Event, width: int = 100) -> Text:
    domain = event.type.split(".", 1)[0]
    style = "bold red" if "error" in event.type else STYLES.get(domain, "white")
    text = Text()
    text.append(f"{event.position:>6} ", style="dim")
    text.append(event.created_at.strftime("%H:%M:%S "), style="dim")
    text.append(f"{event.type:<22} ", style=style)
    text.append(summarize(event, width))
    return text
