"""Which workspace a position of a session names: the latest `sandbox.checkpoint` before it.

A harness records `sandbox.checkpoint {sandbox_id, checkpoint_id, at, tool_use_id, default}`
after every call that may change its sandbox (see `corral.harness.events`). A fork at N
shares the events below N, so the child's default sandbox is restored (by the sandbox
server, at the child's first sandbox call) from the latest default-sandbox checkpoint at a
position < N; with none, the child starts with a fresh sandbox.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from corral.servers.session.store import Event, EventStore

__all__ = ["SANDBOX_CHECKPOINT", "Workspace", "latest_checkpoint", "workspace_at", "workspace_note"]

# The harness's event type, named here too: the session library does not import the harness.
SANDBOX_CHECKPOINT = "sandbox.checkpoint"
_PAGE = 100


class Workspace(BaseModel):
    checkpoint_id: str = Field(description="the checkpoint the child's default sandbox is restored from")
    sandbox_id: str | None = Field(description="the sandbox it was taken of")
    position: int = Field(description="the position of its sandbox.checkpoint event")


def latest_checkpoint(store: EventStore, session_id: str, before: int | None = None) -> Event | None:
    """The default sandbox's latest `sandbox.checkpoint` event at a position < `before` (None: in
    the whole log), or None. `default: false` is a sandbox the model named itself: not the default."""
    while True:
        page = store.select(session_id, types=[SANDBOX_CHECKPOINT], lt=before, desc=True, limit=_PAGE)
        for event in page:
            data = event.data if isinstance(event.data, dict) else {}
            if isinstance(data.get("checkpoint_id"), str) and data.get("default", True) is not False:
                return event
        if len(page) < _PAGE:
            return None
        before = page[-1].position


def workspace_at(store: EventStore, session_id: str, at: int) -> Workspace | None:
    """The default sandbox's latest checkpoint at a position < `at`, or None."""
    event = latest_checkpoint(store, session_id, at)
    if event is None:
        return None
    sandbox = event.data.get("sandbox_id")
    return Workspace(
        checkpoint_id=event.data["checkpoint_id"],
        sandbox_id=sandbox if isinstance(sandbox, str) else None,
        position=event.position,
    )


def workspace_note(at: int, workspace: Workspace | None) -> str:
    """What a fork at `at` gives the child's sandbox, said for a person."""
    if workspace is None:
        return f"no checkpoint before position {at}: the child starts with a fresh sandbox"
    return (
        f"the child's sandbox is restored from checkpoint {workspace.checkpoint_id} "
        f"(of {workspace.sandbox_id or 'the default sandbox'}, at position {workspace.position}) on its first sandbox call"
    )
