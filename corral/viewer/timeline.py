"""`corral sessions show ID` as a timeline in the terminal (rich).

    render_timeline(events, session=None) -> a rich renderable

`events` are the store's `Event`s (or dicts of the same fields).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from corral.viewer.summary import Line, summarize, totals

__all__ = ["event_line", "render_timeline"]

STYLES = {
    "user": "bold cyan",
    "model": "white",
    "tool": "yellow",
    "result": "green",
    "error": "bold red",
    "sandbox": "magenta",
    "checkpoint": "bold magenta",
    "status": "blue",
    "usage": "dim",
    "other": "dim",
}
ICONS = {
    "user": "▶",
    "model": "◆",
    "tool": "⚙",
    "result": "✓",
    "error": "✗",
    "sandbox": "▣",
    "checkpoint": "⚑",
    "status": "●",
    "usage": "∑",
    "other": "·",
}


def _field(event: Any, name: str) -> Any:
    return event[name] if isinstance(event, dict) else getattr(event, name)


def _elapsed(start: datetime | None, at: datetime) -> str:
    if start is None:
        return ""
    seconds = (at - start).total_seconds()
    return f"+{seconds:.1f}s" if seconds < 600 else f"+{seconds / 60:.0f}m"


def _what(line: Line) -> str:
    return (
        f"{line.title.split(' ', 1)[1]} {line.text}" if line.title.startswith("tool ") else line.text
    )  # the tool's name first


def event_line(event: Any) -> Text:
    """One event on one line, as `corral sessions tail` prints it as it arrives."""
    line = summarize(_field(event, "type"), _field(event, "data"))
    style = STYLES.get(line.kind, "")
    created = _field(event, "created_at")
    when = created.strftime("%H:%M:%S") if isinstance(created, datetime) else str(created)[11:19]
    return Text.assemble(
        (f"{_field(event, 'position'):>6} {when} ", "dim"),
        (ICONS.get(line.kind, "·") + " ", style),
        (f"{_field(event, 'type')}  ", style),
        _what(line),
    )


def render_timeline(events: Iterable[Any], session: Any = None) -> RenderableType:
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False, expand=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("time", style="dim", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("what", overflow="fold")
    lines: list[Line] = []
    start: datetime | None = None
    for event in events:
        created = _field(event, "created_at")
        if isinstance(created, str):
            created = datetime.fromisoformat(created)
        start = start or created
        line = summarize(_field(event, "type"), _field(event, "data"))
        lines.append(line)
        style = STYLES.get(line.kind, "")
        table.add_row(
            str(_field(event, "position")),
            _elapsed(start, created),
            Text(ICONS.get(line.kind, "·"), style=style),
            Text(_field(event, "type"), style=style),
            Text(_what(line)),
        )
    parts: list[RenderableType] = []
    if session is not None:
        sid = _field(session, "session_id")
        status = _field(session, "status") or "—"
        parent = _field(session, "parent")
        parts.append(
            Text.assemble(
                ("session ", "bold"), (sid, "bold cyan"), f"  status {status}", f"  parent {parent}" if parent else ""
            )
        )
    parts.append(table if lines else Text("(no events yet)", style="dim"))
    figures = totals(lines)
    if any(figures.values()):
        parts.append(
            Text(
                f"tokens: in {figures['input_tokens']}  out {figures['output_tokens']}  "
                f"cache read {figures['cache_read_input_tokens']}  cache write {figures['cache_creation_input_tokens']}",
                style="dim",
            )
        )
    return Group(*parts)
