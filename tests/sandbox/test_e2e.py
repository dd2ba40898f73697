"""`corral serve sandbox` end to end: a real MCP client over real stdio and streamable HTTP."""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import StdioServerParameters
from mcp.client import Client

from tests.conftest import bearer_client, free_port, wait_listening
from tests.parts import corral_exe

from .conftest import call, fail, kinds

pytestmark = pytest.mark.anyio
CORRAL = corral_exe()  # the `corral` of the Python running the tests, never one on PATH


def serve_env(settings, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CORRAL_HOME": str(settings.home),
        "CORRAL_SANDBOX_DIR": str(settings.sandbox_dir),
        **extra,
    }


async def _drive_every_tool(c: Client) -> None:
    assert {t.name for t in (await c.list_tools()).tools} >= {
        "provision", "execute", "read_file", "write_file", "list_files", "destroy", "list_sandboxes"
    }  # fmt: skip
    assert (await call(c, "list_sandboxes"))["sandboxes"] == []
    box = await call(c, "provision", label="e2e")
    sid = box["sandbox_id"]
    r = await call(c, "execute", sandbox_id=sid, command="echo hi; echo oops >&2; exit 4")
    assert (r["exit_code"], r["stdout"], r["stderr"]) == (4, "hi\n", "oops\n")
    w = await call(
        c,
        "write_file",
        sandbox_id=sid,
        path="d/f.bin",
        content=base64.b64encode(b"\x00\xff").decode(),
        encoding="base64",
    )
    assert (await call(c, "read_file", sandbox_id=sid, path="d/f.bin", encoding="base64"))["sha256"] == w["sha256"]
    assert [e["name"] for e in (await call(c, "list_files", sandbox_id=sid, depth=2))["entries"]] == ["d", "d/f.bin"]
    await fail(c, "read_file", "policy_denied", sandbox_id=sid, path="../../etc/passwd")
    assert (await call(c, "execute", command="echo lazy"))["stdout"] == "lazy\n"  # the default sandbox
    assert len((await call(c, "list_sandboxes"))["sandboxes"]) == 2
    await call(c, "destroy", sandbox_id=sid)
    await fail(c, "execute", "sandbox_lost", sandbox_id=sid, command="true")


@pytest.mark.requires("bwrap")
async def test_stdio_bubblewrap(settings) -> None:
    params = StdioServerParameters(command=CORRAL, args=["serve", "sandbox"], env=serve_env(settings))
    async with Client(params) as c:
        await _drive_every_tool(c)


async def test_stdio_docker(settings, docker_image: str) -> None:
    env = serve_env(settings, CORRAL_SANDBOX_BACKEND="docker", CORRAL_SANDBOX_IMAGE=docker_image)
    async with Client(StdioServerParameters(command=CORRAL, args=["serve", "sandbox"], env=env)) as c:
        await _drive_every_tool(c)
        for s in (await call(c, "list_sandboxes"))["sandboxes"]:
            await call(c, "destroy", sandbox_id=s["sandbox_id"])


@pytest.fixture
def http_server(settings, request: pytest.FixtureRequest) -> Iterator[str]:
    kind = getattr(request, "param", "bubblewrap")
    extra = {}
    if kind == "docker":
        extra = {"CORRAL_SANDBOX_BACKEND": "docker", "CORRAL_SANDBOX_IMAGE": request.getfixturevalue("docker_image")}
    port = free_port()
    proc = subprocess.Popen(
        [CORRAL, "serve", "sandbox", "--http", f"127.0.0.1:{port}"],
        env=serve_env(settings, **extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_listening(port, proc)
        yield f"http://127.0.0.1:{port}/mcp", settings.home
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("http_server", kinds("bubblewrap", "docker"), indirect=True)
async def test_streamable_http(http_server: tuple[str, Path]) -> None:
    async with bearer_client(*http_server) as c:
        await _drive_every_tool(c)
        for s in (await call(c, "list_sandboxes"))["sandboxes"]:
            await call(c, "destroy", sandbox_id=s["sandbox_id"])


def test_missing_bwrap_says_what_to_install(settings, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH without bwrap
    bin_dir.mkdir()
    env = {**serve_env(settings), "PATH": str(bin_dir)}
    done = subprocess.run(
        [CORRAL, "serve", "sandbox"], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt-get install bubblewrap" in lines[0] and "Traceback" not in done.stderr
