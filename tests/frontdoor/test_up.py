"""`corral up` for real: a subprocess on a loopback port, driven over streamable HTTP."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from corral import __version__ as CORRAL_VERSION
from tests.frontdoor.conftest import (
    CORRAL,
    UpProcess,
    corral,
    free_port,
    one_line_error,
    start_up,
    token_of,
)

pytestmark = pytest.mark.anyio
SERVERS = ("session", "sandbox", "credentials")


def mcp_client(url: str, token: str | None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Client(streamable_http_client(url, http_client=httpx2.AsyncClient(headers=headers, timeout=30)))


async def test_up_serves_every_server_over_http_with_the_token(up: UpProcess) -> None:
    token = token_of(up.env)
    for name in SERVERS:
        assert f"✓ {name:<12} {up.base}/{name}/mcp" in up.output, up.output
    # The printed client config is exact: the URLs and the token of this run.
    config = json.loads(up.output[up.output.index('{\n  "mcpServers"') : up.output.rindex("}") + 1])
    assert config["mcpServers"]["corral-sandbox"] == {
        "type": "http",
        "url": f"{up.base}/sandbox/mcp",
        "headers": {"Authorization": f"Bearer {token}"},
    }

    async with mcp_client(f"{up.base}/session/mcp", token) as client:
        created = await client.call_tool("create_session", {"metadata": {"title": "from the test"}})
        assert not created.is_error, created
        session_id = created.structured_content["session_id"]
        got = await client.call_tool("get_session", {"session_id": session_id})
        assert got.structured_content["metadata"] == {"title": "from the test"}
    async with mcp_client(f"{up.base}/credentials/mcp", token) as client:
        listed = await client.call_tool("list_credentials", {})
        assert not listed.is_error and listed.structured_content["credentials"] == []
    for name in SERVERS:  # every server names its version (serverInfo), Corral's
        async with mcp_client(f"{up.base}/{name}/mcp", token) as client:
            assert client.server_info is not None and client.server_info.version == CORRAL_VERSION, name


async def test_long_execute_sends_progress_over_http(up: UpProcess) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with mcp_client(f"{up.base}/sandbox/mcp", token_of(up.env)) as client:
        result = await client.call_tool(
            "execute", {"command": "sleep 1.5; echo done", "timeout_s": 30}, progress_callback=on_progress
        )
    assert not result.is_error, result
    assert result.structured_content["stdout"] == "done\n"
    assert len(seen) >= 2, seen  # every 0.3 s (CORRAL_SANDBOX_PROGRESS_INTERVAL_S) of a 1.5 s command
    assert all(total == 30 for _, total, _ in seen), seen
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen)


async def test_sandboxes_of_up_reach_its_git_gateway_through_the_forwarder(up: UpProcess) -> None:
    # `corral up` runs the proxy's git gateway and the sandboxes in one process, so it mounts
    # the gateway's directory at /run/corral itself; `run_git_with` must work as returned.
    closed = free_port()  # the "upstream": a loopback port nothing listens on
    added = subprocess.run(
        [
            CORRAL,
            "vault",
            "set",
            "gitrepo",
            "--kind",
            "git",
            "--host",
            "127.0.0.1",
            "--scheme",
            "http",
            "--port",
            str(closed),
            "--allow-private",
        ],
        input="not-a-real-token-0123456789",
        env=up.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert added.returncode == 0, added.stderr
    token = token_of(up.env)
    async with mcp_client(f"{up.base}/credentials/mcp", token) as client:
        grant = await client.call_tool(
            "git_access", {"credential": "gitrepo", "repo_url": f"http://127.0.0.1:{closed}/org/repo.git"}
        )
    assert not grant.is_error, grant.content[0].text
    remote, prefix = grant.structured_content["remote_url"], grant.structured_content["run_git_with"]
    probe = (
        "import sys, urllib.request, urllib.error\n"
        "try: urllib.request.urlopen(sys.argv[1] + '/info/refs?service=git-upload-pack', timeout=20)\n"
        "except urllib.error.HTTPError as e: print(e.code, e.read().decode().strip())"
    )
    forged = remote.replace(remote.split("/")[3], "f" * 43)
    command = f"{prefix} python3 -c {shlex.quote(probe)} {remote}; {prefix} python3 -c {shlex.quote(probe)} {forged}"
    async with mcp_client(f"{up.base}/sandbox/mcp", token) as client:
        result = await client.call_tool("execute", {"command": command, "timeout_s": 60})
    assert not result.is_error, result.content[0].text
    out = result.structured_content["stdout"].splitlines()
    assert len(out) == 2, result.structured_content  # nothing at /run/corral: the gateway is not mounted
    assert out[0].startswith("502 corral: upstream failed"), (
        result.structured_content
    )  # capability good, forwarded, nothing listening
    assert out[1].startswith("403 corral: this git capability is unknown"), result.structured_content


def test_no_token_wrong_token_foreign_origin_and_host_are_refused(up: UpProcess) -> None:
    token = token_of(up.env)
    good = {"Authorization": f"Bearer {token}"}
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
    mcp_headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with httpx.Client(base_url=up.base, timeout=10) as http:
        for name in SERVERS:
            assert http.post(f"/{name}/mcp", json=init, headers=mcp_headers).status_code == 401
            wrong = http.post(
                f"/{name}/mcp", json=init, headers={**mcp_headers, "Authorization": "Bearer " + "x" * len(token)}
            )
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
            # A web page elsewhere calling us from the user's browser: refused even with the token.
            evil = http.post(
                f"/{name}/mcp", json=init, headers={**mcp_headers, **good, "Origin": "http://evil.example"}
            )
            assert evil.status_code == 403
            # DNS rebinding: a foreign name that resolves to 127.0.0.1.
            rebound = http.post(
                f"/{name}/mcp", json=init, headers={**mcp_headers, **good, "Host": f"evil.example:{up.port}"}
            )
            assert rebound.status_code == 421
            ok = http.post(f"/{name}/mcp", json=init, headers={**mcp_headers, **good, "Origin": up.base})
            assert ok.status_code == 200, ok.text
        assert http.get("/sessions.json").status_code == 401
        assert http.get("/sessions.json", headers=good).status_code == 200
        assert http.get("/healthz").text == "ok\n"  # says nothing but "up"


@pytest.mark.requires("bwrap")
def test_token_is_private_and_kept_across_restarts(corral_env: dict[str, str]) -> None:
    port = free_port()
    first = start_up(corral_env, port)
    assert first.stop() == 0
    path = Path(corral_env["CORRAL_HOME"]) / "token"
    token = path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 32
    path.chmod(0o644)  # loosened by a copy or an umask: tightened again, same token
    second = start_up(corral_env, port)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() == token
        assert f"Bearer {token}" in second.output
    finally:
        assert second.stop() == 0


@pytest.mark.requires("bwrap")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_cleanly_and_free_the_port(corral_env: dict[str, str], sig: int) -> None:
    port = free_port()
    up = start_up(corral_env, port)
    with httpx.Client(timeout=10) as http:  # an open MCP session must not hold the shutdown up
        http.post(
            f"{up.base}/session/mcp",
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "0"},
                },
            },
            headers={
                "Authorization": f"Bearer {token_of(corral_env)}",
                "Accept": "application/json, text/event-stream",
            },
        )
    assert (Path(corral_env["CORRAL_HOME"]) / "up.json").exists()  # where `mcp-config --http` finds this run
    started = time.monotonic()
    assert up.stop(sig) == 0
    assert not (Path(corral_env["CORRAL_HOME"]) / "up.json").exists()
    assert time.monotonic() - started < 10
    assert f"stopped ({signal.Signals(sig).name})" in up.output
    assert "Traceback" not in up.output
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))


def test_port_in_use_is_one_line_with_what_to_do(corral_env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        done = corral("up", "--port", str(port), env=corral_env, timeout=30)
    line = one_line_error(done)
    assert f"port {port} on 127.0.0.1 is already in use" in line and f"--port {port + 1}" in line
    assert time.monotonic() - started < 15


def test_unreachable_postgres_is_one_line_with_what_to_do(corral_env: dict[str, str]) -> None:
    closed = free_port()  # nothing listens there
    env = {**corral_env, "CORRAL_SESSION_STORE": f"postgresql://corral:pw@127.0.0.1:{closed}/corral"}
    done = corral("up", "--port", str(free_port()), env=env, timeout=60)
    line = one_line_error(done)
    assert line.startswith("corral: unavailable:") and "CORRAL_SESSION_STORE" in line
    assert "pw@" not in line  # the password in the URL is not echoed


def test_bad_settings_are_one_line_naming_the_variable(corral_env: dict[str, str]) -> None:
    line = one_line_error(corral("up", env={**corral_env, "CORRAL_UP_PORT": "eighty"}, timeout=30))
    assert "CORRAL_UP_PORT='eighty'" in line
    line = one_line_error(
        corral("up", "--port", str(free_port()), env={**corral_env, "CORRAL_LOG_LEVEL": "loud"}, timeout=30)
    )
    assert "CORRAL_LOG_LEVEL='loud'" in line and "DEBUG, INFO" in line


def test_a_non_loopback_address_is_refused(corral_env: dict[str, str]) -> None:
    line = one_line_error(corral("up", "--host", "0.0.0.0", "--port", str(free_port()), env=corral_env, timeout=30))
    assert "loopback only" in line and "127.0.0.1" in line


def test_help_lists_up_and_mcp_config(corral_env: dict[str, str]) -> None:
    done = corral("--help", env=corral_env)
    assert "up " in done.stdout and "mcp-config" in done.stdout
    assert corral("up", "--help", env=corral_env).returncode == 0
    assert os.access(CORRAL, os.X_OK)


async def test_write_file_up_to_the_sandbox_limit_passes_over_http(up: UpProcess) -> None:
    """The HTTP body cap follows the sandbox's largest file (64 MiB by default), not the SDK's 4 MiB:
    at the limit the file is written; one byte over, the answer is the same invalid_argument as over stdio."""
    import base64
    import hashlib

    from corral.servers.sandbox.config import SandboxSettings

    limit = SandboxSettings.model_fields["sandbox_max_file_bytes"].default
    data = bytes(range(256)) * (limit // 256)  # exactly `limit` bytes, base64 as a client must send binary
    assert len(data) == limit
    async with mcp_client(f"{up.base}/sandbox/mcp", token_of(up.env)) as client:
        written = await client.call_tool(
            "write_file", {"path": "big.bin", "content": base64.b64encode(data).decode(), "encoding": "base64"}
        )
        assert not written.is_error, written.content[0].text[:300]
        assert (
            written.structured_content["size"] == limit
            and written.structured_content["sha256"] == hashlib.sha256(data).hexdigest()
        )
        over = await client.call_tool(
            "write_file",
            {"path": "bigger.bin", "content": base64.b64encode(data + b"x").decode(), "encoding": "base64"},
        )
        assert (
            over.is_error and "invalid_argument: content is" in over.content[0].text and "up to" in over.content[0].text
        ), over.content[0].text[:300]
        await client.call_tool("execute", {"command": "rm -f big.bin"})
