"""The real parts tests need, each probed once, the way the tests use it.

A test says what it needs once: `@pytest.mark.requires("bwrap")`, or by depending on a fixture
that does (a fixture needing a part takes `needs_<part>`, e.g. `def up(needs_bwrap)`). Before
the test runs, `tests/conftest.py` probes each part (once per session) and skips with one
line naming what to install, or fails in CI (CI=true), where `.ci/run` provides everything.
Every test needing a part also carries the part's name as a plain marker, so
`pytest -m "not docker"` leaves out exactly the tests that need dockerd.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PARTS", "TEST_IMAGE", "UNSHARE_NET", "Part", "corral_exe", "missing", "postgres_url"]

REPO = Path(__file__).resolve().parents[1]
TEST_IMAGE = "corral-sandbox-test:latest"
GIT_HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
CHROMIUM = "/usr/bin/chromium"
NPM_CLAUDE = "@anthropic-ai/claude-code@2.1.197"
NPM_INSPECTOR = "@modelcontextprotocol/inspector@0.18.0"


# `unshare` flags for a new network namespace: root needs no user namespace for it.
UNSHARE_NET = ["--net"] if os.geteuid() == 0 else ["--net", "--map-root-user"]


def corral_exe() -> str:
    """The `corral` installed beside the Python running the tests: never whatever is on PATH."""
    beside = Path(sys.executable).parent / "corral"
    if not beside.exists():
        raise RuntimeError(
            f"no corral console script beside {sys.executable}: pip install -e . into this Python's venv"
        )
    return str(beside)


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, -1, "", f"{argv[0]} did not finish in {timeout}s")


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    """The line saying what went wrong: the last that mentions an error, else the last."""
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [f"exit status {done.returncode}"])[-1][:240]


USERNS = "allow unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1 (Debian) or kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu)"


def _bwrap() -> str | None:
    """A sandbox as the bubblewrap backend starts one: new user, pid, ipc, uts and net
    namespaces, and as root dropped to an unprivileged uid first (as the backend does)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bwrap is not installed (apt-get install bubblewrap)"
    setpriv = shutil.which("setpriv")
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"] if os.geteuid() == 0 and setpriv else []
    ns = ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup-try"]
    done = _run(
        [*drop, bwrap, *ns, "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
    )
    if done.returncode != 0:
        return f"bwrap cannot start a sandbox: {_last_line(done)} ({USERNS})"
    return None


def _docker() -> str | None:
    """A container of the local test image, started the way the docker backend starts them."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed (apt-get install docker.io)"
    if _run(["docker", "info"]).returncode != 0:
        return "dockerd does not answer `docker info` (start it: source .ci/services.sh && start_dockerd)"
    if _run(["docker", "image", "inspect", TEST_IMAGE]).returncode != 0:
        if not Path("/bin/busybox").exists():
            return f"the test image {TEST_IMAGE} is built from /bin/busybox, which is missing (apt-get install busybox-static)"
        built = _run(["bash", "-c", f"source {REPO}/.ci/services.sh && build_test_image"], timeout=180)
        if built.returncode != 0:
            return f"could not build the test image {TEST_IMAGE}: {_last_line(built)}"
    done = _run(["docker", "run", "--rm", "--network", "none", TEST_IMAGE, "true"], timeout=60)
    if done.returncode != 0:
        return f"dockerd answers but cannot start a container: {_last_line(done)} (dockerd needs writable cgroups; its log says more)"
    return None


def postgres_url() -> str:
    return os.environ.get("CORRAL_TEST_POSTGRES_URL", "postgresql://corral:corral@127.0.0.1:5432/corral_test")


def _postgres() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    try:
        psycopg.connect(postgres_url(), connect_timeout=3).close()
    except Exception as err:  # any failure means "no server to test against"; it is the reason
        why = " ".join(str(err).split())[:160]
        start = "apt-get install postgresql, then " if shutil.which("pg_ctlcluster") is None else ""
        return f"{postgres_url()} refuses a connection: {why} ({start}source .ci/services.sh && start_postgres, or set CORRAL_TEST_POSTGRES_URL)"
    return None


def _netns() -> str | None:
    """An empty network namespace, made and entered as tests/frontdoor/conftest.py's Netns does."""
    for tool, package in (("unshare", "util-linux"), ("nsenter", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH (apt-get install {package})"
    done = _run(["unshare", *UNSHARE_NET, "ip", "link", "set", "lo", "up"])
    if done.returncode != 0:
        return f"cannot make a network namespace: {_last_line(done)} (run as root, or {USERNS})"
    return None


def _git() -> str | None:
    if shutil.which("git") is None or not Path(GIT_HTTP_BACKEND).exists():
        return f"git or {GIT_HTTP_BACKEND} is missing (apt-get install git)"
    return None


def _chromium() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


def _npm_cli(name: str, package: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        if shutil.which(name) is None:
            npm = "" if shutil.which("npm") else "apt-get install nodejs npm, then "
            return f"`{name}` is not on PATH ({npm}npm install -g {package})"
        return None

    return probe


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    probe: Callable[[], str | None]  # None when usable, else why not and what to do about it


PARTS: dict[str, Part] = {
    p.name: p
    for p in [
        Part("bwrap", "bubblewrap that can start a sandbox", _bwrap),
        Part("docker", "a dockerd that can start containers", _docker),
        Part("postgres", "a PostgreSQL server that accepts a connection", _postgres),
        Part("netns", "an empty network namespace (unshare, nsenter, ip)", _netns),
        Part("git", "git and git-http-backend", _git),
        Part("chromium", "Chromium driven by playwright", _chromium),
        Part("claude", "the Claude Code CLI", _npm_cli("claude", NPM_CLAUDE)),
        Part("inspector", "the MCP Inspector CLI", _npm_cli("mcp-inspector", NPM_INSPECTOR)),
    ]
}


@functools.cache
def missing(name: str) -> str | None:
    """One line saying why part `name` cannot be used and what to do about it; None if it can. Probed once."""
    part = PARTS[name]
    why = part.probe()
    return None if why is None else f"needs {part.what}: {why}"
