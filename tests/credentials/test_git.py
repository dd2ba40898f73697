"""Git through the proxy, end to end: a real `git http-backend` on loopback that demands the token,
a real bubblewrap sandbox (the sandbox area's backend, `--unshare-net`), and the git gateway.

The sandbox clones, commits and pushes through a capability URL; afterwards no form of the
secret is found in its files, environment or process arguments.
"""

from __future__ import annotations

import base64
import gzip
import os
import shutil
import subprocess
import tempfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import anyio
import httpx
import pytest
from mcp.client import Client

from corral.vault.policy import Credential
from corral.vault.redact import secret_forms
from tests.credentials.conftest import LOG_LINES, OUTPUTS, new_secret
from tests.credentials.gitserver import GitServer
from tests.credentials.upstream import Upstream

pytestmark = pytest.mark.anyio


def git(*args: str, cwd: Path | None = None) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd or "/tmp"), "GIT_CONFIG_NOSYSTEM": "1"}
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def repo(tmp_path: Path, needs_git) -> Path:
    root = tmp_path / "git"
    bare = root / "repo.git"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("config", "http.receivepack", "true", cwd=bare)
    seed = tmp_path / "seed"
    git("clone", "-q", str(bare), str(seed))
    (seed / "README").write_text("hello\n")
    git("add", "README", cwd=seed)
    git("commit", "-q", "-m", "seed", cwd=seed)
    git("push", "-q", "origin", "HEAD:main", cwd=seed)
    return root


@pytest.fixture
def sandbox_backend(needs_bwrap):
    from corral.servers.sandbox.bubblewrap import BubblewrapBackend
    from corral.servers.sandbox.config import BubblewrapConfig, ExtraBind

    # Outside pytest's 0700 tmp: a root server runs sandboxes as an unprivileged uid, which must reach these.
    sockdir = Path(tempfile.mkdtemp(prefix="corral-git-"))
    sockdir.chmod(0o711)
    root = Path(tempfile.mkdtemp(prefix="corral-sbx-"))
    config = BubblewrapConfig(root=root, extra_binds=[ExtraBind(source=sockdir, dest="/run/corral")])
    yield BubblewrapBackend(config), sockdir, root
    shutil.rmtree(sockdir, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


async def run(backend, ref, command: str, timeout_s: float = 90):
    from corral.servers.sandbox.backend import ExecRequest

    return await backend.execute(
        ref, ExecRequest(command=command, timeout_s=timeout_s, env={"GIT_TERMINAL_PROMPT": "0"})
    )


def scan_for_secret(root: Path, secret: str) -> list[str]:
    exact, folded = secret_forms(secret)
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(f in data for f in exact) or any(f.lower() in data.lower() for f in folded):
                hits.append(str(path))
    return hits


async def test_sandbox_clones_fetches_pushes_without_the_secret(env, repo, sandbox_backend):
    from corral.servers.credentials.gateway import GitGateway
    from corral.servers.credentials.proxy import Proxy
    from corral.servers.credentials.server import build_server
    from corral.servers.sandbox.config import SandboxSettings

    backend, sockdir, sandbox_root = sandbox_backend
    secret = new_secret("ghp")
    with GitServer(repo, secret) as upstream:
        env.vault.set(
            Credential(
                name="repo",
                kind="git",
                hosts=["127.0.0.1"],
                schemes=["http"],
                ports=[upstream.port],
                allow_private=True,
            ),
            secret,
        )
        proxy = Proxy(env.vault, env.settings, connector=env.connector)
        env.redaction.add(proxy)
        gateway = GitGateway(
            Proxy(env.vault, env.settings, connector=env.connector), env.settings, socket_path=sockdir / "git.sock"
        )
        gateway.start()
        try:
            repo_url = f"http://127.0.0.1:{upstream.port}/repo.git"
            async with Client(build_server(proxy, gateway)) as client:
                grants = {}
                for access, ttl in (("write", 300), ("read", 300), ("short", 1)):
                    result = await client.call_tool(
                        "git_access",
                        {
                            "credential": "repo",
                            "repo_url": repo_url,
                            "access": "read" if access == "short" else access,
                            "ttl_s": ttl,
                        },
                    )
                    assert not result.is_error, result.content[0].text
                    OUTPUTS.append(result.content[0].text)
                    grants[access] = result.structured_content["remote_url"]
                denied = await client.call_tool("git_access", {"credential": "echo", "repo_url": repo_url})
                assert denied.is_error and "not git" in denied.content[0].text

            ref = await backend.provision("sbxgit", SandboxSettings().spec())
            fwd = gateway.forwarder_command()  # the forwarder comes with the socket, in the mounted directory
            assert fwd == "python3 /run/corral/git_forwarder.py --socket /run/corral/git.sock --"

            # The sandbox cannot reach the upstream itself (own network namespace)...
            direct = await run(backend, ref, f"git ls-remote {repo_url}", 30)
            assert direct.exit_code != 0
            # ...but clones, commits, pushes and fetches through the capability.
            script = (
                f"set -e; {fwd} git clone -q {grants['write']} work; cd work; "
                "git -c user.name=s -c user.email=s@s commit -q --allow-empty -m from-sandbox; "
                f"{fwd} git push -q origin HEAD:main; "
                # while the forwarder and git run: snapshot every process's arguments and environment
                f"{fwd} sh -c 'git fetch -q origin & cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ > /tmp/procdump 2>/dev/null; wait'; "
                "git log --format=%s origin/main"
            )
            done = await run(backend, ref, script)
            assert done.exit_code == 0, done.stderr
            assert done.stdout.split() == ["from-sandbox", "seed"]
            assert git("--git-dir", str(repo / "repo.git"), "log", "--format=%s", "main").split() == [
                "from-sandbox",
                "seed",
            ]
            assert upstream.seen and all(s["auth"] == upstream.server.expected for s in upstream.seen)

            # A read capability clones but cannot push; an expired one does nothing.
            done = await run(
                backend,
                ref,
                f"set -e; {fwd} git clone -q {grants['read']} ro; cd ro; git -c user.name=s -c user.email=s@s commit -q --allow-empty -m nope; {fwd} git push -q origin HEAD:main",
            )
            assert done.exit_code != 0 and "read-only" in done.stderr
            await anyio.sleep(1.2)
            done = await run(backend, ref, f"{fwd} git clone -q {grants['short']} expired")
            assert done.exit_code != 0 and "expired" in done.stderr

            # No byte of the secret in the sandbox: files, environment, process arguments.
            probe = await run(
                backend, ref, "cat /proc/1/environ; env; cat /proc/*/cmdline; cat /workspace/work/.git/config", 30
            )
            assert (
                grants["write"].split("/")[3] in probe.stdout
            )  # the capability is there: it is what the sandbox holds
            for text in (probe.stdout, probe.stderr, done.stdout, done.stderr):
                assert secret not in text
            assert (sandbox_root / "sbxgit" / "tmp" / "procdump").stat().st_size > 0
            assert scan_for_secret(sandbox_root, secret) == []
        finally:
            gateway.stop()
            await proxy.aclose()
    audit = env.vault.directory / "audit.jsonl"
    lines = [line for line in audit.read_text().splitlines() if '"via": "git"' in line]
    assert lines and all(secret not in line for line in lines)


async def test_gateway_refuses_bad_tokens_and_non_git_paths(env, tmp_path):
    from corral.servers.credentials.gateway import GitGateway
    from corral.servers.credentials.proxy import Proxy

    secret = new_secret("ghp")
    env.vault.set(
        Credential(
            name="repo",
            kind="git",
            hosts=["127.0.0.1"],
            schemes=["http"],
            ports=[env.upstream.port],
            allow_private=True,
        ),
        secret,
    )
    gateway = GitGateway(
        Proxy(env.vault, env.settings, connector=env.connector), env.settings, socket_path=tmp_path / "run" / "git.sock"
    )
    gateway.start()
    try:
        grant = await gateway.grant("repo", env.upstream.url("/repo.git"), "read", 60)
        token = grant.remote_url.split("/")[3]
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(gateway.socket_path)), base_url="http://gw"
        ) as c:
            assert (await c.get("/not-a-token/repo/info/refs?service=git-upload-pack")).status_code == 403
            assert (await c.get(f"/{token}/repo/objects/info/packs")).status_code == 404  # dumb protocol / other paths
            assert (await c.get(f"/{token}/repo/info/refs?service=git-receive-pack")).status_code == 403  # read grant
            assert (await c.get(f"/{token}/repo/info/refs")).status_code == 404
            ok = await c.get(f"/{token}/repo/info/refs?service=git-upload-pack")
            assert ok.status_code == 404  # forwarded to the echo upstream, which has no such path
        seen = env.upstream.seen
        assert len(seen) == 1 and seen[0]["path"] == "/repo.git/info/refs?service=git-upload-pack"
        # not listable by others; as root, traversable by the sandboxes' unprivileged uid
        assert gateway.socket_path.parent.stat().st_mode & 0o777 == (0o711 if os.geteuid() == 0 else 0o700)
        # a second proxy process does not steal a live gateway's socket
        other = GitGateway(Proxy(env.vault, env.settings), env.settings, socket_path=gateway.socket_path)
        other.start()
        try:
            assert other.socket_path.name == f"git-{os.getpid()}.sock" and gateway.socket_path.exists()
            assert other.forwarder_command().endswith(f"--socket /run/corral/git-{os.getpid()}.sock --")
        finally:
            other.stop()
        with pytest.raises(Exception, match="not allowed for host"):
            await gateway.grant("repo", "http://evil.test/repo.git", "read", 60)
    finally:
        gateway.stop()
    LOG_LINES.append(str(grant))


class Reflecting(BaseHTTPRequestHandler):
    """A git host that writes the Authorization header it got into its answers: /r401 as a 401
    page, /r200 inside a 200 ref advertisement, /rgz as a gzip'd 401, /r500 as a POST error,
    /rhtml as a 2xx POST that is not git's, /rpack inside a 2xx upload-pack result."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization", "")
        reflected = f"you sent: {auth}\nwhich is {base64.b64decode(auth.split()[-1]).decode()}\n".encode()
        repo = self.path.split("/")[1]
        status, ctype, body, extra = {
            "r401": (401, "text/plain", reflected, {}),
            "r200": (
                200,
                "application/x-git-upload-pack-advertisement",
                b"001e# service=git-upload-pack\n0000" + reflected,
                {},
            ),
            "rgz": (401, "text/html", gzip.compress(reflected), {"Content-Encoding": "gzip"}),
            "r500": (500, "text/plain", reflected, {}),
            "rhtml": (200, "text/html", reflected, {}),
            "rpack": (200, "application/x-git-upload-pack-result", b"PACK" + reflected, {}),
        }[repo]
        self.send_response(status)
        for k, v in {"Content-Type": ctype, "Content-Length": str(len(body)), **extra}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _handle


@pytest.mark.parametrize(
    ("repo", "method", "redacted"),
    [
        ("r401", "GET", True),
        ("r200", "GET", True),
        ("rgz", "GET", True),
        ("r500", "POST", True),
        ("rhtml", "POST", True),
        ("rpack", "POST", False),  # the packfile stream: documented as passed unredacted
    ],
)
async def test_gateway_redacts_everything_but_packfiles(env, tmp_path, repo, method, redacted):
    from corral.servers.credentials.gateway import GitGateway
    from corral.servers.credentials.proxy import Proxy

    secret = new_secret("ghp")
    token_b64 = base64.b64encode(f"x-access-token:{secret}".encode()).decode()
    with Upstream(Reflecting) as upstream:
        env.vault.set(
            Credential(
                name="repo",
                kind="git",
                username="x-access-token",
                hosts=["127.0.0.1"],
                schemes=["http"],
                ports=[upstream.port],
                allow_private=True,
            ),
            secret,
        )
        gateway = GitGateway(
            Proxy(env.vault, env.settings, connector=env.connector),
            env.settings,
            socket_path=tmp_path / "run" / "git.sock",
        )
        gateway.start()
        try:
            grant = await gateway.grant("repo", upstream.url(f"/{repo}/x.git"), "read", 60)
            token = grant.remote_url.split("/")[3]
            async with httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(gateway.socket_path)), base_url="http://gw"
            ) as c:
                if method == "GET":
                    resp = await c.get(f"/{token}/x/info/refs?service=git-upload-pack")
                else:
                    resp = await c.post(
                        f"/{token}/x/git-upload-pack",
                        content=b"0000",
                        headers={"Content-Type": "application/x-git-upload-pack-request"},
                    )
        finally:
            gateway.stop()
    body = resp.content
    assert b"you sent: Basic" in body  # the upstream's page did arrive
    if redacted:
        assert secret.encode() not in body and token_b64.encode() not in body and b"[REDACTED]" in body, body
        OUTPUTS.append(body.decode())
    else:
        assert token_b64.encode() in body and body.startswith(b"PACK")
