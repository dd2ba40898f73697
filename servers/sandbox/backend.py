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

import base64
import builtins  # `Backend.list` shadows the type in the class body
import posixpath
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import Conflict, InvalidArgument, NotFound, PolicyDenied

from .checkpoints.manifest import Manifest
from .checkpoints.tree import BlobSink, BlobSource, Scan, StatCache
from .processes import ProcessInfo, ProcessOutput, Signal

__all__ = [
    "Backend",
    "Destroyed",
    "ExecOutcome",
    "ExecRequest",
    "ExecResult",
    "FileData",
    "FileEntry",
    "FileListing",
    "FileRead",
    "FileWritten",
    "iso",
    "ListedSandbox",
    "Listing",
    "SandboxInfo",
    "SandboxList",
    "SandboxRef",
    "SandboxSpec",
    "sha_state",
    "workspace_path",
]

WORKDIR = "/workspace"
# Files up to this size are hashed whole (the default largest file write_file replaces, so
# every file compare-and-swap can target has a hash); larger ones are not hashed at all:
# hashing is the one file operation whose cost a sandbox could make unbounded.
HASH_LIMIT = 64 << 20


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests and responses ------------------------------------------------------------


class SandboxSpec(_Model):
    """The recipe of a sandbox, fully resolved; built by `SandboxSettings.spec` (no defaults of its own)."""

    template: str | None
    cpus: float
    memory_mb: int
    disk_mb: int
    max_processes: int
    env: dict[str, str] = Field(default_factory=dict)
    network: Literal["none", "full"] = "none"
    ttl_s: int


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
    notice: str | None = Field(
        None, description="something the caller should know, e.g. background processes were stopped"
    )

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
    sha256: str | None = Field(description="sha256 of the whole file; None when it is larger than the hash limit")


class FileEntry(_Model):
    name: str = Field(description="path relative to the listed directory; bytes that are not UTF-8 show as U+FFFD")
    name_base64: str | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="the name's exact bytes (base64), only when they are not UTF-8",
    )
    type: Literal["file", "dir", "symlink", "other"]
    size: int

    @classmethod
    def of(cls, raw: bytes, type: Literal["file", "dir", "symlink", "other"], size: int) -> FileEntry:
        """An entry for a name as the file system holds it: bytes, any bytes but NUL and '/'."""
        try:
            return cls(name=raw.decode("utf-8"), type=type, size=size)
        except UnicodeDecodeError:
            return cls(
                name=raw.decode("utf-8", "replace"), name_base64=base64.b64encode(raw).decode(), type=type, size=size
            )


class Listing(_Model):
    entries: list[FileEntry]
    truncated: bool


# -- tool results (what MCP clients see; each tool's output schema) -----------------------


class SandboxInfo(_Model):
    sandbox_id: str
    backend: str
    isolation: str = Field(description="namespaces (bubblewrap), container (docker) or microvm (e2b)")
    limits: Literal["sandbox", "process"] = Field(
        description="sandbox: memory, processes and CPU are capped for all its processes together (a cgroup); process: per process"
    )
    state: Literal["running", "lost", "destroyed"]
    label: str | None
    network: Literal["none", "full"]
    created_at: str = Field(description="ISO 8601, UTC")
    expires_at: str = Field(description="ISO 8601, UTC: destroyed then, used or not")
    workdir: str = Field(description="where commands start and relative paths point")


class ListedSandbox(SandboxInfo):
    last_used_at: str = Field(description="ISO 8601, UTC: the last call that used it")


class SandboxList(_Model):
    sandboxes: list[ListedSandbox] = Field(description="live sandboxes, oldest first")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class ExecOutcome(ExecResult):
    sandbox_id: str


class FileRead(_Model):
    sandbox_id: str
    path: str
    content: str
    encoding: Literal["text", "base64"]
    size: int = Field(description="size of the whole file")
    sha256: str | None = Field(
        description="sha256 of the whole file (pass as write_file's if_sha256); null for a file larger than "
        "the largest write_file accepts: only such files are hashed, so a read costs at most that much"
    )
    offset: int
    length: int = Field(description="bytes returned")
    truncated: bool = Field(description="true when the file goes on past what was returned")


class FileWritten(_Model):
    sandbox_id: str
    path: str
    size: int
    sha256: str


class FileListing(_Model):
    sandbox_id: str
    path: str
    entries: list[FileEntry]
    truncated: bool = Field(description="true when max_entries cut the listing short")


class Destroyed(_Model):
    sandbox_id: str
    destroyed: bool
    already_destroyed: bool


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
    async def read(self, ref: SandboxRef, path: str, offset: int, limit: int, hash_limit: int = HASH_LIMIT) -> FileData:
        """`limit` bytes from `offset`, the file's size, and its sha256 if it is at most `hash_limit` bytes."""

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
            actual, exists = (await self.read(ref, path, 0, 0)).sha256, True
        except NotFound:
            actual, exists = None, False
        if actual != expected.lower():
            raise Conflict(f"{path} {sha_state(actual, exists=exists)}, not {expected}; nothing was written")

    async def close(self) -> None:  # noqa: B027 - optional hook: a backend holding no clients keeps this no-op
        """Release clients and connections (not sandboxes)."""

    # -- background processes (a backend without them says so) -------------------------

    async def start_process(self, ref: SandboxRef, request: ExecRequest, process_id: str) -> ProcessInfo:
        """Start `request.command` in the background and return at once (no timeout, output to disk)."""
        raise InvalidArgument(
            f"the {self.name} backend cannot run background processes",
            hint="run the command in the foreground (background=false), or use the bubblewrap or docker backend",
        )

    async def list_processes(self, ref: SandboxRef) -> builtins.list[ProcessInfo]:
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

    # -- checkpoints (a backend without them says so) -----------------------------------

    async def snapshot(self, ref: SandboxRef, sink: BlobSink, previous: StatCache | None, max_files: int) -> Scan:
        """The manifest of the sandbox's files (workspace, home, writable system layer); new content to `sink`."""
        raise InvalidArgument(
            f"the {self.name} backend cannot take checkpoints",
            hint="use the bubblewrap or docker backend for checkpoints, fork and restore",
        )

    async def restore_files(self, ref: SandboxRef, manifest: Manifest, source: BlobSource) -> StatCache:
        """Stop the sandbox's processes and make its files exactly `manifest`; returns the stat cache
        of what it wrote (so the next checkpoint reads nothing it restored)."""
        raise InvalidArgument(f"the {self.name} backend cannot restore checkpoints")


def iso(ts: float) -> str:
    """A time as tool results show it: ISO 8601, UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def sha_state(actual: str | None, *, exists: bool) -> str:
    """How a compare-and-swap target differs, for the `Conflict` message."""
    if not exists:
        return "does not exist"
    return f"has sha256 {actual}" if actual else f"is larger than {HASH_LIMIT} bytes (never hashed)"


def workspace_path(path: str | None, workdir: str = WORKDIR) -> str:
    """A tool's `path` as an absolute, normalised path inside the workspace, or an error.

    Lexical only: `..` and absolute paths outside `workdir` are refused here; symlinks that
    point out are refused by each backend where it resolves them.
    """
    if path is None or path in ("", "."):
        return workdir
    if "\0" in path:
        raise InvalidArgument("path contains a NUL byte")
    if not path.isascii():
        try:
            path.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate: JSON allows it, a file name cannot be it
            raise InvalidArgument("path is not valid Unicode (it holds a lone surrogate)") from err
    full = posixpath.normpath(path if path.startswith("/") else posixpath.join(workdir, path))
    if full.startswith("//"):
        full = "/" + full.lstrip("/")
    if full != workdir and not full.startswith(workdir + "/"):
        raise PolicyDenied(
            f"path {path!r} is outside the sandbox workspace {workdir}",
            hint=f"use a path relative to {workdir} (or absolute under it)",
        )
    return full
