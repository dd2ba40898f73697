"""Can a client reach a Corral server? One line saying why not: down, wrong port, wrong token.

Used by `corral mcp-config --check` and before `--http --apply` registers anything, so a
client never learns only "Failed to connect".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

__all__ = ["Probe", "probe_http", "read_up_state", "write_up_state", "clear_up_state"]

TIMEOUT_S = 5.0
STATE_FILE = "up.json"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "corral-probe", "version": "1"},
    },
}


@dataclass
class Probe:
    ok: bool
    line: str


def probe_http(url: str, token: str | None) -> Probe:
    """POST an MCP `initialize` to `url` with the bearer token and say what came back."""
    where = urlsplit(url)
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with httpx.Client(timeout=TIMEOUT_S, trust_env=False) as http:
            answer = http.post(url, content=json.dumps(INITIALIZE), headers=headers)
    except httpx.ConnectError:
        return Probe(
            False,
            f"nothing listens on {where.netloc} (is `corral up` running, and on this port? it prints its port; `--port N` picks another)",
        )
    except httpx.TimeoutException:
        return Probe(
            False,
            f"{where.netloc} accepted the connection but did not answer in {TIMEOUT_S:g}s (another program on that port?)",
        )
    except httpx.HTTPError as err:
        return Probe(False, f"{url}: {type(err).__name__}: {err}")
    if answer.status_code == 401:
        return Probe(
            False,
            "the server refused the bearer token (401): it is not the token of the `corral up` on this port (its CORRAL_HOME/token)",
        )
    if answer.status_code in (403, 421):
        return Probe(
            False,
            f"the server refused this Host/Origin ({answer.status_code}): connect to {where.hostname} exactly as `corral up` printed it",
        )
    if answer.status_code == 404:
        return Probe(False, f"no Corral server at {where.path} on {where.netloc} (another program on that port?)")
    if answer.status_code >= 400:
        return Probe(False, f"{url} answered {answer.status_code}: {answer.text[:200]}")
    return Probe(True, f"ok ({url})")


def write_up_state(home: Path, base: str) -> Path:
    """Where the running `corral up` listens, so `corral mcp-config --http` points at it."""
    path = home / STATE_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"url": base, "pid": os.getpid()}, f)
    return path


def read_up_state(home: Path) -> str | None:
    """The base URL of a `corral up` that is still running from this data dir, if any."""
    try:
        state = json.loads((home / STATE_FILE).read_text(encoding="utf-8"))
        os.kill(int(state["pid"]), 0)  # still alive?
        return str(state["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_up_state(home: Path) -> None:
    path = home / STATE_FILE
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
