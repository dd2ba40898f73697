"""A small MCP server for harness tests: side effects you can count.

Run over stdio with `python3 -m tests.harness.toolbox`; files go to $TOOLBOX_DIR.
    append_line(text)   NOT idempotent: appends a line to lines.txt (a re-run would show twice)
    count_lines()       read-only
    put(key, value)     idempotent: writes kv/<key>; every call is logged to calls.txt
    slow(seconds)       read-only: sleeps (timeouts)
    crash()             the server process exits mid-call (a server that dies)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mcp.server.mcpserver import MCPServer

from corral.servers.mcp_shell import serve, tool

DIR = Path(os.environ.get("TOOLBOX_DIR", "."))
server = MCPServer("toolbox")


def _log(what: str) -> None:
    with open(DIR / "calls.txt", "a") as f:
        f.write(f"{what} pid={os.getpid()}\n")


@tool(server)
def append_line(text: str) -> str:
    """Append one line to the shared file."""
    _log(f"append_line {text}")
    with open(DIR / "lines.txt", "a") as f:
        f.write(text + "\n")
    return f"appended {text!r}"


@tool(server, read_only=True)
def count_lines() -> int:
    """How many lines the shared file has."""
    path = DIR / "lines.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


@tool(server, idempotent=True)
def put(key: str, value: str) -> str:
    """Set key to value."""
    _log(f"put {key}")
    (DIR / "kv").mkdir(exist_ok=True)
    (DIR / "kv" / key).write_text(value)
    return "ok"


@tool(server, read_only=True)
def slow(seconds: float) -> str:
    """Sleep, then answer. `slow.txt` says a call is under way (tests wait for it, not for a time)."""
    (DIR / "slow.txt").write_text(str(seconds))
    time.sleep(seconds)
    return "slept"


@tool(server)
def crash() -> str:
    """The server process dies mid-call."""
    _log("crash")
    os._exit(3)


if __name__ == "__main__":
    # TOOLBOX_START_DELAY: a server slow to come up (a wake must not wait for it to ask the model)
    time.sleep(float(os.environ.get("TOOLBOX_START_DELAY", "0")))
    (DIR / "started.txt").write_text(str(time.time()))
    serve(server)
