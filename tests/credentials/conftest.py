"""Fixtures: a real vault (encrypted-file keyring in tmp), a real loopback upstream, and the
credential server reached through a real MCP client (in memory). Every tool output, audit
line and log record is collected for the secret sweep (`leaks()`), which runs after the last
test of this package whatever order the tests ran in, and in test_sweep.py."""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
from pathlib import Path

import pytest
from mcp.client import Client

from corral.servers.credentials.netguard import StaticResolver
from corral.servers.credentials.proxy import Proxy
from corral.servers.credentials.server import Redaction, build_server
from corral.servers.credentials.transport import LoopbackOnly
from corral.vault import open_vault
from corral.vault.config import VaultSettings
from corral.vault.policy import Credential
from corral.vault.redact import secret_forms
from tests.credentials.upstream import Upstream

# Collected across the whole session for the sweep.
SECRETS: list[str] = []
OUTPUTS: list[str] = []
AUDIT_FILES: list[Path] = []
LOG_LINES: list[str] = []


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        LOG_LINES.append(self.format(record))


_collector = _Collect(level=logging.DEBUG)
logging.getLogger().addHandler(_collector)
for _name in ("corral", "httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.DEBUG)


def leaks() -> list[str]:
    """Every form of a stored secret (each encoding the redactor claims to cover) found so far
    in a tool output, log line or audit line, with what surrounds it."""
    exact: set[bytes] = set()
    folded: set[bytes] = set()
    for secret in SECRETS:
        e, f = secret_forms(secret)
        exact |= e
        folded |= f
    patterns = [
        re.compile("|".join(re.escape(x.decode("latin-1")) for x in forms), flags)
        for forms, flags in ((exact, 0), (folded, re.IGNORECASE))
        if forms
    ]
    haystacks = {"output": OUTPUTS, "log": LOG_LINES, "audit": [p.read_text() for p in AUDIT_FILES if p.exists()]}
    return [
        f"{where}: ...{text[max(0, found.start() - 100) : found.end()]}"
        for where, texts in haystacks.items()
        for text in texts
        for pattern in patterns
        if (found := pattern.search(text))
    ]


@pytest.fixture(scope="package", autouse=True)
def no_secret_left_the_proxy():
    """After the last test of this package (in any order, any selection): sweep all it collected."""
    yield
    found = leaks()
    assert not found, "a form of a secret leaked into " + "\n".join(found)


def new_secret(prefix: str) -> str:
    value = f"{prefix}-{secrets.token_urlsafe(18)}"
    SECRETS.append(value)
    return value


@pytest.fixture(scope="session")
def shared_upstream():
    with Upstream() as up:
        yield up


@pytest.fixture
def upstream(shared_upstream):
    """One loopback server for the session (cheap tests); each test starts with an empty record."""
    shared_upstream.seen.clear()
    yield shared_upstream
    shared_upstream.seen.clear()


class Env:
    def __init__(self, tmp: Path, upstream: Upstream, template: Path | None = None) -> None:
        self.settings = VaultSettings(
            home=tmp / "home",
            vault_backend="encrypted-file",
            proxy_max_request_bytes=4096,
            proxy_max_response_bytes=2048,
        )
        if template is not None:  # a copy of the session's seeded vault: same secrets, no re-encryption per test
            shutil.copytree(template / "home", tmp / "home")
        self.vault, _ = open_vault(self.settings, None)
        self.upstream = upstream
        self.connector = LoopbackOnly()
        self.resolver = StaticResolver(
            {
                "api.test": ["127.0.0.1"],
                "rebind.test": ["127.0.0.1"],
                "mixed.test": ["127.0.0.1", "10.0.0.1"],
                "xn--bcher-kva.test": ["127.0.0.1"],
                "bucher.test": ["127.0.0.1"],
            }
        )
        self.secrets: dict[str, str] = dict(_SEEDED)
        self.redaction = Redaction().install()  # what a server owns; removed when the test ends (fixture `env`)
        AUDIT_FILES.append(self.vault.directory / "audit.jsonl")
        if template is None:
            self.seed()

    def seed(self) -> None:
        base = {"schemes": ["http"], "ports": [self.upstream.port], "methods": ["GET", "POST"]}
        self.add(
            Credential(
                name="echo",
                kind="bearer",
                hosts=["127.0.0.1", "api.test"],
                allow_private=True,
                description="echo upstream",
                **base,
            )
        )
        self.add(
            Credential(
                name="strict",
                kind="bearer",
                hosts=["api.test", "rebind.test", "mixed.test"],
                allow_private=False,
                **base,
            )
        )
        self.add(
            Credential(
                name="hdr",
                kind="header",
                header="X-Api-Key",
                template="key={secret}",
                hosts=["127.0.0.1"],
                allow_private=True,
                **base,
            )
        )
        self.add(
            Credential(name="basic", kind="basic", username="bob", hosts=["127.0.0.1"], allow_private=True, **base)
        )
        self.add(
            Credential(
                name="query", kind="query", query_param="api_key", hosts=["127.0.0.1"], allow_private=True, **base
            )
        )

    def add(self, cred: Credential) -> None:
        self.secrets[cred.name] = new_secret(f"sk-{cred.name}")
        self.vault.set(cred, self.secrets[cred.name])

    def proxy(self) -> Proxy:
        proxy = Proxy(self.vault, self.settings, resolver=self.resolver, connector=self.connector)
        self.redaction.add(proxy)
        return proxy

    def audit_lines(self) -> list[dict]:
        path = self.vault.directory / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


_SEEDED: dict[str, str] = {}


@pytest.fixture(scope="session")
def seeded_vault(tmp_path_factory, shared_upstream) -> Path:
    root = tmp_path_factory.mktemp("seeded")
    env = Env(root, shared_upstream)
    _SEEDED.update(env.secrets)
    return root


@pytest.fixture
def env(tmp_path: Path, upstream: Upstream, seeded_vault: Path):
    env = Env(tmp_path, upstream, template=seeded_vault)
    yield env
    env.redaction.remove()


class Recorder:
    """Wraps an MCP client; keeps every tool output for the sweep."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, name: str, args: dict | None = None):
        result = await self.client.call_tool(name, args or {})
        for block in result.content:
            OUTPUTS.append(getattr(block, "text", "") or "")
        if result.structured_content is not None:
            OUTPUTS.append(json.dumps(result.structured_content))
        return result

    async def ok(self, name: str, args: dict | None = None) -> dict:
        result = await self.call(name, args)
        assert not result.is_error, result.content[0].text
        return result.structured_content

    async def error(self, name: str, args: dict | None = None) -> str:
        result = await self.call(name, args)
        assert result.is_error, f"expected an error, got {result.structured_content}"
        return result.content[0].text.removeprefix(f"Error executing tool {name}: ")


@pytest.fixture
async def mcp(env: Env):
    proxy = env.proxy()
    async with Client(build_server(proxy)) as client:
        yield Recorder(client)
    await proxy.aclose()
