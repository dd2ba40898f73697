"""The last test of the credentials suite: sweep everything that left the proxy for every secret.

It first makes its own leak attempts (so it can fail when run alone), then searches every
tool output, audit line and log line collected during the session for every stored secret
in every encoding the redactor claims to cover.
"""

from __future__ import annotations

import re

import pytest

from tests.credentials.conftest import AUDIT_FILES, LOG_LINES, OUTPUTS, SECRETS
from corral.vault.redact import secret_forms

pytestmark = pytest.mark.anyio


async def test_sweep_finds_no_secret_anywhere(mcp, env):
    for path in ("/echo", "/echo-b64", "/echo-hex", "/echo-gzip", "/echo-chunked?size=2"):
        for cred in ("echo", "hdr", "basic", "query"):
            await mcp.ok("http_request", {"credential": cred, "method": "GET", "url": env.upstream.url(path)})
    await mcp.error("http_request", {"credential": "echo", "method": "GET", "url": "http://2852039166/"})
    assert len(SECRETS) >= 5 and OUTPUTS and LOG_LINES

    haystacks = {"output": OUTPUTS, "log": LOG_LINES, "audit": [p.read_text() for p in AUDIT_FILES if p.exists()]}
    assert haystacks["audit"]
    exact: set[bytes] = set()
    folded: set[bytes] = set()
    for secret in SECRETS:
        e, f = secret_forms(secret)
        exact |= e
        folded |= f
    patterns = [
        re.compile("|".join(re.escape(x.decode("latin-1")) for x in exact)),
        re.compile("|".join(re.escape(x.decode("latin-1")) for x in folded), re.IGNORECASE),
    ]
    for where, texts in haystacks.items():
        for text in texts:
            for pattern in patterns:
                found = pattern.search(text)
                assert not found, f"a form of a secret leaked into {where}: ...{text[max(0, found.start() - 100):found.end()]}"
