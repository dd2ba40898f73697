"""Attacks on the credential proxy, each through a real MCP client against a real loopback upstream.

Every refused request also asserts that nothing reached the upstream (and, for off-machine
addresses, that the test's connector saw no connection attempt at all).
"""

from __future__ import annotations

import base64
import json

import pytest

from corral.vault.redact import secret_forms
from tests.credentials.encoders import ENCODERS, ODD_SECRET

pytestmark = pytest.mark.anyio


def req(credential: str, url: str, method: str = "GET", **extra) -> dict:
    return {"credential": credential, "method": method, "url": url, **extra}


def assert_clean(env, *texts: str) -> None:
    """No stored secret in any form the redactor promises to catch (raw, base64 at every alignment, hex, ...)."""
    for text in texts:
        data = text.encode()
        for secret in env.secrets.values():
            exact, folded = secret_forms(secret)
            assert not [f for f in exact if f in data], f"a form of a secret leaked: {text[:200]}"
            assert not [f for f in folded if f.lower() in data.lower()], f"a form of a secret leaked: {text[:200]}"


# -- injection and redaction ------------------------------------------------------------


async def test_bearer_injected_and_echo_redacted_in_body_and_headers(mcp, env):
    out = await mcp.ok("http_request", req("echo", env.upstream.url("/echo")))
    assert env.upstream.seen[-1]["headers"]["Authorization"] == f"Bearer {env.secrets['echo']}"
    assert out["status"] == 200
    assert json.loads(out["body"])["headers"]["Authorization"] == "Bearer [REDACTED]"
    assert ["x-echo-auth", "Bearer [REDACTED]"] in out["headers"]
    assert_clean(env, json.dumps(out))


@pytest.mark.parametrize(
    "path", ["/echo-b64", "/echo-hex", "/echo-gzip", "/echo-chunked?size=3", "/echo-chunked?size=1"]
)
async def test_echo_in_every_encoding_is_redacted(mcp, env, path):
    out = await mcp.ok("http_request", req("echo", env.upstream.url(path)))
    assert out["status"] == 200
    assert "[REDACTED]" in out["body"] or "[REDACTED]" in json.dumps(out["headers"])
    assert_clean(env, json.dumps(out))
    if path == "/echo-gzip":  # decoded before redaction, returned decoded
        assert json.loads(out["body"])["headers"]["Authorization"] == "Bearer [REDACTED]"


@pytest.mark.parametrize("form", sorted(ENCODERS))
async def test_secret_as_real_encoders_write_it_is_redacted(mcp, env, form):
    """The upstream reflects a secret with & < > ' * ~ ! ( ) space / + \" \\ and non-ASCII in it
    the way Go's encoding/json, PHP, encodeURIComponent, Java's URLEncoder ... would."""
    from urllib.parse import quote

    from corral.vault.policy import Credential
    from tests.credentials.conftest import SECRETS

    env.vault.set(
        Credential(
            name="odd",
            kind="query",
            query_param="k",
            hosts=["127.0.0.1"],
            schemes=["http"],
            ports=[env.upstream.port],
            allow_private=True,
        ),
        ODD_SECRET,
    )
    env.secrets["odd"] = ODD_SECRET
    SECRETS.append(ODD_SECRET)
    out = await mcp.ok("http_request", req("odd", env.upstream.url(f"/reflect?form={quote(form)}")))
    assert out["status"] == 200 and "[REDACTED]" in out["body"], out["body"]
    assert ENCODERS[form](ODD_SECRET) not in out["body"]
    assert_clean(env, json.dumps(out), out["body"])


async def test_undecodable_encoding_is_withheld_not_passed_through(mcp, env):
    out = await mcp.ok("http_request", req("echo", env.upstream.url("/echo-br")))
    assert out["body"] == "" and "br" in out["body_withheld"]


@pytest.mark.parametrize(
    ("credential", "header", "expected"),
    [
        ("hdr", "X-Api-Key", lambda s: f"key={s}"),
        ("basic", "Authorization", lambda s: "Basic " + base64.b64encode(f"bob:{s}".encode()).decode()),
    ],
)
async def test_header_kinds_inject_and_redact(mcp, env, credential, header, expected):
    out = await mcp.ok("http_request", req(credential, env.upstream.url("/echo-b64")))
    assert env.upstream.seen[-1]["headers"][header] == expected(env.secrets[credential])
    assert_clean(env, json.dumps(out))


async def test_query_kind_replaces_client_param(mcp, env):
    out = await mcp.ok("http_request", req("query", env.upstream.url("/echo?api_key=attacker&x=1")))
    path = env.upstream.seen[-1]["path"]
    assert f"api_key={env.secrets['query']}" in path and "attacker" not in path and "x=1" in path
    assert "api_key=[REDACTED]" in out["body"]
    assert_clean(env, json.dumps(out))


@pytest.mark.parametrize("name", ["Authorization", "authorization", "AUTHORIZATION"])
async def test_client_authorization_is_replaced_never_passed(mcp, env, name):
    await mcp.ok(
        "http_request", req("echo", env.upstream.url("/echo"), headers={name: "Bearer attacker", "X-Ok": "yes"})
    )
    seen = env.upstream.seen[-1]["headers"]
    auths = [v for k, v in seen.items() if k.lower() == "authorization"]
    assert auths == [f"Bearer {env.secrets['echo']}"] and seen["X-Ok"] == "yes"


async def test_secret_straddling_the_response_cap_is_not_leaked(mcp, env):
    probe = await mcp.ok("http_request", req("echo", env.upstream.url("/echo-chunked?pad=")))
    offset = probe["body"].index("Bearer [REDACTED]") + len("Bearer ")  # where the secret starts in the raw echo
    for delta in (5, 12, 20):  # put the secret across the 2048-byte cap at several points
        pad = "p" * (2048 - delta - offset)
        out = await mcp.ok("http_request", req("echo", env.upstream.url(f"/echo-chunked?pad={pad}")))
        assert out["truncated"] and out["body_bytes"] > 2048
        body = out["body"]
        secret = env.secrets["echo"]
        assert not any(secret[:n] in body for n in range(8, len(secret) + 1)), body[-80:]


async def test_cap_never_exposes_part_of_a_secret_at_any_cut(mcp, env):
    """100 copies of the secret: redaction shortens the text by far more than the extra bytes
    read past the cap, and the cut still never lands inside an unredacted copy."""
    secret = env.secrets["echo"].encode()
    step = len(secret) + 1
    for pad in range(step + 1):  # every alignment of the 2,048-byte cut against the copies
        out = await mcp.ok("http_request", req("echo", env.upstream.url(f"/copies?n=100&pad={pad}")))
        assert out["truncated"] and "[REDACTED]" in out["body"]
        body = out["body"].encode()
        assert not [n for n in range(5, len(secret) + 1) if secret[:n] in body], (pad, body[-60:])


async def test_response_over_cap_is_truncated_with_totals(mcp, env):
    out = await mcp.ok("http_request", req("echo", env.upstream.url("/big?n=10000")))
    assert out["truncated"] is True and out["body_bytes"] == 10000 and len(out["body"]) == 2048


async def test_gzip_bomb_is_read_only_up_to_the_drain_cap(env):
    from mcp.client import Client

    from corral.servers.credentials.proxy import Proxy
    from corral.servers.credentials.server import build_server

    settings = env.settings.model_copy(update={"proxy_drain_bytes": 1 << 20})
    proxy = Proxy(env.vault, settings, connector=env.connector)
    async with Client(build_server(proxy)) as client:
        result = await client.call_tool("http_request", req("echo", env.upstream.url("/bomb")))
    await proxy.aclose()
    out = result.structured_content
    assert out["truncated"] and out["body_bytes_exact"] is False
    assert (1 << 20) <= out["body_bytes"] < (2 << 20) and len(out["body"]) == 2048


@pytest.mark.parametrize("timeout_s", [0, -1, 601])
async def test_bad_timeout_refused(mcp, env, timeout_s):
    text = await mcp.error("http_request", req("echo", env.upstream.url("/echo"), timeout_s=timeout_s))
    assert text.startswith("invalid_argument") and env.upstream.seen == []


async def test_no_cookies_carried_between_requests(mcp, env):
    out = await mcp.ok("http_request", req("echo", env.upstream.url("/set-cookie")))
    assert ["set-cookie", "session=abc123; Path=/"] in out["headers"]  # shown to the caller...
    await mcp.ok("http_request", req("echo", env.upstream.url("/echo")))
    assert "Cookie" not in env.upstream.seen[-1]["headers"]  # ...but never replayed by the proxy


# -- redirects ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "to"),
    [
        ("302", "http://evil.test/steal"),
        ("307", "http://127.0.0.1:1/other-port"),
        ("302", "http://127.0.0.1:{port}/echo"),
        ("307", "https://api.test/x"),
    ],
)
async def test_redirects_are_returned_never_followed(mcp, env, code, to):
    to = to.format(port=env.upstream.port)
    out = await mcp.ok("http_request", req("echo", env.upstream.url(f"/redirect?code={code}&to={to}")))
    assert out["status"] == int(code)
    assert ["location", to] in out["headers"]
    assert len(env.upstream.seen) == 1  # the redirect target (even on the same host) was not requested
    assert env.connector.attempts == [("127.0.0.1", env.upstream.port)]


# -- where requests may go ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1@evil.test:{port}/echo", "invalid_argument"),  # allowed@evil: user info refused
        ("http://api.test@127.0.0.2:{port}/echo", "invalid_argument"),
        ("http://evil.test:{port}#@127.0.0.1/echo", "policy_denied"),  # evil#@allowed: host is evil
        ("http://evil.test:{port}/#@127.0.0.1", "policy_denied"),
        ("http://api.test.evil.test:{port}/echo", "policy_denied"),  # allowed.evil
        ("http://api.test.:{port}/..%2f@evil.test", None),  # trailing dot: still api.test, allowed
        ("http://API.Test:{port}/echo", None),  # case
        ("http://%61pi.test:{port}/echo", "invalid_argument"),  # percent escapes in a host
        ("http://xn--pi-test.evil:{port}/echo", "policy_denied"),
        ("ftp://127.0.0.1:{port}/echo", "invalid_argument"),
        ("https://127.0.0.1:{port}/echo", "policy_denied"),  # scheme not allowed
        ("http://127.0.0.1:1/echo", "policy_denied"),  # port not allowed
        ("/echo", "invalid_argument"),
    ],
)
async def test_tricky_urls(mcp, env, url, kind):
    url = url.format(port=env.upstream.port)
    if kind is None:
        out = await mcp.ok("http_request", req("echo", url))
        assert out["status"] in (200, 404)
        assert env.connector.attempts == [("127.0.0.1", env.upstream.port)]
        return
    text = await mcp.error("http_request", req("echo", url))
    assert text.startswith(kind), text
    assert env.upstream.seen == [] and env.connector.attempts == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://2852039166/latest/meta-data/",
        "http://0xa9fea9fe/",
        "http://0251.0376.0251.0376/",
        "http://169.254.43518/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[fd00:ec2::254]/",
        "http://[::169.254.169.254]/",  # IPv4-compatible
        "http://[::ffff:0:169.254.169.254]/",  # SIIT
        "http://[64:ff9b:1::a9fe:a9fe]/",  # local-use NAT64, /96 position
        "http://[64:ff9b:1:a9fe:a9:fe00::]/",  # local-use NAT64, /48 position
        "http://0.0.0.0/",
        "http://[::]/",
    ],
)
async def test_metadata_and_unspecified_addresses_refused_even_when_private_allowed(mcp, env, url):
    from corral.vault.policy import Credential

    host = url.split("//")[1].split("/")[0]
    env.add(Credential(name="meta", hosts=[host], schemes=["http"], ports=[80], allow_private=True))
    text = await mcp.error("http_request", req("meta", url))
    # httpx itself rejects some spellings (dotted octal) as invalid: refused either way
    assert text.startswith(("policy_denied", "invalid_argument") if "0376." in url else "policy_denied"), text
    assert env.connector.attempts == []  # refused before any connection


@pytest.mark.parametrize("host", ["rebind.test", "mixed.test"])
async def test_name_resolving_to_loopback_refused_when_private_not_allowed(mcp, env, host):
    text = await mcp.error("http_request", req("strict", env.upstream.url("/echo", host=host)))
    assert text.startswith("policy_denied") and "resolves to" in text
    assert env.upstream.seen == [] and env.connector.attempts == []


@pytest.mark.parametrize(
    "address",
    [
        "::127.0.0.1",
        "::10.0.0.1",
        "::ffff:0:127.0.0.1",
        "::ffff:0:192.168.1.1",
        "64:ff9b:1::7f00:1",
        "64:ff9b:1::a00:1",
        "fec0::1",
        "fec0:1::5",
    ],
)
async def test_ipv6_forms_of_internal_addresses_refused(mcp, env, address):
    """A name answering with IPv6 that embeds an internal IPv4 (or is site-local) is refused
    for a policy without private addresses; the static resolver keeps it on this machine."""
    env.resolver.table["rebind.test"] = [address]
    text = await mcp.error("http_request", req("strict", env.upstream.url("/echo", host="rebind.test")))
    assert text.startswith("policy_denied") and "resolves to" in text, text
    assert env.upstream.seen == [] and env.connector.attempts == []


async def test_name_resolving_to_loopback_allowed_when_policy_allows(mcp, env):
    out = await mcp.ok("http_request", req("echo", env.upstream.url("/echo", host="api.test")))
    assert json.loads(out["body"])["headers"]["Host"] == f"api.test:{env.upstream.port}"  # Host kept, IP pinned
    assert env.connector.attempts == [("127.0.0.1", env.upstream.port)]


class RebindingResolver:
    """Answers a public address first and loopback ever after: the DNS-rebinding trick."""

    def __init__(self) -> None:
        self.calls = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return ["93.184.216.34"] if self.calls == 1 else ["127.0.0.1"]


async def test_dns_rebinding_connects_to_the_checked_address_only(env):
    """One resolution per request, and the connection goes to that checked address (here refused by
    the test's loopback-only connector, so nothing leaves the machine) - never to a second answer."""
    from mcp.client import Client

    from corral.servers.credentials.proxy import Proxy
    from corral.servers.credentials.server import build_server

    resolver = RebindingResolver()
    proxy = Proxy(env.vault, env.settings, resolver=resolver, connector=env.connector)
    async with Client(build_server(proxy)) as client:
        result = await client.call_tool("http_request", req("strict", env.upstream.url("/echo", host="rebind.test")))
    await proxy.aclose()
    assert result.is_error and "unavailable" in result.content[0].text
    assert resolver.calls == 1
    assert env.connector.attempts == [("93.184.216.34", env.upstream.port)] and env.upstream.seen == []


async def test_real_system_resolver_localhost_refused(env):
    """The real resolver (/etc/hosts, no DNS packet) turning `localhost` into loopback."""
    from mcp.client import Client

    from corral.servers.credentials.proxy import Proxy
    from corral.servers.credentials.server import build_server
    from corral.vault.policy import Credential

    env.add(Credential(name="local", hosts=["localhost"], schemes=["http"], ports=[env.upstream.port]))
    proxy = Proxy(env.vault, env.settings, connector=env.connector)
    async with Client(build_server(proxy)) as client:
        result = await client.call_tool("http_request", req("local", env.upstream.url("/echo", host="localhost")))
    assert result.is_error and "policy_denied: 'localhost' resolves to 127.0.0.1" in result.content[0].text
    assert env.upstream.seen == [] and env.connector.attempts == []


@pytest.mark.parametrize(
    ("url_host", "allowed"),
    [
        ("bücher.test", True),
        ("BÜCHER.test.", True),
        ("xn--bcher-kva.test", True),
        ("bucher.test", False),
        ("b\u00fc\u0441her.test", False),
    ],
)
async def test_idna_hosts_match_by_punycode_only(mcp, env, url_host, allowed):
    from corral.vault.policy import Credential

    env.add(
        Credential(name="idn", hosts=["bücher.test"], schemes=["http"], ports=[env.upstream.port], allow_private=True)
    )
    call = req("idn", f"http://{url_host}:{env.upstream.port}/echo")
    if allowed:
        out = await mcp.ok("http_request", call)
        assert (
            json.loads(out["body"])["headers"]["Host"].replace(".:", ":") == f"xn--bcher-kva.test:{env.upstream.port}"
        )
    else:  # a look-alike (ASCII u, Cyrillic es) is another host
        text = await mcp.error("http_request", call)
        assert text.startswith("policy_denied") and env.upstream.seen == []


async def test_client_copy_of_a_custom_credential_header_is_replaced(mcp, env):
    await mcp.ok("http_request", req("hdr", env.upstream.url("/echo"), headers={"x-api-key": "attacker"}))
    seen = env.upstream.seen[-1]["headers"]
    assert [v for k, v in seen.items() if k.lower() == "x-api-key"] == [f"key={env.secrets['hdr']}"]


# -- CR/LF and other header injection -------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        {"headers": {"X-A\r\nX-Injected": "1"}},
        {"headers": {"X-A": "ok\r\nX-Injected: 1"}},
        {"headers": {"X-A": "ok\nX-Injected: 1"}},
        {"headers": {"X-A": "ok\rX-Injected: 1"}},
        {"headers": {"X-A": "nul\0"}},
        {"headers": {"X A": "space in name"}},
        {"headers": {"X-A": "caf\u00e9"}},
        {"headers": {"Host": "evil.test"}},
        {"headers": {"Transfer-Encoding": "chunked"}},
        {"url_suffix": "\r\nX-Injected: 1"},
        {"url_suffix": "?a=b\nX-Injected: 1"},
        {"method": "GET\r\nX-Injected: 1"},
        {"method": "GET /other HTTP/1.1"},
    ],
)
async def test_crlf_and_smuggling_refused(mcp, env, args):
    args = dict(args)
    url = env.upstream.url("/echo") + args.pop("url_suffix", "")
    call = req("echo", url, method=args.pop("method", "GET"), **args)
    text = await mcp.error("http_request", call)
    assert text.startswith("invalid_argument"), text
    assert env.upstream.seen == []


async def test_percent_encoded_crlf_stays_encoded(mcp, env):
    await mcp.ok("http_request", req("echo", env.upstream.url("/echo%0D%0AX-Injected:%201")))
    seen = env.upstream.seen[-1]
    assert "X-Injected" not in seen["headers"] and "%0D%0A" in seen["path"]


# -- policy ----------------------------------------------------------------------------------


async def test_unknown_credential(mcp, env):
    text = await mcp.error("http_request", req("nope", env.upstream.url("/echo")))
    assert text.startswith("not_found") and "echo" in text  # names the known ones
    assert env.upstream.seen == []


@pytest.mark.parametrize("method", ["DELETE", "PUT", "delete"])
async def test_method_not_allowed(mcp, env, method):
    text = await mcp.error("http_request", req("echo", env.upstream.url("/echo"), method=method))
    assert text.startswith("policy_denied") and "GET" in text
    assert env.upstream.seen == []


@pytest.mark.parametrize("args", [{"body": "x" * 4097}, {"json": {"a": "x" * 5000}}, {"body": "a", "json": {"b": 1}}])
async def test_body_over_cap_or_ambiguous_refused(mcp, env, args):
    text = await mcp.error("http_request", req("echo", env.upstream.url("/echo"), method="POST", **args))
    assert text.startswith("invalid_argument")
    assert env.upstream.seen == []


async def test_body_and_json_are_sent(mcp, env):
    await mcp.ok("http_request", req("echo", env.upstream.url("/echo"), method="POST", json={"a": 1}))
    assert (
        env.upstream.seen[-1]["body"] == b'{"a": 1}'
        and env.upstream.seen[-1]["headers"]["Content-Type"] == "application/json"
    )
    await mcp.ok("http_request", req("echo", env.upstream.url("/echo"), method="POST", body="hello"))
    assert env.upstream.seen[-1]["body"] == b"hello"


async def test_upstream_timeout_is_a_timeout_error(mcp, env):
    text = await mcp.error("http_request", req("echo", env.upstream.url("/slow?s=3"), timeout_s=0.3))
    assert text.startswith("timeout")


async def test_upstream_down_is_unavailable_and_redacted(mcp, env):
    from corral.vault.policy import Credential

    env.add(
        Credential(
            name="down",
            kind="query",
            query_param="k",
            hosts=["127.0.0.1"],
            schemes=["http"],
            ports=[9],
            allow_private=True,
        )
    )
    text = await mcp.error("http_request", req("down", "http://127.0.0.1:9/x"))
    assert text.startswith("unavailable")
    assert_clean(env, text)


# -- listing and audit -------------------------------------------------------------------------


async def test_list_credentials_never_shows_values(mcp, env):
    out = await mcp.ok("list_credentials")
    names = {c["name"]: c for c in out["credentials"]}
    assert {"echo", "strict", "hdr", "basic", "query"} <= set(names)
    assert names["hdr"]["kind"] == "header" and names["echo"]["hosts"] == ["127.0.0.1", "api.test"]
    assert names["echo"]["description"] == "echo upstream" and names["echo"]["methods"] == ["GET", "POST"]
    assert_clean(env, json.dumps(out))


async def test_annotations_are_honest(mcp):
    tools = {t.name: t.annotations for t in (await mcp.client.list_tools()).tools}
    assert tools["http_request"].destructive_hint is True and tools["http_request"].open_world_hint is True
    assert tools["http_request"].read_only_hint is False
    assert tools["list_credentials"].read_only_hint is True and tools["list_credentials"].destructive_hint is False


async def test_tools_declare_output_schemas(mcp):
    tools = {t.name: t.output_schema for t in (await mcp.client.list_tools()).tools}
    assert {"status", "headers", "body", "body_encoding", "body_bytes", "truncated"} <= set(
        tools["http_request"]["properties"]
    )
    assert {"credentials", "next_cursor", "total"} <= set(tools["list_credentials"]["properties"])


async def test_every_use_is_audited_without_the_secret(mcp, env):
    await mcp.ok("http_request", req("echo", env.upstream.url("/echo?q=1")))
    await mcp.error("http_request", req("echo", env.upstream.url("/echo"), method="DELETE"))
    await mcp.error("http_request", req("nope", env.upstream.url("/echo")))
    lines = env.audit_lines()
    assert len(lines) == 3
    ok, denied, unknown = lines
    assert ok["credential"] == "echo" and ok["method"] == "GET" and ok["host"] == "127.0.0.1" and ok["path"] == "/echo"
    assert ok["status"] == 200 and ok["bytes"] > 0 and ok["outcome"] == "ok" and ok["time"].endswith("+00:00")
    assert ok["who"].startswith("mcp")  # the MCP client's declared name/version
    assert denied["outcome"] == "denied" and denied["error"] == "policy_denied" and denied["status"] is None
    assert unknown["credential"] == "nope" and unknown["error"] == "not_found"
    assert_clean(env, (env.vault.directory / "audit.jsonl").read_text())


async def test_vault_changes_are_picked_up_without_restart(mcp, env):
    from corral.vault.policy import Credential

    text = await mcp.error("http_request", req("late", env.upstream.url("/echo")))
    assert text.startswith("not_found")
    env.add(
        Credential(name="late", hosts=["127.0.0.1"], schemes=["http"], ports=[env.upstream.port], allow_private=True)
    )
    out = await mcp.ok("http_request", req("late", env.upstream.url("/echo")))
    assert env.upstream.seen[-1]["headers"]["Authorization"] == f"Bearer {env.secrets['late']}"
    assert_clean(env, json.dumps(out))
