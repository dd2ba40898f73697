"""Real `corral worker` processes on a test schema, and what the log says about who worked what."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from corral.servers.session import EventStore
from tests.harness.fake_anthropic import FakeAnthropic

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """One `corral worker` process (its own process group, stderr in a file)."""

    def __init__(
        self,
        url: str,
        name: str,
        tmp: Path,
        *,
        lease: float = 3.0,
        body: str = "tests.workers.bodies:scripted",
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.log_path = tmp / f"{name}.log"
        full_env = {**os.environ, "CORRAL_SESSION_STORE": url, "PYTHONPATH": str(ROOT), **(env or {})}
        full_env.pop("CORRAL_QUEUE_URL", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "corral.cli",
                    "worker",
                    "-v",
                    "--name",
                    name,
                    "--lease",
                    str(lease),
                    "--body",
                    body,
                    *extra,
                ],
                cwd=ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        self.restarted = False  # set by a test acting as the supervisor

    def signal(self, sig: int) -> float:
        os.kill(self.pid, sig)
        return time.time()

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGCONT)
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def wait_until(what: str, check: Callable[[], object], timeout: float = 60, every: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def steps(store: EventStore, sid: str) -> list[tuple[int, str, float]]:
    """(step index, writer, time written) of every work.step in log order."""
    return [(e.data["i"], e.data["worker"], e.created_at.timestamp()) for e in store.select(sid, types=["work.step"])]


def runs(writers: list[str]) -> list[str]:
    """The writers in turn: consecutive steps by one worker collapse into one run."""
    out: list[str] = []
    for w in writers:
        if not out or out[-1] != w:
            out.append(w)
    return out


def assert_worked_in_turns(store: EventStore, sid: str, n_steps: int) -> list[str]:
    """Every step once and in order, and no worker wrote again after another took over."""
    got = steps(store, sid)
    assert [i for i, _, _ in got] == list(range(n_steps)), got
    turns = runs([w for _, w, _ in got])
    assert len(turns) == len(set(turns)), f"session {sid} was worked by two workers at once: {turns}"
    assert store.get(sid).status == "idle"
    return turns


def harness_env(tmp: Path, fake: FakeAnthropic, name: str) -> dict[str, str]:
    """What a worker running the real harness needs: the fake API and the counting toolbox server."""
    (tmp / "toolbox").mkdir(exist_ok=True)
    return {
        **fake.env(),
        "CORRAL_HOME": str(tmp / f"home-{name}"),
        "CORRAL_SERVERS": "toolbox",
        "CORRAL_EXTRA_SERVERS": f'{{"toolbox": "{sys.executable} -m tests.harness.toolbox"}}',
        "CORRAL_RETRY_BASE_S": "0.05",
        "TOOLBOX_DIR": str(tmp / "toolbox"),
    }
