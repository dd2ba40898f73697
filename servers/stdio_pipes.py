"""MCP over stdio without a thread hop per message.

The SDK's `stdio_server()` reads and writes the pipes through `anyio.wrap_file`: every
line read and every write and flush is a trip to a worker thread and back, three per
tool call, which on a small machine is most of a stdio call's cost. Here the two pipe
ends are non-blocking and the event loop waits on them directly. Parsing is the SDK's
own (`jsonrpc_message_adapter`), but a line it cannot use is answered here with a
JSON-RPC error, as the HTTP transport answers a bad body: parse error (-32700) or invalid
request (-32600), with the request's id when a lenient parse still finds one (so the
client hears at once instead of waiting out its timeout), else id null. The SDK's
`stdio_server` hands such lines to the server, which only logs them.

As the SDK does, the wire moves to private descriptors while serving: fd 0 reads
/dev/null and fd 1 writes to stderr, so a tool (or a child it starts) that prints can
never tear a frame; both are put back on exit.

Only pipes and sockets (what an MCP client hands its server) are switched to
non-blocking; a terminal is shared with the shell that started us, so there
`serve_stdio` falls back to the SDK's transport.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.mcpserver import MCPServer
from mcp.shared.message import SessionMessage
from mcp.types import INVALID_REQUEST, PARSE_ERROR, ErrorData, JSONRPCError, jsonrpc_message_adapter
from pydantic import ValidationError

__all__ = ["serve_stdio", "wire_is_pipes"]

_CHUNK = 1 << 16


class PipeLines:
    """Async iterator of the text lines arriving on a (non-blocking) pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()
        os.set_blocking(fd, False)

    def __aiter__(self) -> PipeLines:
        return self

    async def __anext__(self) -> str:
        while (end := self._buf.find(b"\n")) < 0:
            try:
                chunk = os.read(self._fd, _CHUNK)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                continue
            if not chunk:  # EOF: a last unterminated line, then the end
                if not self._buf:
                    raise StopAsyncIteration
                end = len(self._buf) - 1
                break
            self._buf += chunk
        line = self._buf[: end + 1].decode("utf-8", errors="replace")
        del self._buf[: end + 1]
        return line


class PipeWriter:
    """`write`/`flush` of text onto a (non-blocking) pipe; a full pipe waits, never blocks the loop."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)

    async def write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        while data:
            try:
                data = data[os.write(self._fd, data) :]
            except BlockingIOError:
                await anyio.wait_writable(self._fd)

    async def flush(self) -> None:  # os.write is unbuffered
        return None


def wire_is_pipes() -> bool:
    """Are stdin and stdout pipes or sockets (not a terminal or a file)?"""
    try:
        return all(stat.S_ISFIFO(m) or stat.S_ISSOCK(m) for m in (os.fstat(0).st_mode, os.fstat(1).st_mode))
    except OSError:
        return False


@contextlib.contextmanager
def _wire_moved_aside() -> Iterator[tuple[int, int]]:
    """(private stdin, private stdout) duplicates; fd 0 <- /dev/null, fd 1 -> stderr meanwhile."""
    wire_in, wire_out = os.dup(0), os.dup(1)
    blocking = os.get_blocking(wire_in), os.get_blocking(wire_out)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(2, 1)
        yield wire_in, wire_out
    finally:
        with contextlib.suppress(OSError):
            os.set_blocking(wire_in, blocking[0])
            os.set_blocking(wire_out, blocking[1])
            os.dup2(wire_in, 0)
            os.dup2(wire_out, 1)
        for fd in (null, wire_in, wire_out):
            with contextlib.suppress(OSError):
                os.close(fd)


def _small_int(digits: str) -> int | None:
    return int(digits) if len(digits) <= 30 else None  # an id is never longer; a huge number is data


def refusal(line: str, err: ValidationError) -> JSONRPCError:
    """The JSON-RPC error answering a line the SDK's parser refused."""
    first = err.errors(include_url=False)[0]
    why = " ".join(f"{'.'.join(map(str, first['loc']))} {first['msg']}".split())[:300]
    try:  # Python's parser takes deeper nesting, longer numbers and lone surrogates than jiter
        raw = json.loads(line, parse_int=_small_int)
    except (ValueError, RecursionError):
        return JSONRPCError(jsonrpc="2.0", id=None, error=ErrorData(code=PARSE_ERROR, message=f"Parse error: {why}"))
    found = raw.get("id") if isinstance(raw, dict) else None
    request_id = found if isinstance(found, int | str) and not isinstance(found, bool) else None
    return JSONRPCError(
        jsonrpc="2.0", id=request_id, error=ErrorData(code=INVALID_REQUEST, message=f"Invalid request: {why}")
    )


@contextlib.asynccontextmanager
async def pipe_stdio_server() -> AsyncIterator[
    tuple[MemoryObjectReceiveStream[SessionMessage], MemoryObjectSendStream[SessionMessage]]
]:
    """The (read_stream, write_stream) pair a server runs on, over non-blocking pipes."""
    with _wire_moved_aside() as (wire_in, wire_out):
        lines, out = PipeLines(wire_in), PipeWriter(wire_out)
        to_server, read_stream = anyio.create_memory_object_stream[SessionMessage](0)
        write_stream, from_server = anyio.create_memory_object_stream[SessionMessage](0)

        async def read() -> None:
            async with to_server:
                async for line in lines:
                    if not line.strip():
                        continue
                    try:
                        message = jsonrpc_message_adapter.validate_json(line, by_name=False)
                    except ValidationError as err:
                        with contextlib.suppress(anyio.ClosedResourceError):  # the server already stopped
                            await write_stream.send(SessionMessage(refusal(line, err)))
                        continue
                    await to_server.send(SessionMessage(message))

        async def write() -> None:
            async with from_server:
                async for message in from_server:
                    await out.write(message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n")

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            tg.start_soon(write)
            yield read_stream, write_stream


def serve_stdio(server: MCPServer) -> None:
    """What `server.run("stdio")` does, over non-blocking pipes when the wire is pipes."""
    if not wire_is_pipes():
        server.run("stdio")
        return
    lowlevel = server._lowlevel_server  # the SDK's own run_stdio_async reaches it the same way

    async def run() -> None:
        async with pipe_stdio_server() as (read_stream, write_stream):
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())

    anyio.run(run)
