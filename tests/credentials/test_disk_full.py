"""`http_request` with the audit log on a full disk (issue 18, item 4): the call answers
`unavailable: no space left on device (free space under <vault dir>)`, the audit log holds
only whole lines, and auditing resumes once space is freed, in the same server."""

from __future__ import annotations

import pytest
from mcp.client import Client

from corral.servers.credentials.server import build_server
from tests.conftest import fill_disk

from .conftest import Env, Recorder

pytestmark = pytest.mark.anyio


async def test_http_request_on_a_full_disk_names_it_and_the_audit_log_stays_whole(small_disk, upstream, seeded_vault):
    env = Env(small_disk, upstream, template=seeded_vault)
    args = {"credential": "echo", "method": "GET", "url": upstream.url("/echo")}
    proxy = env.proxy()
    try:
        async with Client(build_server(proxy)) as client:
            mcp = Recorder(client)
            await mcp.ok("http_request", args)
            filler = fill_disk(small_disk)
            for _ in range(500):  # the audit file's last page may still take a few lines
                result = await mcp.call("http_request", args)
                if result.is_error:
                    break
            assert result.is_error, "the disk never filled up"
            text = result.content[0].text
            assert text.endswith(f"unavailable: no space left on device (free space under {env.vault.directory})"), text
            audited = env.audit_lines()  # every line parses: no half-written line
            assert audited and all(line["outcome"] == "ok" for line in audited)
            filler.unlink()  # space is freed: the same server audits again
            await mcp.ok("http_request", args)
            assert env.audit_lines()[: len(audited)] == audited and len(env.audit_lines()) == len(audited) + 1
    finally:
        await proxy.aclose()
        env.redaction.remove()
