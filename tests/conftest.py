"""Shared test plumbing.

`require(what, available, why)`: a test of a real part (bwrap, dockerd, PostgreSQL)
skips with a clear reason on a user's machine, but fails in CI (CI=true), where
`.ci/run` has installed and started everything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(what: str, available: bool, why: str) -> None:
    if available:
        return
    message = f"{what} unavailable: {why}"
    if IN_CI:
        pytest.fail(message + " (CI must run this test; .ci/run should have provided it)")
    pytest.skip(message)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def bearer_client(url: str, home) -> "Client":
    """An MCP client for `corral serve X --http` at `url`, sending the install's token from `home`."""
    import httpx2
    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client

    from corral.auth import load_or_create_token

    headers = {"Authorization": f"Bearer {load_or_create_token(Path(home))}"}
    return Client(streamable_http_client(url, http_client=httpx2.AsyncClient(headers=headers, timeout=60)))
