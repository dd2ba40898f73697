"""The connection bounds uvicorn lacks, for `corral up` and `corral serve X --http`.

uvicorn times out only an idle keep-alive connection after a response; a connection
that sends half a request head and waits is held forever, and enough of them exhaust
the process's file descriptors, so nobody with the token gets in (and asyncio logs a
traceback per failed accept). These bounds keep the door open under that attack:

HEADER_TIMEOUT_S   a complete request head must arrive this soon after connecting (or
                   after the previous response): a local client sends it in
                   milliseconds; 10 s leaves room for a machine under heavy load.
KEEP_ALIVE_S       an idle connection between requests is closed after this (uvicorn's
                   `timeout_keep_alive`); reconnecting on loopback costs < 1 ms.
MAX_CONNECTIONS    open connections at most. A local MCP client holds 1-3 per server, so
                   512 is far more than a machine's worth of clients, and it stays well
                   under the usual 1024 descriptors a process may open. Past it, the
                   connection waiting longest for its head (or idle longest) is closed
                   to make room, so a flood of slow sockets keeps evicting itself while a
                   client that sends its request promptly gets served.
BACKLOG            connections the kernel queues before we accept them (uvicorn's
                   `backlog`, 2048 by default). asyncio accepts up to this many at once
                   before any of them runs, so it bounds what the cap can overshoot:
                   512 + 128 stays under 1024 descriptors.

The request BODY cap (the MCP SDK's is 4 MiB) is `request_bytes_for(max_file_bytes)`: what
a `write_file` of the sandbox's largest file needs in base64, so that every transport
refuses an oversized file the same way (invalid_argument), not HTTP with a bare 413. The
guard checks the token before any body is read, so only token holders can send one.

h11's own cap on a request head (16 KiB, uvicorn's default) bounds the memory each holds.
Kept apart from `http_guard.py` so that a stdio server never imports uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["GuardedH11", "request_bytes_for", "uvicorn_limits"]

HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 512
BACKLOG = 128
NOTICE_EVERY_S = 60.0
ENVELOPE_BYTES = 1 << 20  # JSON-RPC envelope and the other arguments around the file's content


def request_bytes_for(max_file_bytes: int) -> int:
    """The largest HTTP body to accept: a base64 `write_file` of `max_file_bytes` (4 bytes per 3) plus its envelope."""
    return 4 * -(-max_file_bytes // 3) + ENVELOPE_BYTES


_log = logging.getLogger("corral.http")


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a request-head deadline and a connection cap."""

    _head_timer: asyncio.TimerHandle | None = None
    _head_scope: object = None
    _waiting_since = 0.0
    _last_notice = -NOTICE_EVERY_S
    _dropped = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()
        if len(self.connections) > MAX_CONNECTIONS:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request head has the same deadline

    def _waiting(self) -> bool:
        """No request in progress: before the first head, or idle between requests."""
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_scope = self.scope  # a completed head replaces `scope`
        self._waiting_since = self.loop.time()
        self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.scope is self._head_scope and self._waiting() and not self.transport.is_closing():
            self._drop(self, f"no complete request head within {HEADER_TIMEOUT_S:.0f} s")

    def _make_room(self) -> None:
        idle = [
            c for c in self.connections if isinstance(c, GuardedH11) and c._waiting() and not c.transport.is_closing()
        ]
        victim = min(idle, key=lambda c: c._waiting_since) if idle else self
        self._drop(victim, f"more than {MAX_CONNECTIONS} connections")

    @classmethod
    def _drop(cls, conn: GuardedH11, why: str) -> None:
        """Close `conn`; say so at most once a minute (a flood must not flood the log)."""
        conn.transport.close()
        GuardedH11._dropped += 1
        now = conn.loop.time()
        if now - GuardedH11._last_notice >= NOTICE_EVERY_S:
            _log.warning(
                "closing connections that hold the door without a request (%s; %d so far); token holders are still served",
                why,
                GuardedH11._dropped,
            )
            GuardedH11._last_notice = now


def uvicorn_limits() -> dict[str, Any]:
    """The `uvicorn.Config` keywords that bound connections (see above); also raises the
    process's soft descriptor limit to its hard limit, so the cap, not the OS, decides."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return {"http": GuardedH11, "timeout_keep_alive": KEEP_ALIVE_S, "backlog": BACKLOG}
