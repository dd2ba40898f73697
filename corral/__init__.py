"""Corral: managed-agent infrastructure as MCP servers (hands, session, vault) plus a stateless brain."""

__version__ = "0.1.0"
