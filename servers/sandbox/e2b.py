"""The e2b backend: a Firecracker microVM per sandbox through the `e2b` SDK's `AsyncSandbox`.

This module (and so the SDK) is imported only when `CORRAL_SANDBOX_BACKEND=e2b`. SDK
errors become Corral errors here, at one boundary. The VM is the sandbox: path checks are
lexical (`workspace_path`), there is no host behind a symlink to protect.
"""

from __future__ import annotations

import hashlib
import posixpath
import secrets
import shlex
import time
from typing import Any, Literal

from e2b import (
    AsyncSandbox,
    CommandExitException,
    FileType,
    NotFoundException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxUnreachableException,
    TimeoutException,
)

from corral.errors import NotFound, SandboxLost, Unavailable

from .backend import (
    HASH_LIMIT,
    Backend,
    ExecRequest,
    ExecResult,
    FileData,
    FileEntry,
    Listing,
    SandboxRef,
    SandboxSpec,
)
from .config import E2BConfig
from .process import OutputCap

__all__ = ["E2BBackend"]

# The VM itself is gone or unreachable: the sandbox is lost, whatever the call was.
_VM_GONE = (SandboxNotFoundException, SandboxNotRunningException, SandboxUnreachableException)
_KINDS = {FileType.FILE: "file", FileType.DIR: "dir", getattr(FileType, "SYMLINK", None): "symlink"}


class E2BBackend(Backend):
    name = "e2b"
    isolation = "microvm"
    workdir = "/home/user"

    def __init__(self, config: E2BConfig, sandbox_cls: Any = None) -> None:
        """`sandbox_cls` stands in for `AsyncSandbox` (tests pass a fake honouring its interface)."""
        self.config = config
        self.cls = sandbox_cls or AsyncSandbox
        self._live: dict[str, Any] = {}  # our id -> connected AsyncSandbox

    def _opts(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"request_timeout": self.config.request_timeout_s}
        if self.config.api_key:
            opts["api_key"] = self.config.api_key
        return opts

    async def _sandbox(self, ref: SandboxRef) -> Any:
        """The connected VM; reconnects by id after a server restart."""
        if (sbx := self._live.get(ref.id)) is not None:
            return sbx
        try:
            sbx = await self.cls.connect(ref.data["e2b_id"], **self._opts())
        except (NotFoundException, *_VM_GONE) as err:
            raise SandboxLost(f"sandbox {ref.id} is gone: e2b no longer has VM {ref.data['e2b_id']}") from err
        except SandboxException as err:
            raise Unavailable(f"e2b: {err}") from err
        self._live[ref.id] = sbx
        return sbx

    def _lost(self, ref: SandboxRef, err: Exception) -> SandboxLost:
        self._live.pop(ref.id, None)
        return SandboxLost(f"sandbox {ref.id} is gone: {err}")

    # -- lifecycle -----------------------------------------------------------------------

    async def provision(self, sandbox_id: str, spec: SandboxSpec) -> SandboxRef:
        try:
            sbx = await self.cls.create(
                template=spec.template or self.config.template,
                timeout=spec.ttl_s,
                metadata={"corral_sandbox": sandbox_id},
                envs=spec.env or None,
                allow_internet_access=spec.network == "full",
                **self._opts(),
            )
        except SandboxException as err:
            raise Unavailable(f"e2b could not create a sandbox: {err}") from err
        self._live[sandbox_id] = sbx
        return SandboxRef(id=sandbox_id, spec=spec, data={"e2b_id": sbx.sandbox_id})

    async def destroy(self, ref: SandboxRef, keep_workspace: bool = False) -> None:
        self._live.pop(ref.id, None)
        try:
            await self.cls.kill(ref.data["e2b_id"], **self._opts())
        except NotFoundException:
            pass  # already gone: destroy is idempotent

    async def status(self, ref: SandboxRef) -> Literal["running", "lost"]:
        try:
            return "running" if await (await self._sandbox(ref)).is_running() else "lost"
        except SandboxLost:
            return "lost"

    # -- execute -------------------------------------------------------------------------

    async def execute(self, ref: SandboxRef, request: ExecRequest) -> ExecResult:
        sbx = await self._sandbox(ref)
        out, err = OutputCap(request.output_limit), OutputCap(request.output_limit)
        command = request.command
        if request.stdin is not None:  # the SDK's stdin needs a background handle; a file is simpler
            path = f"/tmp/.corral-stdin-{secrets.token_hex(6)}"
            await self._call(ref, sbx.files.write(path, request.stdin))
            command = f"bash -c {shlex.quote(command)} < {path}; rc=$?; rm -f {path}; exit $rc"
        cwd = request.cwd if request.cwd and request.cwd.startswith("/") else posixpath.join(self.workdir, request.cwd or "")
        start = time.monotonic()
        exit_code: int | None
        timed_out = False
        try:
            result = await sbx.commands.run(
                command,
                envs=request.env or None,
                cwd=cwd,
                timeout=request.timeout_s,
                on_stdout=lambda s: out.feed(s.encode()),
                on_stderr=lambda s: err.feed(s.encode()),
            )
            exit_code = result.exit_code
        except CommandExitException as exc:  # non-zero exit is data, not an error
            exit_code = exc.exit_code
        except _VM_GONE as exc:  # (some of these are TimeoutExceptions: caught first)
            raise self._lost(ref, exc) from exc
        except TimeoutException:
            exit_code, timed_out = None, True
        except SandboxException as exc:
            raise Unavailable(f"e2b: {exc}") from exc
        return ExecResult(
            exit_code=exit_code,
            stdout=out.text(),
            stderr=err.text(),
            duration_ms=int((time.monotonic() - start) * 1000),
            timed_out=timed_out,
            stdout_bytes=out.total,
            stderr_bytes=err.total,
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
        )

    async def _call(self, ref: SandboxRef, work: Any, path: str = "") -> Any:
        """One SDK file call, its errors translated."""
        try:
            return await work
        except _VM_GONE as exc:
            raise self._lost(ref, exc) from exc
        except NotFoundException as exc:
            raise NotFound(f"no such file or directory: {path}") from exc
        except SandboxException as exc:
            raise Unavailable(f"e2b: {exc}") from exc

    # -- files -------------------------------------------------------------------------

    async def read(self, ref: SandboxRef, path: str, offset: int, limit: int, hash_limit: int = HASH_LIMIT) -> FileData:
        sbx = await self._sandbox(ref)
        data = bytes(await self._call(ref, sbx.files.read(path, format="bytes"), path))
        sha = hashlib.sha256(data).hexdigest() if len(data) <= hash_limit else None
        return FileData(data=data[offset : offset + limit], size=len(data), sha256=sha)

    async def write(
        self, ref: SandboxRef, path: str, data: bytes, mode: int | None, if_sha256: str | None = None
    ) -> None:
        if if_sha256 is not None:
            await self.check_sha256(ref, path, if_sha256)
        sbx = await self._sandbox(ref)
        await self._call(ref, sbx.files.write(path, data), path)
        if mode is not None:
            done = await self.execute(ref, ExecRequest(command=f"chmod {mode:o} {shlex.quote(path)}", timeout_s=30))
            if done.exit_code != 0:
                raise Unavailable(f"could not set mode {mode:o} on {path}: {done.stderr.strip()}")

    async def list(self, ref: SandboxRef, path: str, depth: int, max_entries: int) -> Listing:
        sbx = await self._sandbox(ref)
        infos = await self._call(ref, sbx.files.list(path, depth=depth), path)
        entries = []
        for info in infos:
            kind = _KINDS.get(info.type, "other")
            name = posixpath.relpath(info.path, path)
            entries.append(FileEntry(name=name, type=kind, size=info.size if kind == "file" else 0))  # type: ignore[arg-type]
        entries.sort(key=lambda e: e.name)
        return Listing(entries=entries[:max_entries], truncated=len(entries) > max_entries)
