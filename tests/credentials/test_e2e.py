"""End to end over real stdio: `corral serve credentials` as a subprocess, as Claude Desktop runs it.

One run against a loopback upstream; one run inside `unshare --net` (only `lo`, no route
out) firing off-machine addresses and DNS names at it, so even a bug could send no packet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mcp import StdioServerParameters
from mcp.client import Client
from mcp.client.stdio import stdio_client

from tests.conftest import bearer_client, free_port, wait_listening
from tests.credentials.conftest import LOG_LINES, OUTPUTS
from tests.parts import UNSHARE_NET

pytestmark = pytest.mark.anyio


def server_env(env) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "CORRAL_HOME": str(env.settings.home),
        "CORRAL_VAULT_BACKEND": "encrypted-file",
        "CORRAL_LOG_LEVEL": "DEBUG",
        "CORRAL_PROXY_MAX_RESPONSE_BYTES": "2048",
    }


async def call(client: Client, name: str, args: dict) -> tuple[bool, str, dict | None]:
    result = await client.call_tool(name, args)
    text = result.content[0].text if result.content else ""
    OUTPUTS.append(text)
    OUTPUTS.append(json.dumps(result.structured_content))
    return result.is_error, text, result.structured_content


async def test_stdio_end_to_end_injects_and_redacts(env, tmp_path):
    errlog = tmp_path / "server-stderr.log"
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "corral.cli", "serve", "credentials"], env=server_env(env)
    )
    with errlog.open("w") as err:
        async with Client(stdio_client(params, errlog=err)) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"list_credentials", "http_request", "git_access"} <= names
            is_error, _, out = await call(
                client, "http_request", {"credential": "echo", "method": "GET", "url": env.upstream.url("/echo-gzip")}
            )
            assert not is_error and out["status"] == 200
            assert json.loads(out["body"])["headers"]["Authorization"] == "Bearer [REDACTED]"
            is_error, _, out = await call(
                client, "http_request", {"credential": "echo", "method": "GET", "url": env.upstream.url("/echo")}
            )
            assert not is_error and ["x-echo-auth", "Bearer [REDACTED]"] in out["headers"]
            is_error, text, _ = await call(
                client,
                "http_request",
                {"credential": "echo", "method": "GET", "url": env.upstream.url("/echo") + "\r\nX: 1"},
            )
            assert is_error and "invalid_argument" in text
    assert env.upstream.seen[0]["headers"]["Authorization"] == f"Bearer {env.secrets['echo']}"
    LOG_LINES.append(errlog.read_text())
    log = errlog.read_text()
    assert "vault backend encrypted-file" in log
    # httpcore's DEBUG trace of the echoed response headers reached stderr, with the secret redacted
    assert "Bearer [REDACTED]" in log and env.secrets["echo"] not in log


TARGETS = [
    "169.254.169.254",
    "2852039166",
    "[::ffff:169.254.169.254]",
    "10.0.0.1",
    "metadata.google.internal",
    "example.com",
]


@pytest.mark.requires("netns")
async def test_stdio_in_empty_netns_refuses_off_machine_targets(env, tmp_path):
    from corral.vault.policy import Credential

    for i, host in enumerate(TARGETS):
        env.add(Credential(name=f"wide{i}", hosts=[host], schemes=["http"], ports=[80]))
    params = StdioServerParameters(
        command="unshare",
        args=[*UNSHARE_NET, sys.executable, "-m", "corral.cli", "serve", "credentials"],
        env=server_env(env),
    )
    with (tmp_path / "stderr.log").open("w") as err:
        async with Client(stdio_client(params, errlog=err)) as client:
            for i, host in enumerate(TARGETS):
                is_error, text, _ = await call(
                    client,
                    "http_request",
                    {"credential": f"wide{i}", "method": "GET", "url": f"http://{host}/latest/meta-data/"},
                )
                assert is_error
                # private/metadata addresses are refused by policy; public names cannot even resolve in the empty namespace
                expected = "unavailable" if host in ("metadata.google.internal", "example.com") else "policy_denied"
                assert expected in text, text
    LOG_LINES.append((tmp_path / "stderr.log").read_text())


async def test_streamable_http_end_to_end(env, tmp_path):
    """`corral serve credentials --http`: the same tools over streamable HTTP on loopback."""
    port = free_port()
    errlog = (tmp_path / "http-stderr.log").open("w")
    proc = subprocess.Popen(  # returns at once; the server outlives this statement
        [sys.executable, "-m", "corral.cli", "serve", "credentials", "--http", f"127.0.0.1:{port}"],
        env=server_env(env),
        stdout=subprocess.DEVNULL,
        stderr=errlog,
    )
    try:
        wait_listening(port, proc)
        async with bearer_client(f"http://127.0.0.1:{port}/mcp", env.settings.home) as client:
            is_error, _, out = await call(
                client, "http_request", {"credential": "echo", "method": "GET", "url": env.upstream.url("/echo-b64")}
            )
            assert not is_error and out["status"] == 200 and "[REDACTED]" in out["body"]
            is_error, text, _ = await call(
                client,
                "http_request",
                {"credential": "strict", "method": "GET", "url": f"http://127.0.0.1:{env.upstream.port}/"},
            )
            assert is_error and "policy_denied" in text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        errlog.close()
    LOG_LINES.append((tmp_path / "http-stderr.log").read_text())
