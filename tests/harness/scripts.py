"""Scripted tasks shared by the harness tests and the benchmark."""

from __future__ import annotations

from tests.harness.fake_anthropic import Script, Turn, text, tool

PLAN = {"items": [{"text": "append a line", "status": "in_progress"}, {"text": "delegate", "status": "pending"}]}


def multi_tool_task() -> Script:
    """Every kind of step: a plan, a non-idempotent call, an idempotent + a read-only call in
    one response, a subagent (with its own non-idempotent call), then the end of the turn."""
    return Script(
        {
            "CRASH-TASK": [
                Turn([text("Planning."), tool("todo", PLAN)]),
                Turn([tool("toolbox__append_line", {"text": "main-1"})]),
                Turn([tool("toolbox__put", {"key": "k", "value": "v"}), tool("toolbox__count_lines", {})]),
                Turn([tool("spawn_subagent", {"task": "CHILD-TASK: append the child line"})]),
                Turn([text("All done.")]),
            ],
            "CHILD-TASK": [
                Turn([tool("toolbox__append_line", {"text": "child-1"})]),
                Turn([text("child appended its line")]),
            ],
        }
    )
