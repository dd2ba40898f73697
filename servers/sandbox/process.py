"""Run one host process bounded: capped output, a timeout that kills its whole process
group, and a watch that ends it early when its sandbox vanishes.

Shared by the bubblewrap backend (the process is `bwrap`) and the docker backend (the
process is `docker exec`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Completed", "OutputCap", "run_bounded"]


class OutputCap:
    """Keeps the first and last `limit // 2` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.half = max(limit // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > 2 * self.half:  # trim rarely, not on every chunk
                del self.tail[: len(self.tail) - self.half]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + min(len(self.tail), self.half)

    def text(self) -> str:
        tail = bytes(self.tail[-self.half :]) if self.tail else b""
        if not self.truncated:
            return (bytes(self.head) + tail).decode("utf-8", "replace")
        omitted = self.total - len(self.head) - len(tail)
        head = bytes(self.head).decode("utf-8", "replace")
        return f"{head}\n[... {omitted} bytes omitted ...]\n{tail.decode('utf-8', 'replace')}"


@dataclass
class Completed:
    returncode: int | None
    stdout: OutputCap
    stderr: OutputCap
    duration_ms: int
    timed_out: bool = False
    lost: bool = field(default=False, metadata={"doc": "the watch said the sandbox vanished"})


async def _pump(stream: asyncio.StreamReader, cap: OutputCap) -> None:
    while chunk := await stream.read(1 << 16):
        cap.feed(chunk)


async def _feed_stdin(proc: asyncio.subprocess.Process, data: bytes | None) -> None:
    if proc.stdin is None:
        return
    try:
        if data:
            proc.stdin.write(data)
            await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the command did not read all of its stdin: its business
    finally:
        proc.stdin.close()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def run_bounded(
    argv: Sequence[str],
    *,
    stdin: bytes | None,
    timeout_s: float,
    output_limit: int,
    watch: Callable[[], Awaitable[bool]] | None = None,
    watch_interval_s: float = 0.25,
    on_timeout: Callable[[], Awaitable[None]] | None = None,
    drain_s: float = 5.0,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run `argv` in a new session; kill its process group on timeout or when `watch()` says lost.

    After it exits, its output is read for at most `drain_s` more: a process it left running
    in the background may hold the pipes open for good. `env` is its whole environment
    (None: the server's)."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, so a timeout kills all of it
        env=env,
    )
    out, err = OutputCap(output_limit), OutputCap(output_limit)
    assert proc.stdout is not None and proc.stderr is not None
    io = asyncio.gather(_pump(proc.stdout, out), _pump(proc.stderr, err), _feed_stdin(proc, stdin))
    waiter = asyncio.ensure_future(proc.wait())
    timed_out = lost = False
    deadline = start + timeout_s
    try:
        while not waiter.done():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            await asyncio.wait({waiter}, timeout=min(left, watch_interval_s) if watch else left)
            if not waiter.done() and watch is not None and await watch():
                lost = True
                break
        if not waiter.done():
            if timed_out and on_timeout is not None:
                await on_timeout()
            _kill_group(proc)
        await asyncio.wait_for(asyncio.shield(waiter), 10)
        # Output pipes can be held open by a process it left running; don't wait forever.
        await asyncio.wait_for(asyncio.shield(io), drain_s)
    except TimeoutError:
        io.cancel()
        # Close our ends of the pipes: a background writer gets EPIPE, not a full pipe it blocks on forever.
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            transport.close()
    finally:
        if not waiter.done():  # cancelled from above (client went away): leave nothing running
            _kill_group(proc)
            await asyncio.shield(waiter)
    return Completed(
        returncode=proc.returncode,
        stdout=out,
        stderr=err,
        duration_ms=int((time.monotonic() - start) * 1000),
        timed_out=timed_out,
        lost=lost,
    )
