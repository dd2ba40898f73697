"""The machinery of a live bubblewrap sandbox: an init that holds its namespaces, and the
way into them.

A live sandbox is one `bwrap` started once (user, pid, mount, ipc, uts, cgroup and, unless
`network: full`, net namespaces) whose command is a tiny init: a `sh` loop that is PID 1
inside, so it reaps every orphan (its `wait` reaps any child) and ignores the signals a
sandbox can send it (the kernel never delivers SIGKILL/SIGSTOP to a namespace's init from
inside). It lives until `destroy`, the reaper, or the sandbox's TTL (it exits by itself
then: no sandbox outlives its TTL even if the server never comes back).

Each command *joins* those namespaces with `nsenter` (about a third of the cost of a new
`bwrap`) and drops every capability with `setpriv` before it runs, so it is exactly as
unprivileged as a command bwrap started: uid 0 of a user namespace whose uid 0 is the
sandbox's unprivileged host uid.

A process is named by pid *and* start time (`Pid`), so a restarted server re-adopts an
init it did not start, and a recycled pid is never mistaken for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict

from pydantic import BaseModel

from corral.errors import Unavailable

__all__ = [
    "INIT_SCRIPT",
    "Init",
    "Pid",
    "PopenUser",
    "enter_argv",
    "kill_tree",
    "start_init",
    "watch_exit",
]

# PID 1 of a sandbox. `$1` is the sandbox's end of life (epoch seconds); `sleep & wait` so that
# `wait` (and with it the reaping of orphans) is what the loop blocks in.
INIT_SCRIPT = (
    'trap "" HUP INT TERM QUIT USR1 USR2 PIPE ALRM; end=$1; '
    'while now=$(date +%s); [ "$now" -lt "$end" ]; do sleep $((end - now)) & wait; done'
)
INIT_SHELL = "/bin/sh"


class Pid(BaseModel):
    """A host process, named so that a recycled pid never matches: pid plus kernel start time."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Pid | None:
        start = _start_time(pid)
        return None if start is None else cls(pid=pid, start=start)

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and of the children it has reaped."""
        fields = _stat_fields(self.pid)
        if fields is None:
            return 0.0
        ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        return ticks / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3 onwards), or None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw.rsplit(b")", 1)[1].decode().split()
    return None if fields[0] in ("Z", "X") else fields


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])  # field 22: starttime


class Init(BaseModel):
    """A live sandbox's holders: the outer `bwrap` (host side) and PID 1 inside (`init`)."""

    outer: Pid
    init: Pid
    started_at: float

    def alive(self) -> bool:
        # Either one dying means the sandbox is broken: the outer bwrap is what the host sees
        # as "the sandbox" (and what an operator kills), the init holds the namespaces.
        return self.outer.alive() and self.init.alive()

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Init | None:
        try:
            return cls.model_validate_json(path.read_text())
        except (OSError, ValueError):
            return None


class PopenUser(TypedDict, total=False):
    """The `subprocess.Popen` arguments that set who bwrap runs as and with what environment."""

    env: dict[str, str]
    user: int
    group: int
    extra_groups: list[int]


async def start_init(
    argv: Sequence[str],
    *,
    log: Path,
    preexec_user: PopenUser,
    ready_timeout_s: float = 10.0,
) -> tuple[Init, subprocess.Popen]:
    """Start `argv` (a `bwrap ... --info-fd N --as-pid-1 -- sh -c INIT` with `{info_fd}` for N)
    and wait until its init runs; bwrap's own complaints go to `log`."""
    read_end, write_end = os.pipe()
    argv = [a.replace("{info_fd}", str(write_end)) for a in argv]
    # A plain Popen (vfork, about a millisecond), reaped by `watch_exit`: asyncio's would park a
    # thread on every sandbox for its whole life.
    with open(log, "wb") as err:  # a local file, created empty
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                pass_fds=(write_end,),
                start_new_session=True,  # outlives this server: not in its process group
                **preexec_user,
            )
        finally:
            os.close(write_end)
    try:
        info = await asyncio.to_thread(_read_all, read_end)
    finally:
        os.close(read_end)
    try:
        child = int(json.loads(info)["child-pid"])
    except (ValueError, KeyError, TypeError):
        proc.wait()
        raise Unavailable(
            f"could not start the sandbox: {log.read_text(errors='replace').strip()}",
            hint="check the server log and settings",
        ) from None
    outer, init = Pid.of(proc.pid), None
    deadline = time.monotonic() + ready_timeout_s
    # The info arrives before bwrap's child has built its mounts: join only once it is the init.
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _cmdline0(child) == INIT_SHELL.encode():
            init = Pid.of(child)
            break
        await asyncio.sleep(0.001)
    if outer is None or init is None:
        kill_tree([p for p in (Pid.of(child), outer) if p])
        proc.wait()
        raise Unavailable(
            f"could not start the sandbox: {log.read_text(errors='replace').strip() or 'its init did not start'}"
        )
    return Init(outer=outer, init=init, started_at=time.time()), proc


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _cmdline0(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return None


def enter_argv(
    nsenter: str,
    init_pid: int,
    cwd: str,
    *,
    join_net: bool = True,
    as_owner: bool = False,
) -> list[str]:
    """`nsenter` into every namespace of the sandbox whose init is `init_pid`, with its root and
    `cwd`; what follows must drop capabilities (`drop_caps`).

    Root becomes the sandbox's uid 0 (nsenter's setuid/setgroups); a server that is not root
    owns the namespace, is already its uid 0, and may not call setgroups there (bwrap denies
    it): `as_owner` keeps its credentials as they are."""
    flags = ["-U", "-m", "-p", "-i", "-u", "-C"] + (["-n"] if join_net else [])
    keep = ["--preserve-credentials"] if as_owner else []
    return [nsenter, *keep, "-t", str(init_pid), *flags, "-r", f"-W{cwd}", "--"]


def drop_caps(setpriv: str) -> list[str]:
    """Joining a user namespace grants every capability in it: give them all up, for good."""
    return [
        setpriv,
        "--no-new-privs",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--",
    ]


def kill_tree(pids: Sequence[Pid], sig: int = signal.SIGKILL) -> None:
    """Signal the processes that are still the ones we mean (killing a namespace's init kills all in it)."""
    for p in pids:
        if p.alive():
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass


async def wait_gone(pids: Sequence[Pid], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(p.alive() for p in pids):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def watch_exit(proc: subprocess.Popen, done: Callable[[int, float], object]) -> Callable[[], None]:
    """Reap `proc` when it exits, without a thread: `done(wait_status, cpu_seconds)` runs in the loop.

    `os.wait4`'s rusage counts the children the process reaped: the CPU of what it ran.
    Returns `reap_now()`, for a caller that sees the process gone before the loop noticed."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(proc.pid)
    reaped = False

    def ready() -> None:
        nonlocal reaped
        if reaped:
            return
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            status, usage = -1, None
        if usage is not None and pid == 0:  # not exited yet (WNOHANG)
            return
        reaped = True
        loop.remove_reader(pidfd)
        os.close(pidfd)
        proc.returncode = os.waitstatus_to_exitcode(status) if usage is not None else -1
        done(status if usage is not None else -1, (usage.ru_utime + usage.ru_stime) if usage else 0.0)

    loop.add_reader(pidfd, ready)
    return ready
