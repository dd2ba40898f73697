"""Shared test plumbing.

Real parts (bwrap, dockerd, PostgreSQL, ...): a test says what it needs once, with
`@pytest.mark.requires("docker")` or by depending on a `needs_<part>` fixture (see
tests/parts.py). Each part is probed once; a test whose part is missing skips with one
line naming what to install on a user's machine, but fails in CI (CI=true), where
`.ci/run` has installed and started everything.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.parts import PARTS, missing

if TYPE_CHECKING:
    from mcp.client import Client

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(what: str, available: bool, why: str) -> None:
    if not available:
        unavailable(f"{what} unavailable: {why}")


def unavailable(message: str) -> None:
    if IN_CI:
        pytest.fail(message + " (CI must run this test; .ci/run should have provided it)")
    pytest.skip(message)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"requires(*parts): needs real parts, each one of {', '.join(PARTS)}")
    for part in PARTS.values():
        config.addinivalue_line("markers", f"{part.name}: needs {part.what} (set by requires; select with -m)")


def _needs_fixture(name: str):
    @pytest.fixture(name=f"needs_{name}", scope="session")
    def needs() -> None:
        """A fixture that needs the part depends on this; the test then carries requires(part)."""

    return needs


for _name in PARTS:
    globals()[f"_needs_{_name}"] = _needs_fixture(_name)


def required(item: pytest.Item) -> list[str]:
    """The parts `item` needs: requires(...) arguments, and a part's own marker means the same."""
    named = {mark.name for mark in item.iter_markers() if mark.name in PARTS}
    return sorted(named.union(*(mark.args for mark in item.iter_markers("requires"))))


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for name in PARTS:
            if f"needs_{name}" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.requires(name))
        for name in required(item):
            if name not in PARTS:
                raise pytest.UsageError(f"{item.nodeid}: requires({name!r}) names no part; known: {', '.join(PARTS)}")
            item.add_marker(name)  # so that `-m "not docker"` means what it says


@pytest.hookimpl(tryfirst=True)  # before any fixture starts
def pytest_runtest_setup(item: pytest.Item) -> None:
    for name in required(item):
        why = missing(name)
        if why is not None:
            unavailable(why)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready: Callable[[], object], what: str, seconds: float = 30, every: float = 0.05) -> None:
    """Return as soon as `ready()` is true; fail saying that `what` never happened.
    Wait for the condition an action needs, never for a guessed time (CI machines are slow)."""
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds}s for {what}")
        time.sleep(every)


async def until(
    ready: Callable[[], object | Awaitable[object]], what: str, seconds: float = 30, every: float = 0.05
) -> None:
    """`wait_until` for async tests: `ready` may be a coroutine function; the loop keeps running meanwhile."""
    deadline = time.monotonic() + seconds
    while True:
        answer = ready()
        if inspect.isawaitable(answer):
            answer = await answer
        if answer:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds}s for {what}")
        await asyncio.sleep(every)


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
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs of our own, to fill up (`fill_disk`)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True, check=False
    )
    require(
        "a tmpfs mount (needs root)",
        mounted.returncode == 0,
        mounted.stderr.strip() or f"mount exited {mounted.returncode}",
    )
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(disk: Path, leave: int = 0) -> Path:
    """Take all of `disk`'s free space but `leave` bytes; unlink the returned file to free it again."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


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
