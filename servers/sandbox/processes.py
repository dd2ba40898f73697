"""Background processes: their result models, ids, and their bookkeeping on disk.

A background process of a bubblewrap sandbox keeps `<sandbox>/procs/<process_id>/`
(host side, never visible inside): `meta.json` (the command, its pid and start time, how
it ended) and `stdout`/`stderr`, which the process writes through file descriptors the
server opened. The files outlive a server restart, so a restarted server still answers
`processes` and `process_output`.

Output is bounded on disk: each stream keeps its last `KEEP_BYTES` (older bytes are
punched out of the file, which keeps its length, so totals stay exact), and no stream can
grow past the sandbox's disk cap (RLIMIT_FSIZE ends a writer there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import secrets
import signal as signals
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import InvalidArgument, NotFound

__all__ = [
    "KEEP_BYTES",
    "SIGNALS",
    "Meta",
    "ProcessInfo",
    "ProcessOutput",
    "new_process_id",
    "read_output",
    "sandbox_of",
]

KEEP_BYTES = 1 << 20
SIGNALS = ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT")
Signal = Literal["TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT"]
_ID = re.compile(r"^proc_([0-9a-f]{16})_([0-9a-f]{8})$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProcessInfo(_Model):
    process_id: str
    sandbox_id: str
    command: str
    state: Literal["running", "exited", "killed"] = Field(description="killed: ended by a signal")
    exit_code: int | None = Field(None, description="the exit status; for a signal, 128 + its number")
    signal: str | None = Field(None, description="the signal that ended it, e.g. TERM")
    started_at: str
    ended_at: str | None = None
    cpu_s: float = Field(description="user + system CPU seconds so far")
    note: str | None = Field(None, description="e.g. why the exit code is unknown")


class ProcessOutput(_Model):
    process_id: str
    running: bool
    exit_code: int | None
    stdout: str
    stderr: str
    offset: int = Field(description="where this stdout slice starts")
    stderr_offset: int = Field(description="where this stderr slice starts")
    next_offset: int = Field(description="pass as offset to read on from here")
    next_stderr_offset: int = Field(description="pass as stderr_offset to read on from here")
    stdout_bytes: int = Field(description="everything written to stdout so far")
    stderr_bytes: int = Field(description="everything written to stderr so far")
    dropped_bytes: int = Field(0, description="bytes before the kept window that were asked for but are gone")


class ProcessList(_Model):
    sandbox_id: str
    processes: list[ProcessInfo]


class Meta(_Model):
    """What `meta.json` holds."""

    process_id: str
    command: str
    started_at: float
    holder: dict = Field(default_factory=dict, description="backend-specific: pids and start times")
    exit_code: int | None = None
    signal: str | None = None
    ended_at: float | None = None
    cpu_s: float = 0.0
    note: str | None = None
    dropped: dict[str, int] = Field(default_factory=lambda: {"stdout": 0, "stderr": 0})

    def save(self, directory: Path) -> None:
        tmp = directory / "meta.tmp"
        tmp.write_text(self.model_dump_json())
        tmp.replace(directory / "meta.json")

    @classmethod
    def load(cls, directory: Path) -> Meta:
        return cls.model_validate_json((directory / "meta.json").read_text())

    def ended(self, status: int, cpu_s: float) -> None:
        """Record a `wait` status."""
        self.ended_at = datetime.now(UTC).timestamp()
        self.cpu_s = cpu_s
        if os.WIFSIGNALED(status):
            self.signal = signals.Signals(os.WTERMSIG(status)).name.removeprefix("SIG")
            self.exit_code = 128 + os.WTERMSIG(status)
        elif os.WIFEXITED(status):
            code = os.WEXITSTATUS(status)
            # nsenter/setsid report a signal death of their child as 128+N only when they cannot
            # re-raise it; a shell reports 128+N too. Keep the number; name the signal if plain.
            self.exit_code = code

    def info(self, sandbox_id: str, running: bool, cpu_s: float | None = None) -> ProcessInfo:
        if running:
            state = "running"
        else:
            state = "killed" if self.signal else "exited"
        return ProcessInfo(
            process_id=self.process_id,
            sandbox_id=sandbox_id,
            command=self.command,
            state=state,
            exit_code=None if running else self.exit_code,
            signal=None if running else self.signal,
            started_at=_iso(self.started_at),
            ended_at=_iso(self.ended_at) if self.ended_at and not running else None,
            cpu_s=round(cpu_s if cpu_s is not None else self.cpu_s, 3),
            note=None if running else self.note,
        )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_process_id(sandbox_id: str) -> str:
    """`proc_<the sandbox's hex>_<random>`: the id says whose it is, so no table maps it."""
    return f"proc_{sandbox_id.removeprefix('sbx_')}_{secrets.token_hex(4)}"


def sandbox_of(process_id: str) -> str:
    match = _ID.match(process_id)
    if match is None:
        raise NotFound(
            f"no process {process_id!r}",
            hint="call processes to list the background processes",
        )
    return f"sbx_{match.group(1)}"


# -- output files ----------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def trim(path: Path, dropped: int, keep: int = KEEP_BYTES) -> int:
    """Free all but the last `keep` bytes of `path` on disk (its length stays); returns the new
    count of dropped leading bytes. Filesystems without hole punching keep everything."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return dropped
    cut = (size - keep) // 4096 * 4096
    if cut <= dropped or size - dropped < keep + keep // 2:  # not worth a syscall yet
        return dropped
    fd = os.open(path, os.O_WRONLY)
    try:
        rc = _libc.fallocate(
            fd,
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
            ctypes.c_long(0),
            ctypes.c_long(cut),
        )
    finally:
        os.close(fd)
    return cut if rc == 0 else dropped


def read_output(
    meta: Meta,
    directory: Path,
    running: bool,
    offset: int,
    stderr_offset: int,
    limit: int,
) -> ProcessOutput:
    """The slices of stdout and stderr from the offsets; an offset past what was written is an error."""
    slices: dict[str, tuple[str, int, int, int]] = {}
    lost = 0
    for stream, start in (("stdout", offset), ("stderr", stderr_offset)):
        path = directory / stream
        meta.dropped[stream] = trim(path, meta.dropped.get(stream, 0))
        total = path.stat().st_size if path.exists() else 0
        if start > total:
            raise InvalidArgument(
                f"{'offset' if stream == 'stdout' else 'stderr_offset'} {start} is past the end of {stream} ({total} bytes so far)",
                hint=f"pass an offset between 0 and {total}",
            )
        begin = max(start, meta.dropped[stream])
        lost += begin - start
        with open(path, "rb") if path.exists() else open(os.devnull, "rb") as f:
            f.seek(begin)
            data = f.read(limit)
        slices[stream] = (
            data.decode("utf-8", "replace"),
            begin,
            begin + len(data),
            total,
        )
    out, err = slices["stdout"], slices["stderr"]
    return ProcessOutput(
        process_id=meta.process_id,
        running=running,
        exit_code=None if running else meta.exit_code,
        stdout=out[0],
        stderr=err[0],
        offset=out[1],
        stderr_offset=err[1],
        next_offset=out[2],
        next_stderr_offset=err[2],
        stdout_bytes=out[3],
        stderr_bytes=err[3],
        dropped_bytes=lost,
    )
