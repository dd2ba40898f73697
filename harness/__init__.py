"""The reference harness: a stateless brain that connects Claude to Corral's MCP servers.

`corral run` / `corral wake` (harness/cli.py) -> run.py wires settings, store, MCP
connections and the model into an `Agent` (agent.py), whose loop reads and writes only
the session log (events.py) and builds each request from it (context.py).
"""
