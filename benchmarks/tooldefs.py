"""Tool definitions: what each server's `tools/list` costs a brain on every model request (issue 13).

    python3 benchmarks/tooldefs.py

Each Corral server is started as a client starts it (`corral serve NAME` over stdio) and so
is the official `@modelcontextprotocol/server-filesystem` (`npm install -g
@modelcontextprotocol/server-filesystem`; skipped with a note if it is not installed). The
size is the JSON of what a client forwards to the model per tool: name, description and
input schema (output schemas are not sent to the model). Tokens are estimated as chars / 4.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import anyio
from mcp import StdioServerParameters
from mcp.client import Client
from mcp.client.stdio import stdio_client

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Table

CORRAL = str(Path(sys.executable).parent / "corral")
SERVERS = ["session", "sandbox", "credentials"]


async def definitions(command: str, args: list[str], env: dict[str, str]) -> tuple[int, int]:
    """(tools, bytes of their name + description + input schema as JSON)."""
    params = StdioServerParameters(command=command, args=args, env=env)
    async with Client(stdio_client(params)) as client:
        tools = (await client.list_tools()).tools
    sent = [{"name": t.name, "description": t.description, "input_schema": t.input_schema} for t in tools]
    return len(tools), len(json.dumps(sent, separators=(",", ":")))


def main() -> None:
    table = Table("tooldefs")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CORRAL_HOME": str(Path(tmp) / "home")}
        baseline = ""
        fs = shutil.which("mcp-server-filesystem")
        if fs:
            n, size = anyio.run(definitions, fs, [tmp], env)
            baseline = f"server-filesystem {n} tools, {size:,} B (~{size // 4:,} tok)"
        else:
            baseline = "server-filesystem not installed"
        sizes = {}
        for name in SERVERS:
            n, sizes[name] = anyio.run(definitions, CORRAL, ["serve", name], env)
            table.add(
                f"tools/list of corral {name}: {n} tools", f"{sizes[name]:,} B (~{sizes[name] // 4:,} tok)", baseline
            )
        brain = sizes["sandbox"] + sizes["credentials"]
        table.add(
            "sandbox + credentials (`mcp-config --servers sandbox,credentials`)",
            f"{brain:,} B (~{brain // 4:,} tok)",
            baseline,
        )
    table.save()


if __name__ == "__main__":
    main()
