"""Finding a bubblewrap sandbox's processes on the host, for the tests that kill them."""

from __future__ import annotations

import os
import time
from pathlib import Path

from corral.servers.sandbox.hostlayer import unmount_under


def bwrap_pids(sandbox_id: str, parent: int | None = None) -> list[int]:
    """Host pids of the outer bwrap processes running commands of `sandbox_id` (children of `parent` only, if given)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if argv[0].endswith(b"bwrap") and any(sandbox_id.encode() in a for a in argv) and parent in (None, ppid):
            pids.append(int(entry))
    return pids


def kill_sandboxes_under(root: Path) -> None:
    """End every live sandbox whose bwrap mounts something under `root` (the init and its holder), and unmount their layers."""
    for pid in bwrap_pids(str(root.name)):
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        for victim in [*map(int, children), pid]:
            try:
                os.kill(victim, 9)
            except ProcessLookupError:
                pass
    time.sleep(0.2)
    for sandbox in root.glob("sbx_*"):  # and their cgroups, where the server made them
        for group in Path("/sys/fs/cgroup").glob(f"*/corral/{sandbox.name}"):
            try:  # an init whose bwrap was killed is found only here
                for pid in (group / "cgroup.procs").read_text().split():
                    os.kill(int(pid), 9)
                time.sleep(0.1)
                group.rmdir()
            except OSError:
                pass
    # Their system layers: unmounted before the caller deletes `root` (never delete through a mount).
    unmount_under(root)


def host_pids(marker: bytes) -> list[int]:
    """Host pids whose command line contains `marker` (argv joined by NULs)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found
