"""The seam between the sandbox server and where code runs.

A backend is a small abstract class of async methods over pydantic models; one file per
backend (`bubblewrap.py`, `docker.py`, `e2b.py`). The backend is chosen by a tagged config
(`config.py`); `server.make_backend` imports a backend's module, and so its heavy SDK,
only when that backend is used. This module knows no implementation.

Backends raise Corral errors (`SandboxLost` when the sandbox vanished, `NotFound`,
`PolicyDenied` for paths outside the workspace, ...), translating vendor errors at their
own boundary.
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import Conflict, InvalidArgument, NotFound, PolicyDenied

from .processes import ProcessInfo, ProcessOutput, Signal

__all__ = [
    "Backend",
    "ExecRequest",
    "ExecResult",
    "FileData",
    "FileEntry",
    "Listing",
    "SandboxRef",
    "SandboxSpec",
    "workspace_path",
]

WORKDIR = "/workspace"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests and responses ------------------------------------------------------------


class SandboxSpec(_Model):
    """The recipe of a sandbox, fully resolved (defaults applied); a lost one is re-made from it."""

    template: str | None = None
    cpus: float = 1.0
    memory_mb: int = 1024
    disk_mb: int = 1024
    max_processes: int = 256
    env: dict[str, str] = Field(default_factory=dict)
    network: Literal["none", "full"] = "none"
    ttl_s: int = 24 * 3600


class SandboxRef(_Model):
    """What a backend needs to find a sandbox again, also after a server restart."""

    id: str
    spec: SandboxSpec
    data: dict[str, Any] = Field(default_factory=dict, description="backend-specific: container id, e2b sandbox id...")


class ExecRequest(_Model):
    command: str
    timeout_s: float = 60.0
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    stdin: bytes | None = None
    output_limit: int = 64 * 1024


class ExecResult(_Model):
    exit_code: int | None
    stdout: str
    stderr: str
    duration_ms: int
    timed_out: bool
    stdout_bytes: int
    stderr_bytes: int
    stdout_truncated: bool
    stderr_truncated: bool
    notice: str | None = Field(None, description="something the caller should know, e.g. background processes were stopped")

    @classmethod
    def of(cls, done: Any) -> ExecResult:
        """The result of a finished `process.run_bounded` call (a `Completed`)."""
        return cls(
            exit_code=None if done.timed_out else done.returncode,
            stdout=done.stdout.text(),
            stderr=done.stderr.text(),
            duration_ms=done.duration_ms,
            timed_out=done.timed_out,
            stdout_bytes=done.stdout.total,
            stderr_bytes=done.stderr.total,
            stdout_truncated=done.stdout.truncated,
            stderr_truncated=done.stderr.truncated,
        )


class FileData(_Model):
    data: bytes
    size: int = Field(description="size of the whole file")
    sha256: str = Field(description="sha256 of the whole file")


class FileEntry(_Model):
    name: str = Field(description="path relative to the listed directory")
    type: Literal["file", "dir", "symlink", "other"]
    size: int


class Listing(_Model):
    entries: list[FileEntry]
    truncated: bool


# -- the abstract backend --------------------------------------------------------------


class Backend(ABC):
    """Where sandboxes live. Paths given to file methods are already `workspace_path`-checked."""

    name: str
    isolation: str
    workdir: str = WORKDIR
    # Whether memory/process/CPU caps hold for the sandbox as a whole, or only per process.
    limits_scope: Literal["sandbox", "process"] = "sandbox"

    @abstractmethod
    async def provision(self, sandbox_id: str, spec: SandboxSpec) -> SandboxRef: ...

    @abstractmethod
    async def execute(self, ref: SandboxRef, request: ExecRequest) -> ExecResult: ...

    @abstractmethod
    async def read(self, ref: SandboxRef, path: str, offset: int, limit: int) -> FileData: ...

    @abstractmethod
    async def write(
        self, ref: SandboxRef, path: str, data: bytes, mode: int | None, if_sha256: str | None = None
    ) -> None:
        """Replace `path`; with `if_sha256`, only if the current content has that hash (else `Conflict`)."""

    @abstractmethod
    async def list(self, ref: SandboxRef, path: str, depth: int, max_entries: int) -> Listing: ...

    @abstractmethod
    async def destroy(self, ref: SandboxRef, keep_workspace: bool = False) -> None:
        """Remove everything the sandbox holds; a sandbox already gone is not an error."""

    @abstractmethod
    async def status(self, ref: SandboxRef) -> Literal["running", "lost"]: ...

    async def check_sha256(self, ref: SandboxRef, path: str, expected: str) -> None:
        """Compare-and-swap for backends without an atomic one (the server serialises writes per sandbox)."""
        try:
            actual: str | None = (await self.read(ref, path, 0, 0)).sha256
        except NotFound:
            actual = None
        if actual != expected.lower():
            state = "does not exist" if actual is None else f"has sha256 {actual}"
            raise Conflict(f"{path} {state}, not {expected}; nothing was written")

    async def close(self) -> None:
        """Release clients and connections (not sandboxes)."""

    # -- background processes (a backend without them says so) -------------------------

    async def start_process(self, ref: SandboxRef, request: ExecRequest, process_id: str) -> ProcessInfo:
        """Start `request.command` in the background and return at once (no timeout, output to disk)."""
        raise InvalidArgument(
            f"the {self.name} backend cannot run background processes",
            hint="run the command in the foreground (background=false), or use the bubblewrap or docker backend",
        )

    async def list_processes(self, ref: SandboxRef) -> list[ProcessInfo]:
        return []

    async def process_output(
        self, ref: SandboxRef, process_id: str, offset: int, stderr_offset: int, limit: int
    ) -> ProcessOutput:
        raise NotFound(f"no process {process_id!r} in sandbox {ref.id}", hint="call processes to list them")

    async def kill_process(self, ref: SandboxRef, process_id: str, signal: Signal) -> ProcessInfo:
        raise NotFound(f"no process {process_id!r} in sandbox {ref.id}", hint="call processes to list them")

    async def active(self, ref: SandboxRef) -> bool:
        """Whether the sandbox is working on its own (a background process runs): not idle."""
        return False


def workspace_path(path: str | None, workdir: str = WORKDIR) -> str:
    """A tool's `path` as an absolute, normalised path inside the workspace, or an error.

    Lexical only: `..` and absolute paths outside `workdir` are refused here; symlinks that
    point out are refused by each backend where it resolves them.
    """
    if path is None or path in ("", "."):
        return workdir
    if "\0" in path:
        raise InvalidArgument("path contains a NUL byte")
    full = posixpath.normpath(path if path.startswith("/") else posixpath.join(workdir, path))
    if full.startswith("//"):
        full = "/" + full.lstrip("/")
    if full != workdir and not full.startswith(workdir + "/"):
        raise PolicyDenied(
            f"path {path!r} is outside the sandbox workspace {workdir}",
            hint=f"use a path relative to {workdir} (or absolute under it)",
        )
    return full
