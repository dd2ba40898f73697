"""The session log: an append-only event store and the MCP server over it.

The library's face: what the harness, the worker pool and the front door use.
"""

from corral.servers.session.config import SessionSettings, open_store
from corral.servers.session.store import Event, EventStore, Lease, LeaseLost, NewEvent, SessionInfo, new_id

__all__ = [
    "Event",
    "EventStore",
    "Lease",
    "LeaseLost",
    "NewEvent",
    "SessionInfo",
    "SessionSettings",
    "new_id",
    "open_store",
]
