import pytest

pytestmark = pytest.mark.anyio


async def test_echo_redacted(mcp, env):
    out = await mcp.ok("http_request", {"credential": "echo", "method": "GET", "url": env.upstream.url("/echo")})
    print(out)
    assert out["status"] == 200
