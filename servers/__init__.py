"""Corral's MCP servers: `session` (the log), `sandbox` (the hands), `credentials` (the vault's proxy)."""

__all__ = ["SERVER_MODULES"]

# The three servers, in the order they are listed and started: name -> module with `run(http, token, stdio)`.
SERVER_MODULES = {
    "session": "corral.servers.session.server",
    "sandbox": "corral.servers.sandbox.server",
    "credentials": "corral.servers.credentials.server",
}
