"""Limits for a whole sandbox: one cgroup per sandbox, where the server may make them.

With cgroup v1 controllers writable (the server is root), each sandbox gets
`<controller>/corral/<id>` for memory, pids and cpu: the caps hold for all of its processes
together (ten background memory hogs cannot sum past `memory_mb`). Every process of the
sandbox is started *inside* it: the command line begins with a tiny `sh` that writes its
own pid into each `cgroup.procs` and then execs the rest, so nothing runs a moment outside.

Elsewhere (no root, cgroup v2 without delegation) `detect()` returns None and the per-process
rlimits of `bubblewrap.py` are the only limits; `scope` says which applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from .backend import SandboxSpec

__all__ = ["Cgroups", "detect"]

V1 = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu")
log = logging.getLogger("corral.sandbox")
CFS_PERIOD_US = 100_000


class Cgroups:
    """cgroup v1: `<mount>/<controller>/<parent>/<sandbox id>`."""

    scope = "sandbox"

    def __init__(self, base: Path = V1, parent: str = "corral") -> None:
        self.dirs = {c: base / c / parent for c in CONTROLLERS}

    def path(self, controller: str, sandbox_id: str) -> Path:
        return self.dirs[controller] / sandbox_id

    def create(self, sandbox_id: str, spec: SandboxSpec) -> None:
        """Make (or re-make, idempotently) the sandbox's groups with the spec's caps."""
        memory = self.path("memory", sandbox_id)
        for controller in CONTROLLERS:
            self.path(controller, sandbox_id).mkdir(parents=True, exist_ok=True)
        _write(memory / "memory.limit_in_bytes", spec.memory_mb << 20)
        with contextlib.suppress(OSError):  # swap accounting may be off: then there is no swap to escape to
            _write(memory / "memory.memsw.limit_in_bytes", spec.memory_mb << 20)
        # Each command also has one host-side holder (its nsenter) in the group: room for those.
        _write(self.path("pids", sandbox_id) / "pids.max", 2 * spec.max_processes + 8)
        cpu = self.path("cpu", sandbox_id)
        _write(cpu / "cpu.cfs_period_us", CFS_PERIOD_US)
        _write(cpu / "cpu.cfs_quota_us", max(1000, int(spec.cpus * CFS_PERIOD_US)))

    def procs_files(self, sandbox_id: str) -> list[Path]:
        """Where a process writes its pid to join the sandbox's groups."""
        return [self.path(c, sandbox_id) / "cgroup.procs" for c in CONTROLLERS]

    def enter_argv(self, sandbox_id: str, *, init: bool = False) -> list[str]:
        """A prefix that puts what follows into the sandbox's groups before it runs; for the
        `init`, also out of the OOM killer's reach (it is tiny; losing it loses the sandbox)."""
        joins = " && ".join(f'echo $$ > "{self.path(c, sandbox_id)}/cgroup.procs"' for c in CONTROLLERS)
        spare = "{ echo -1000 > /proc/self/oom_score_adj; } 2>/dev/null; " if init else ""  # where allowed
        return ["/bin/sh", "-c", f'{joins} && {spare}exec "$@"', "sh"]

    async def remove(self, sandbox_id: str, timeout_s: float = 5.0) -> bool:
        """Kill whatever is still in the sandbox's groups, then remove them; False if the kernel
        kept one busy past `timeout_s` (left for the operator, logged)."""
        deadline = time.monotonic() + timeout_s
        for controller in CONTROLLERS:
            path = self.path(controller, sandbox_id)
            while path.exists():
                _kill_members(path)
                try:
                    path.rmdir()
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        log.warning("cgroup %s stays busy; not removed", path)
                        return False
                    await asyncio.sleep(0.01)
        return True

    def memory_peak(self, sandbox_id: str) -> int:
        return int((self.path("memory", sandbox_id) / "memory.max_usage_in_bytes").read_text())


def _kill_members(path: Path) -> None:
    with contextlib.suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _write(path: Path, value: int) -> None:
    path.write_text(f"{value}\n")


def detect(base: Path = V1) -> Cgroups | None:
    """Per-sandbox cgroups if this server can make them (root, cgroup v1 controllers mounted)."""
    if os.geteuid() != 0 or not all((base / c / "cgroup.procs").exists() for c in CONTROLLERS):
        return None
    groups = Cgroups(base)
    try:
        for directory in groups.dirs.values():
            directory.mkdir(exist_ok=True)
    except OSError:
        return None
    return groups
