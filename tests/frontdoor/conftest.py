"""Plumbing for the front-door tests: a real `corral up` process, a private network namespace.

- `corral_env`: an environment with its own HOME and CORRAL_HOME (nothing touches the
  user's files) and none of the caller's CORRAL_* settings.
- `start_up(env, port, prefix)`: `corral up` as a subprocess; waits for its banner.
- `netns`: a network namespace with only `lo` up. Clients that may phone home (Claude
  Code) run inside it, so no packet of theirs can leave the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until
from tests.parts import UNSHARE_NET, corral_exe

READY = "Press Ctrl-C to stop."
# The console script beside this Python, never one found on PATH (the test command puts none there).
CORRAL = corral_exe()


def make_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "DBUS_", "ANTHROPIC_", "XDG_"))}
    home = root / "home"
    home.mkdir()
    env.update(HOME=str(home), CORRAL_HOME=str(home / "corral"), PYTHONUNBUFFERED="1")
    # Claude Code: no auto-update, telemetry or other traffic of its own.
    env.update(
        DISABLE_AUTOUPDATER="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
    )
    return env


@pytest.fixture
def corral_env(tmp_path: Path) -> dict[str, str]:
    return make_env(tmp_path)


@dataclass
class UpProcess:
    proc: subprocess.Popen[str]
    port: int
    env: dict[str, str]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(READY):
                self.ready.set()
        self.ready.set()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"corral up did not stop within {timeout}s of {signal.Signals(sig).name}") from None


def start_up(env: dict[str, str], port: int, prefix: list[str] | None = None, timeout: float = 60) -> UpProcess:
    proc = subprocess.Popen(
        [*(prefix or []), CORRAL, "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    up = UpProcess(proc, port, env)
    threading.Thread(target=up._pump, daemon=True).start()
    if not up.ready.wait(timeout) or proc.poll() is not None:
        proc.kill()
        proc.wait(5)
        raise AssertionError(f"corral up did not come up:\n{up.output}")
    return up


@pytest.fixture(scope="session")
def up(tmp_path_factory: pytest.TempPathFactory, needs_bwrap) -> Iterator[UpProcess]:
    """One `corral up` shared by the tests that only talk to it (each start costs seconds)."""
    env = {**make_env(tmp_path_factory.mktemp("up")), "CORRAL_SANDBOX_PROGRESS_INTERVAL_S": "0.3"}  # progress test
    process = start_up(env, free_port())
    yield process
    assert process.stop() == 0


def token_of(env: dict[str, str]) -> str:
    return (Path(env["CORRAL_HOME"]) / "token").read_text().strip()


class Netns:
    """A process holding a fresh network namespace; `prefix` runs a command inside it."""

    def __init__(self) -> None:
        self.root = os.geteuid() == 0
        self.holder = subprocess.Popen(["unshare", *UNSHARE_NET, "sleep", "3600"], stdin=subprocess.DEVNULL)
        ours = os.readlink("/proc/self/ns/net")
        wait_until(
            lambda: os.readlink(f"/proc/{self.holder.pid}/ns/net") != ours,
            "unshare to make the network namespace",
            seconds=10,
        )
        subprocess.run([*self.prefix, "ip", "link", "set", "lo", "up"], check=True, timeout=10)

    @property
    def prefix(self) -> list[str]:
        user = [] if self.root else ["--user", "--preserve-credentials"]
        return ["nsenter", "-t", str(self.holder.pid), *user, "--net"]

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(5)


@pytest.fixture
def netns(needs_netns) -> Iterator[Netns]:
    ns = Netns()
    yield ns
    ns.close()


def run(cmd: list[str], env: dict[str, str], timeout: float = 90, **kw) -> subprocess.CompletedProcess[str]:
    """A command with a hard timeout; its output goes in the assertion message when it fails."""
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False, **kw
    )


def corral(
    *args: str, env: dict[str, str], timeout: float = 60, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run([*(prefix or []), CORRAL, *args], env, timeout)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """Assert the command failed with exactly one line on stderr and no traceback; return it."""
    assert done.returncode != 0, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{done.stderr}"
    return lines[0]
