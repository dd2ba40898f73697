"""Sweep everything that left the proxy for every secret.

This test makes its own leak attempts, then searches every tool output, audit line and log
line collected so far for every stored secret in every encoding the redactor claims to
cover. The same sweep runs again after the package's last test (`no_secret_left_the_proxy`
in conftest.py), so no test depends on running last.
"""

from __future__ import annotations

import pytest

from tests.credentials.conftest import AUDIT_FILES, LOG_LINES, OUTPUTS, SECRETS, leaks

pytestmark = pytest.mark.anyio


async def test_sweep_finds_no_secret_anywhere(mcp, env):
    for path in ("/echo", "/echo-b64", "/echo-hex", "/echo-gzip", "/echo-chunked?size=2"):
        for cred in ("echo", "hdr", "basic", "query"):
            await mcp.ok("http_request", {"credential": cred, "method": "GET", "url": env.upstream.url(path)})
    await mcp.error("http_request", {"credential": "echo", "method": "GET", "url": "http://2852039166/"})
    assert len(SECRETS) >= 5 and OUTPUTS and LOG_LINES
    assert any(p.exists() for p in AUDIT_FILES)
    found = leaks()
    assert not found, "a form of a secret leaked into " + "\n".join(found)
