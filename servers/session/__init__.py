"""The session log: an append-only event store and the MCP server over it."""
