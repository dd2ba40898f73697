"""Corral's MCP servers: `session` (the log), `sandbox` (the hands), `credentials` (the vault's proxy)."""
