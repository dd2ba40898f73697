"""Sandbox test plumbing: one fixture per backend, a server over it, an MCP client.

Conformance tests take `backend_kind` (bubblewrap, docker, and the e2b fake); isolation
and escape tests take `isolated_kind` (bubblewrap and docker: the fake isolates nothing).
Real parts: real `bwrap`, a real dockerd with an image built here from the host's
busybox (nothing can be pulled), real MCP clients.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp.client import Client

from corral.servers.sandbox.backend import Backend
from corral.servers.sandbox.config import DockerConfig, E2BConfig, SandboxSettings
from corral.servers.sandbox.server import backend_config, build_server
from tests.parts import TEST_IMAGE

from .fake_e2b import FakeAsyncSandbox
from .procs import kill_sandboxes_under

REQUIRES = {"bubblewrap": "bwrap", "docker": "docker"}


@pytest.fixture(scope="session")
def docker_image(needs_docker) -> str:
    """The test image, built from the host's busybox by .ci/services.sh (or by the docker probe)."""
    return TEST_IMAGE


def kinds(*names: str) -> list:
    """Backend kinds as fixture params, each marked with the real part it needs."""
    return [pytest.param(n, marks=pytest.mark.requires(REQUIRES[n])) if n in REQUIRES else n for n in names]


@pytest.fixture(scope="session")
def sandbox_root() -> Iterator[Path]:
    """A sandbox dir the unprivileged sandbox uid can traverse (pytest's tmp_path is 0700).

    One per test session: sandbox ids are random, and the /etc snapshot is made once."""
    base = Path(tempfile.gettempdir()) / "corral-test-sandboxes"
    base.mkdir(mode=0o711, exist_ok=True)
    base.chmod(0o711)
    root = base / uuid.uuid4().hex[:12]
    yield root
    kill_sandboxes_under(root)  # what tests that build their own Harness left running
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def settings(tmp_path: Path, sandbox_root: Path) -> SandboxSettings:
    return SandboxSettings(
        home=tmp_path / "home",
        sandbox_dir=sandbox_root,
        sandbox_max_processes=64,
        sandbox_output_limit=4096,
        sandbox_progress_interval_s=0.3,
        sandbox_reap_interval_s=3600,
    )


def make_backend(kind: str, settings: SandboxSettings, image: str | None = None) -> Backend:
    from corral.servers.sandbox.server import make_backend as factory

    if kind == "bubblewrap":
        return factory(backend_config(settings))
    if kind == "docker":
        return factory(DockerConfig(image=image or TEST_IMAGE))
    return factory(E2BConfig(api_key="e2b_test_key"), sandbox_cls=FakeAsyncSandbox)


@pytest.fixture(params=kinds("bubblewrap", "docker", "e2b"))
def backend_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        request.getfixturevalue("docker_image")
    return request.param


@pytest.fixture(params=kinds("bubblewrap", "docker"))
def isolated_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        request.getfixturevalue("docker_image")
    return request.param


class Harness:
    """A server over one backend, plus the helpers tests share."""

    def __init__(self, kind: str, settings: SandboxSettings) -> None:
        self.kind = kind
        self.settings = settings
        self.backend = make_backend(kind, settings)
        self.server, self.service = build_server(settings, self.backend, reap=False)

    def restart(self) -> Harness:
        """A new server process's view: same settings, fresh backend, registry read back from disk."""
        return Harness(self.kind, self.settings)

    def client(self) -> Client:
        return Client(self.server)


@pytest.fixture
def harness(backend_kind: str, settings: SandboxSettings) -> Iterator[Harness]:
    h = Harness(backend_kind, settings)
    yield h
    _cleanup(h)


@pytest.fixture
def bw(settings: SandboxSettings, needs_bwrap: None) -> Iterator[Harness]:
    """A server over bubblewrap only (live-sandbox behaviour)."""
    h = Harness("bubblewrap", settings)
    yield h
    _cleanup(h)


@pytest.fixture
def iso(isolated_kind: str, settings: SandboxSettings) -> Iterator[Harness]:
    h = Harness(isolated_kind, settings)
    yield h
    _cleanup(h)


def _cleanup(h: Harness) -> None:
    if h.kind == "bubblewrap":  # live sandboxes hold processes: end every one the test left
        import asyncio

        async def destroy_all() -> None:
            for record in h.service.registry.all("bubblewrap", states=("running", "lost")):
                await h.backend.destroy(record.ref)

        asyncio.run(destroy_all())
    if h.kind == "docker":  # leave no container behind, whatever the test did
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", "label=corral.sandbox"], capture_output=True, text=True, timeout=30
        ).stdout.split()
        mine = [r.id for r in h.service.registry.all("docker")]
        names = [f"corral-{i}" for i in mine]
        if ids and names:
            subprocess.run(["docker", "rm", "-f", *names], capture_output=True, timeout=60)


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def fail(client: Client, tool: str, kind: str, **args: Any) -> str:
    """Call a tool that must fail with error `kind`; returns the message the client sees."""
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool} should have failed with {kind}: {result.structured_content}"
    text = result.content[0].text
    assert f"{kind}:" in text, text
    return text
