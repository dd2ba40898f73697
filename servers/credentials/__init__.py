"""The credential proxy MCP server (`corral serve credentials`)."""
