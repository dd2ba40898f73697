"""Shared test plumbing.

`require(what, available, why)`: a test of a real part (bwrap, dockerd, PostgreSQL)
skips with a clear reason on a user's machine, but fails in CI (CI=true), where
`.ci/run` has installed and started everything.
"""

from __future__ import annotations

import os

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
