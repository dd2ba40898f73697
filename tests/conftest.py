"""Shared test plumbing.

`require(what, available, why)`: a test of a real part (bwrap, dockerd, PostgreSQL)
skips with a clear reason on a user's machine, but fails in CI (CI=true), where
`.ci/run` has installed and started everything.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mcp.client import Client

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(what: str, available: bool, why: str) -> None:
    if available:
        return
    message = f"{what} unavailable: {why}"
    if IN_CI:
        pytest.fail(message + " (CI must run this test; .ci/run should have provided it)")
    pytest.skip(message)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, seconds: float = 30) -> None:
    """Return once `proc` accepts connections on 127.0.0.1:`port`; fail if it exits or never does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited (status {proc.returncode}) before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"the server never listened on {port}")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def bearer_client(url: str, home) -> Client:
    """An MCP client for `corral serve X --http` at `url`, sending the install's token from `home`."""
    import httpx2
    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client

    from corral.auth import load_or_create_token

    headers = {"Authorization": f"Bearer {load_or_create_token(Path(home))}"}
    return Client(streamable_http_client(url, http_client=httpx2.AsyncClient(headers=headers, timeout=60)))
