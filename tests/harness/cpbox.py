"""A small sandbox-shaped MCP server for the harness's checkpoint tests: it records what it
was asked and with which `_meta`, so a test sees what the harness sent.

Run over stdio with `python3 -m tests.harness.cpbox`; state goes to $CPBOX_DIR.
    write(path, content, sandbox_id?)   changes the sandbox: writes <sandbox>/<path>
    read(path, sandbox_id?)             read-only
    provision()                         a new sandbox (no sandbox_id parameter)
    checkpoint(sandbox_id?, label?)     the checkpoint tool's result shape; with CPBOX_UNSUPPORTED
                                        set it fails as a backend without checkpoints does;
                                        CPBOX_CHECKPOINT_S makes it that slow
Every call appends {tool, args, client, checkpoint, t} to calls.jsonl (client and checkpoint
are the call's `_meta` `corral/client` and `corral/checkpoint`).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import Context, MCPServer

from corral.errors import InvalidArgument
from corral.servers.mcp_shell import serve, tool

DIR = Path(os.environ.get("CPBOX_DIR", "."))
DEFAULT = "sbx_default"
server = MCPServer("cpbox")


def _record(ctx: Context, name: str, args: dict[str, Any]) -> None:
    meta: Mapping[str, Any] = ctx.request_context.meta or {}
    line = {
        "tool": name,
        "args": args,
        "client": meta.get("corral/client"),
        "checkpoint": meta.get("corral/checkpoint"),
        "t": time.time(),
    }
    with open(DIR / "calls.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


@tool(server, destructive=True)
def write(ctx: Context, path: str, content: str, sandbox_id: str | None = None) -> dict[str, Any]:
    """Write a file in the sandbox."""
    _record(ctx, "write", {"path": path, "sandbox_id": sandbox_id})
    sid = sandbox_id or DEFAULT
    (DIR / sid).mkdir(exist_ok=True)
    (DIR / sid / path).write_text(content)
    return {"sandbox_id": sid, "path": path}


@tool(server, read_only=True)
def read(ctx: Context, path: str, sandbox_id: str | None = None) -> dict[str, Any]:
    """Read a file of the sandbox."""
    _record(ctx, "read", {"path": path, "sandbox_id": sandbox_id})
    sid = sandbox_id or DEFAULT
    return {"sandbox_id": sid, "content": (DIR / sid / path).read_text()}


@tool(server)
def provision(ctx: Context) -> dict[str, Any]:
    """A new sandbox."""
    _record(ctx, "provision", {})
    return {"sandbox_id": f"sbx_{secrets.token_hex(4)}"}


@tool(server)
def checkpoint(ctx: Context, sandbox_id: str | None = None, label: str | None = None) -> dict[str, Any]:
    """Checkpoint the sandbox's files."""
    _record(ctx, "checkpoint", {"sandbox_id": sandbox_id})
    time.sleep(float(os.environ.get("CPBOX_CHECKPOINT_S", "0")))  # a slow checkpoint
    if os.environ.get("CPBOX_UNSUPPORTED"):
        raise InvalidArgument("the e2b backend cannot take checkpoints", hint="use the bubblewrap backend")
    return {
        "checkpoint_id": f"ckpt_{secrets.token_hex(6)}",
        "sandbox_id": sandbox_id or DEFAULT,
        "label": label,
        "parent": None,
        "created_at": datetime.now(UTC).isoformat(),
        "files_changed": 1,
        "bytes_added": 10,
        "duration_ms": 1,
    }


def calls(directory: Path) -> list[dict[str, Any]]:
    path = directory / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


if __name__ == "__main__":
    serve(server)
