"""Tools the harness itself provides: `todo` (a plan kept in the session) and
`spawn_subagent` (a child session with a fresh context)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError, InvalidArgument
from corral.harness import events as E
from corral.harness.checkpoints import Checkpoints
from corral.harness.events import SessionLog, ev
from corral.harness.tools import ToolDef, ToolOutcome, cap

if TYPE_CHECKING:
    from corral.harness.agent import Agent

TODO = ToolDef(
    "todo",
    "Replace your plan with this list. The plan is kept in the session and shown to you after every tool result; "
    "keep it current and finish every open item before ending your turn.",
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "status": {"type": "string", "enum": ["pending", "in_progress", "done"]},
                    },
                    "required": ["text", "status"],
                },
            }
        },
        "required": ["items"],
    },
    idempotent=True,  # it sets the whole list: running it twice leaves the same plan
)

SPAWN = ToolDef(
    "spawn_subagent",
    "Run an independent subtask in a subagent with a fresh context and the same tools. It returns a short summary of "
    "what it did. Several spawn_subagent calls in one response run in parallel.",
    {
        "type": "object",
        "properties": {
            "task": {"type": "string", "description": "everything the subagent needs to know to do the subtask"}
        },
        "required": ["task"],
    },
    idempotent=True,  # a repeat resumes the child session recorded for the same call instead of starting another
)


class TodoTools:
    async def tools(self) -> list[ToolDef]:
        return [TODO]

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        items = args.get("items")
        if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("text"), str) for i in items
        ):
            return ToolOutcome.error(InvalidArgument("todo needs items: a list of {text, status}"))
        plan = [{"text": i["text"], "status": i.get("status", "pending")} for i in items]
        left = sum(1 for i in plan if i["status"] != "done")
        return ToolOutcome(f"plan updated: {len(plan)} items, {left} open", data={"todo": plan})


@dataclass
class Subagents:
    """`spawn_subagent`: each call is a child session (parent link, own log, fresh context).

    The child's id is written to the parent's log (`agent.subagent`) before it runs, so a
    woken parent resumes the same child rather than starting the work again.
    """

    parent: SessionLog
    make_agent: Callable[[SessionLog, str], Agent]
    summary_chars: int = 2000
    checkpoints: Checkpoints | None = None  # the default sandbox's checkpoints, shared with the child

    async def tools(self) -> list[ToolDef]:
        return [SPAWN]

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        task = args.get("task")
        if not isinstance(task, str) or not task.strip():
            return ToolOutcome.error(InvalidArgument("spawn_subagent needs a non-empty task"))
        started = [e for e in self.parent.tail if e.type == E.SUBAGENT and e.data["tool_use_id"] == call_id]
        if started:
            child = SessionLog.load(self.parent.store, started[0].data["session_id"])
            begun = child.compaction is not None or any(e.type == E.USER_MESSAGE for e in child.tail)
            first = None if begun else task  # killed before the child got its task: give it now
        else:
            child = SessionLog.create(
                self.parent.store, metadata={"task": task[:200], "tool_use_id": call_id}, parent=self.parent.session_id
            )
            self.parent.append([ev(E.SUBAGENT, tool_use_id=call_id, session_id=child.session_id, task=task)])
            first = task
        agent = self.make_agent(child, f"sub {child.session_id[-6:]}")
        before = self.checkpoints.latest if self.checkpoints else None
        try:
            text = await agent.run(first, reason="subagent")
            outcome = ToolOutcome(
                cap(text or "(the subagent ended without a summary)", self.summary_chars),
                data={"subagent": child.session_id},
            )
        except CorralError as err:  # a failing child is the parent's tool error, not a crash
            outcome = ToolOutcome(
                f"subagent {child.session_id} failed: {err}", is_error=True, data={"subagent": child.session_id}
            )
        if self.checkpoints:  # the child changed the shared default sandbox: the parent's log says so too
            outcome.events.extend(self.checkpoints.carried(before, call_id))
        return outcome
