"""A test MCP server served by Corral's stdio transport, whose tools misbehave on purpose:
they print to stdout, start children that print to stdout, and return large payloads."""

from __future__ import annotations

import subprocess
import sys

from mcp.server.mcpserver import MCPServer

from corral.servers.mcp_shell import serve

server = MCPServer("noisy")


@server.tool()
def shout(text: str) -> str:
    """Print to stdout from Python and from a child process, then answer."""
    print(f"python says {text}", flush=True)
    subprocess.run(
        ["sh", "-c", f"echo child says {text}; cat"], check=True, timeout=10
    )  # `cat`: stdin must be EOF, not the wire
    return f"heard {text}"


@server.tool()
def echo_big(payload: str) -> str:
    """Return the payload doubled (bigger than a pipe's buffer both ways)."""
    return payload * 2


if __name__ == "__main__":
    serve(server, stdio=sys.argv[1] if len(sys.argv) > 1 else "pipes")
