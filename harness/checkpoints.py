"""Workspace checkpoints: after a call that may change a sandbox, the harness checkpoints it
and records `sandbox.checkpoint` in the same append as the result, so every log position
names a state of the files.

    Checkpoints     what the log says the DEFAULT sandbox should be at: its latest checkpoint
                    id, sent with every call as `_meta` `corral/checkpoint` (a sandbox server
                    restores or rolls back the session's default sandbox to it)
    Checkpointing   the wrapper (around one MCP server's raw toolset) that takes the checkpoints

A server is a sandbox server when it lists a `checkpoint` tool; one that answers that
checkpoints are unsupported (E2B) is not asked again.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from corral.errors import SandboxLost, Unavailable
from corral.harness.events import SANDBOX_CHECKPOINT, ev
from corral.harness.tools import ToolDef, ToolOutcome, Toolset, Wrapper
from corral.servers.session import EventStore
from corral.servers.session.workspace import latest_checkpoint

__all__ = ["CHECKPOINT_META_KEY", "Checkpoints", "Checkpointing"]

log = logging.getLogger("corral.harness")

CHECKPOINT_META_KEY = "corral/checkpoint"
CHECKPOINT_TOOL = "checkpoint"
NEVER_AFTER = {CHECKPOINT_TOOL, "destroy"}  # a checkpoint of a checkpoint, or of a sandbox just destroyed
# How a server without checkpoints answers (a backend without them, e.g. E2B; or the store turned off).
_UNSUPPORTED = re.compile(r"cannot take checkpoints|checkpoints are off", re.IGNORECASE)


@dataclass
class Checkpoints:
    """The default sandbox's latest checkpoint, as this harness's log has it.

    Shared by every toolset of one run (and its subagents, which use the same default
    sandbox): a checkpoint one of them takes is what the next call of any of them sends."""

    enabled: bool = True
    last: dict[str, Any] | None = None  # the data of the default sandbox's latest sandbox.checkpoint

    @property
    def latest(self) -> str | None:
        return self.last["checkpoint_id"] if self.last else None

    @property
    def default_sandbox(self) -> str | None:
        return self.last.get("sandbox_id") if self.last else None

    def taken(self, data: dict[str, Any]) -> None:
        """A new checkpoint of the default sandbox, about to be appended to the log."""
        self.last = data

    def carried(self, since: str | None, call_id: str) -> list[Any]:
        """The default sandbox's latest checkpoint as an event for another log (a subagent's
        parent), if one was taken since `since`: the parent's log must name its files too."""
        if self.last is None or self.latest == since:
            return []
        return [ev(SANDBOX_CHECKPOINT, **{**self.last, "tool_use_id": call_id})]

    @classmethod
    def load(cls, store: EventStore, session_id: str, *, enabled: bool = True) -> Checkpoints:
        """From the log: its newest checkpoint of the default sandbox (a fork child's view
        includes the events it shares with its parent)."""
        if not enabled:
            return cls(enabled=False)
        event = latest_checkpoint(store, session_id)
        return cls(last=dict(event.data) if event else None)

    def meta(self) -> dict[str, Any]:
        """The `_meta` entries a call carries: nothing when off or before the first checkpoint."""
        return {CHECKPOINT_META_KEY: self.latest} if self.enabled and self.latest else {}


class Checkpointing(Wrapper):
    """Checkpoints the sandbox a call may have changed; the event rides on the call's outcome.

    Wraps one server's raw toolset (unprefixed names): the tool's annotations come from
    that server's listing, and `checkpoint` is called on the same server."""

    def __init__(self, inner: Toolset, state: Checkpoints) -> None:
        super().__init__(inner)
        self.state = state
        self.unsupported = False

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        outcome = await self.inner.call(name, args, call_id)
        if not self.state.enabled or self.unsupported or outcome.kind in (SandboxLost.kind, Unavailable.kind):
            return outcome  # gone, or never reached: nothing changed that a checkpoint could catch
        tool = await self._changing_tool(name)
        if tool is None:
            return outcome
        explicit = args.get("sandbox_id") if isinstance(args.get("sandbox_id"), str) else None
        named = (outcome.structured or {}).get("sandbox_id")
        sandbox_id = named if isinstance(named, str) else explicit
        # The default sandbox: what a call that could name a sandbox but did not acted on.
        takes_id = "sandbox_id" in tool.input_schema.get("properties", {})
        default = (takes_id and explicit is None) or (
            sandbox_id is not None and sandbox_id == self.state.default_sandbox
        )
        if sandbox_id is None and default:
            sandbox_id = self.state.default_sandbox  # a failed call on the default sandbox: checkpoint what it left
        if sandbox_id is None:
            return outcome  # nothing known to checkpoint (a call that failed before it found a sandbox)

        async def later() -> list[Any]:  # the agent awaits it, while its next model request runs
            event = await self._checkpoint(sandbox_id, call_id, default)
            return [] if event is None else [event]

        outcome.later = later
        return outcome

    async def _changing_tool(self, name: str) -> ToolDef | None:
        """The tool's definition if it may change a sandbox of a server that has checkpoints."""
        try:
            listed = {t.name: t for t in await self.inner.tools()}
        except Exception as err:  # boundary: a server we cannot list now gets no checkpoint this time
            log.info("not checkpointing after %s: %s", name, err)
            return None
        tool = listed.get(name)
        if CHECKPOINT_TOOL not in listed or tool is None or tool.read_only or name in NEVER_AFTER:
            return None
        return tool

    async def _checkpoint(self, sandbox_id: str, call_id: str, default: bool) -> Any:
        taken = await self.inner.call(CHECKPOINT_TOOL, {"sandbox_id": sandbox_id}, call_id)
        result = taken.structured or {}
        checkpoint_id = result.get("checkpoint_id")
        if taken.is_error or not isinstance(checkpoint_id, str):
            if _UNSUPPORTED.search(taken.text):
                self.unsupported = True  # asked once: this server has no checkpoints (E2B)
                log.warning("the sandbox server has no checkpoints, so none are recorded: %s", taken.text[:300])
            else:  # the tool call itself succeeded; its result just names no state of the files
                log.warning("checkpoint of %s after a tool call failed: %s", sandbox_id, taken.text[:300])
            return None
        data = {
            "sandbox_id": result.get("sandbox_id", sandbox_id),
            "checkpoint_id": checkpoint_id,
            "at": result.get("created_at"),
            "tool_use_id": call_id,
            "default": default,
        }
        if default:
            self.state.taken(data)
        return ev(SANDBOX_CHECKPOINT, **data)
