"""What `corral run` shows: model text as it streams, tool calls with short results, errors,
and a spinner with the elapsed time while a tool runs. The loop only calls `View` methods."""

from __future__ import annotations

import json
from typing import Any, Protocol

from corral.harness.tools import ToolOutcome


class View(Protocol):
    # The bodies do nothing (`return None`, not `...`, which would make them abstract):
    # a subclass such as NullView inherits them as no-ops.
    def session(self, session_id: str, resumed: bool) -> None:
        return None

    def text(self, delta: str) -> None:
        return None

    def response_done(self) -> None:
        return None

    def tool_start(self, name: str, args: dict[str, Any]) -> None:
        return None

    def tool_end(self, name: str, outcome: ToolOutcome, duration_ms: float) -> None:
        return None

    def note(self, message: str) -> None:
        return None

    def error(self, message: str) -> None:
        return None

    def attempt_failed(self, attempt: int, message: str, retry_in_s: float) -> None:
        return None

    def child(self, label: str) -> View: ...


class NullView(View):
    """Shows nothing (workers, tests): the protocol's methods, which do nothing."""

    def child(self, label: str) -> View:
        return self


def short(value: Any, limit: int = 160) -> str:
    """One line, at most `limit` characters, safe to embed in rich markup."""
    from rich.markup import escape

    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return escape(text if len(text) <= limit else text[: limit - 1] + "…")


class RichView:
    """The terminal view. Subagents get a child view whose lines carry their label."""

    def __init__(self, console: Any = None, label: str = "") -> None:
        from rich.console import Console

        self.console = console or Console(highlight=False)
        self.label = label
        self._streaming = False
        self._status: Any = None

    def _prefix(self) -> str:
        return f"[magenta]{short(self.label)}[/] " if self.label else ""

    def session(self, session_id: str, resumed: bool) -> None:
        verb = "resuming" if resumed else "session"
        self.console.print(f"{self._prefix()}[bold]{verb}[/] [cyan]{session_id}[/]")

    def text(self, delta: str) -> None:
        if self.label:  # interleaved subagent streams would be unreadable; show their text whole
            return
        self._streaming = True
        self.console.out(delta, end="", highlight=False)

    def response_done(self) -> None:
        if self._streaming:
            self.console.out("")
            self._streaming = False

    def tool_start(self, name: str, args: dict[str, Any]) -> None:
        self.console.print(f"{self._prefix()}[yellow]→ {short(name)}[/] [dim]{short(args)}[/]", markup=True)
        if not self.label and self.console.is_terminal and self._status is None:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._status = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._status.add_task(f"{name} running", total=None)
            self._status.start()

    def tool_end(self, name: str, outcome: ToolOutcome, duration_ms: float) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        colour = "red" if outcome.is_error else "green"
        self.console.print(
            f"{self._prefix()}[{colour}]← {name}[/] [dim]({duration_ms / 1000:.1f}s) {short(outcome.text)}[/]"
        )

    def note(self, message: str) -> None:
        self.console.print(f"{self._prefix()}[dim]· {short(message, 400)}[/]")

    def error(self, message: str) -> None:
        self.console.print(f"{self._prefix()}[red]! {short(message, 400)}[/]")

    def attempt_failed(self, attempt: int, message: str, retry_in_s: float) -> None:
        """A response that broke: whatever streamed above it is discarded, not the answer."""
        discarded = ", the text above is discarded" if self._streaming else ""
        self.response_done()
        self.console.print(
            f"{self._prefix()}[red]✗ attempt {attempt} failed{discarded}; retrying in {retry_in_s:.1f}s: {short(message, 300)}[/]"
        )

    def child(self, label: str) -> View:
        return RichView(self.console, label=label)
