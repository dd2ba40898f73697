"""The e2b backend: a Firecracker microVM per sandbox through the `e2b` SDK's `AsyncSandbox`.

This module (and so the SDK) is imported only when `CORRAL_SANDBOX_BACKEND=e2b`. SDK
errors become Corral errors here, at one boundary (`_translate`; the table is in
docs/e2b.md). The VM is the sandbox: path checks are lexical (`workspace_path`), there is
no host behind a symlink to protect. What the real service does that a naive client
would miss, and how this backend answers it:

- envd kills only the top process of a command at its deadline: every command runs as a
  job in its own process group, whose id goes to a file; on a timeout a second command
  kills that group (the contract: a timeout kills the command and all it started).
- E2B refuses a sandbox timeout above the tier's limit (1 h Hobby, 24 h Pro) and caps a
  sandbox's life there: the TTL is clamped to `max_ttl_s` and the clamped value is the
  sandbox's recorded lifetime, so `expires_at` says when E2B will really end it.
- `SandboxUnreachableException` (and a dropped stream) does not mean the VM is gone:
  the control plane is asked (`get_info`) before a sandbox is declared lost.
- The template's home holds dotfiles: the workdir is a dedicated empty directory.
- Output and file reads are capped as data arrives (`retain_output=False`, streamed reads).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import posixpath
import secrets
import shlex
import time
from typing import Any, Literal

import httpx
from connectrpc.errors import ConnectError
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FileType,
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxUnreachableException,
    ServiceBusyException,
    TimeoutException,
)
from e2b.api.client.models.sandbox_state import SandboxState

from corral.errors import CorralError, InvalidArgument, NotFound, SandboxLost, Timeout, Unavailable

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

log = logging.getLogger("corral.sandbox.e2b")

HOME = "/home/user"
# E2B confirmed the VM is gone: the control plane does not know it, or the proxy / a
# health probe found it stopped.
_GONE = (SandboxNotFoundException, SandboxNotRunningException)
_KINDS = {FileType.FILE: "file", FileType.DIR: "dir", FileType.SYMLINK: "symlink"}
_KEY_HINT = "set E2B_API_KEY to a valid key from https://e2b.dev/dashboard?tab=keys"
_TTL_HINT = "set CORRAL_E2B_MAX_TTL_S to your E2B tier's limit (3600 on Hobby, 86400 on Pro)"


def _wrap(command: str, run: str, stdin: bool) -> str:
    """`command` as a job in its own process group (its id in `run`.pid), stdin from a file.

    envd kills only the top process at a deadline; the group id lets `_kill_group` kill
    the rest. The stdin file is opened and unlinked before the command starts, so
    nothing of it is left behind whatever happens to the command."""
    source = f"exec 3< {run}.in; rm -f {run}.in" if stdin else "exec 3< /dev/null"
    return (
        f"{source}; set -m; bash -c {shlex.quote(command)} <&3 3<&- & pid=$!; set +m; exec 3<&-; "
        f"echo $pid > {run}.pid; wait $pid; rc=$?; rm -f {run}.pid; exit $rc"
    )


def _unsure(err: BaseException) -> bool:
    """The VM could not be reached, but E2B did not say it is gone: unreachable, a dropped
    transfer (raw httpx error) or a stream that ended without a result (a bare `Exception`,
    or the transport's `ConnectError` when the SDK's probe found the VM running)."""
    dropped = isinstance(err, httpx.TransportError) and not isinstance(err, httpx.TimeoutException)
    ended = isinstance(err, ConnectError) or (type(err) is Exception and "without an end event" in str(err))
    return isinstance(err, SandboxUnreachableException) or dropped or ended


class E2BBackend(Backend):
    name = "e2b"
    isolation = "microvm"
    workdir = f"{HOME}/workspace"

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

    # -- errors --------------------------------------------------------------------------

    async def _translate(self, err: BaseException, what: str, ref: SandboxRef | None = None) -> CorralError:
        """One SDK failure as a Corral error. A sandbox is lost only when E2B confirms it."""
        if isinstance(err, CorralError):
            return err
        if ref is not None and isinstance(err, _GONE):
            return self._lost(ref, err)
        if ref is not None and _unsure(err):
            return await self._confirm(ref, err, what)
        if isinstance(err, AuthenticationException):
            return Unavailable(
                f"e2b refused the request ({what}): E2B_API_KEY is missing or invalid ({err})", hint=_KEY_HINT
            )
        if isinstance(err, ServiceBusyException | RateLimitException):
            return Unavailable(
                f"e2b is busy and refused {what}: {err}", hint="retry in a few seconds; nothing was changed"
            )
        if isinstance(err, NotFoundException):
            return NotFound(f"{what}: no such file or directory")
        if isinstance(err, InvalidArgumentException):
            return InvalidArgument(f"{what}: {err}")
        if isinstance(err, NotEnoughSpaceException):
            return Unavailable(f"{what}: the sandbox's disk is full ({err})", hint="delete files in the sandbox")
        if isinstance(err, TimeoutException | httpx.TimeoutException):
            return Timeout(f"e2b did not finish {what} within {self.config.request_timeout_s:g}s ({err})", hint="retry")
        return Unavailable(f"e2b failed {what}: {type(err).__name__}: {err}")

    async def _confirm(self, ref: SandboxRef, err: BaseException, what: str) -> CorralError:
        """The sandbox could not be reached: ask the control plane whether it still exists."""
        try:
            info = await self.cls.get_info(ref.data["e2b_id"], **self._opts())
        except SandboxNotFoundException:
            return self._lost(ref, err)
        except Exception as probe:
            return Unavailable(
                f"e2b could not reach sandbox {ref.id} ({what}: {err}) nor say whether it runs ({probe})",
                hint="retry; the sandbox is kept",
            )
        if info.state != SandboxState.RUNNING:
            return self._lost(ref, err)
        self._live.pop(ref.id, None)  # reconnect next time
        return Unavailable(
            f"the connection to sandbox {ref.id} failed ({what}: {err}); e2b reports it still running",
            hint="retry; the sandbox is kept",
        )

    def _lost(self, ref: SandboxRef, err: BaseException) -> SandboxLost:
        self._live.pop(ref.id, None)
        return SandboxLost(f"sandbox {ref.id} is gone: {err}")

    async def _call(self, ref: SandboxRef, work: Any, what: str) -> Any:
        """One SDK call on a sandbox, its errors translated."""
        try:
            return await work
        except Exception as exc:
            raise await self._translate(exc, what, ref) from exc

    async def _sandbox(self, ref: SandboxRef) -> Any:
        """The connected VM; reconnects by id after a server restart."""
        if (sbx := self._live.get(ref.id)) is not None:
            return sbx
        try:
            sbx = await self.cls.connect(ref.data["e2b_id"], **self._opts())
        except SandboxNotFoundException as err:
            raise SandboxLost(f"sandbox {ref.id} is gone: e2b no longer has VM {ref.data['e2b_id']}") from err
        except Exception as err:
            raise await self._translate(err, f"connecting to sandbox {ref.id}") from err
        self._live[ref.id] = sbx
        return sbx

    # -- checkpoints: E2B's own snapshots ---------------------------------------------------

    native_checkpoints = True

    async def snapshot_native(self, ref: SandboxRef) -> str:
        """A filesystem snapshot (no memory: processes are not part of a checkpoint, as on every
        backend); E2B pauses the sandbox while it takes it. A new sandbox starts from its id."""
        await self._sandbox(ref)  # lost if it is gone
        work = self.cls.create_snapshot(ref.data["e2b_id"], mode="filesystem", **self._opts())
        info = await self._call(ref, work, f"snapshotting sandbox {ref.id}")
        return str(info.snapshot_id)

    async def delete_native(self, snapshot_id: str) -> None:
        try:
            await self.cls.delete_snapshot(snapshot_id, **self._opts())  # False when already gone: fine
        except Exception as err:
            raise await self._translate(err, f"deleting snapshot {snapshot_id}") from err

    # -- lifecycle -----------------------------------------------------------------------

    async def provision(self, sandbox_id: str, spec: SandboxSpec) -> SandboxRef:
        # E2B refuses a longer timeout (400) and ends a sandbox at its tier's limit anyway.
        spec = spec.model_copy(update={"ttl_s": min(spec.ttl_s, self.config.max_ttl_s)})
        try:
            sbx = await self.cls.create(
                template=spec.template or self.config.template,
                timeout=spec.ttl_s,
                metadata={"corral_sandbox": sandbox_id},
                envs=spec.env or None,
                allow_internet_access=spec.network == "full",
                **self._opts(),
            )
        except Exception as err:
            if isinstance(err, SandboxException) and err.status_code == 400:  # e.g. a timeout over the tier's
                raise Unavailable(f"e2b refused to create a sandbox: {err}", hint=_TTL_HINT) from err
            raise await self._translate(err, "creating a sandbox") from err
        ref = SandboxRef(id=sandbox_id, spec=spec, data={"e2b_id": sbx.sandbox_id})
        try:  # the template's home holds dotfiles: the workspace is a directory of its own
            await self._call(ref, sbx.files.make_dir(self.workdir), f"creating {self.workdir}")
        except CorralError:
            with contextlib.suppress(CorralError):  # the make_dir failure is the news
                await self.destroy(ref)
            raise
        self._live[sandbox_id] = sbx
        return ref

    async def destroy(self, ref: SandboxRef, keep_workspace: bool = False) -> None:
        self._live.pop(ref.id, None)
        try:
            await self.cls.kill(ref.data["e2b_id"], **self._opts())  # False when already gone: fine
        except Exception as err:
            raise await self._translate(err, f"destroying sandbox {ref.id}") from err

    async def status(self, ref: SandboxRef) -> Literal["running", "lost"]:
        try:
            info = await self.cls.get_info(ref.data["e2b_id"], **self._opts())
        except SandboxNotFoundException:
            return "lost"
        except Exception as err:
            raise await self._translate(err, f"asking about sandbox {ref.id}") from err
        return "running" if info.state == SandboxState.RUNNING else "lost"

    # -- execute -------------------------------------------------------------------------

    async def execute(self, ref: SandboxRef, request: ExecRequest) -> ExecResult:
        sbx = await self._sandbox(ref)
        out, err = OutputCap(request.output_limit), OutputCap(request.output_limit)
        run = f"/tmp/.corral-run-{secrets.token_hex(6)}"
        if request.stdin is not None:  # the SDK's stdin needs a background handle; a file is simpler
            await self._call(ref, sbx.files.write(f"{run}.in", request.stdin), "writing the command's stdin")
        cwd = (
            request.cwd
            if request.cwd and request.cwd.startswith("/")
            else posixpath.join(self.workdir, request.cwd or "")
        )
        start = time.monotonic()
        exit_code: int | None
        timed_out = False
        try:
            result = await sbx.commands.run(
                _wrap(request.command, run, request.stdin is not None),
                envs=request.env or None,
                cwd=cwd,
                timeout=request.timeout_s,
                on_stdout=lambda s: out.feed(s.encode()),
                on_stderr=lambda s: err.feed(s.encode()),
                retain_output=False,  # the caps above keep what Corral returns; the SDK keeps nothing
            )
            exit_code = result.exit_code
        except CommandExitException as exc:  # non-zero exit is data, not an error
            exit_code = exc.exit_code
        except (*_GONE, SandboxUnreachableException) as exc:  # TimeoutExceptions too: caught first
            raise await self._translate(exc, "running a command", ref) from exc
        except TimeoutException:
            exit_code, timed_out = None, True
            await self._kill_group(ref, sbx, run)
        except Exception as exc:
            error = await self._translate(exc, "running a command", ref)
            if not isinstance(error, SandboxLost):  # nothing of the command may stay behind
                await self._kill_group(ref, sbx, run)
            raise error from exc
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

    async def _kill_group(self, ref: SandboxRef, sbx: Any, run: str) -> None:
        """After a timeout or a failed run: kill what envd left running, remove the run's files."""
        kill = f"kill -KILL -- -$(cat {run}.pid) 2>/dev/null; rm -f {run}.pid {run}.in; true"
        try:
            await sbx.commands.run(kill, timeout=self.config.request_timeout_s, retain_output=False)
        except _GONE as exc:
            raise self._lost(ref, exc) from exc
        except Exception:  # the timeout stands; the operator learns the group may live on
            log.warning("could not kill the timed-out command's process group in sandbox %s", ref.id, exc_info=True)

    # -- files -------------------------------------------------------------------------

    async def read(self, ref: SandboxRef, path: str, offset: int, limit: int, hash_limit: int = HASH_LIMIT) -> FileData:
        """Streamed: only the asked slice is kept in memory; the file is hashed while it is no
        larger than `hash_limit` (as on the other backends), else `sha256` is None."""
        sbx = await self._sandbox(ref)
        digest, size, kept = hashlib.sha256(), 0, bytearray()
        try:
            async with await sbx.files.read(path, format="stream") as stream:
                async for chunk in stream:
                    lo, hi = max(offset - size, 0), min(offset + limit - size, len(chunk))
                    if lo < hi:
                        kept += chunk[lo:hi]
                    size += len(chunk)
                    if size <= hash_limit:
                        digest.update(chunk)
        except Exception as exc:
            raise await self._translate(exc, f"reading {path}", ref) from exc
        return FileData(data=bytes(kept), size=size, sha256=digest.hexdigest() if size <= hash_limit else None)

    async def write(
        self, ref: SandboxRef, path: str, data: bytes, mode: int | None, if_sha256: str | None = None
    ) -> None:
        if if_sha256 is not None:
            await self.check_sha256(ref, path, if_sha256)
        sbx = await self._sandbox(ref)
        await self._call(ref, sbx.files.write(path, data), f"writing {path}")
        if mode is not None:
            done = await self.execute(ref, ExecRequest(command=f"chmod {mode:o} {shlex.quote(path)}", timeout_s=30))
            if done.exit_code != 0:
                raise Unavailable(f"could not set mode {mode:o} on {path}: {done.stderr.strip()}")

    async def list(self, ref: SandboxRef, path: str, depth: int, max_entries: int) -> Listing:
        sbx = await self._sandbox(ref)
        infos = await self._call(ref, sbx.files.list(path, depth=depth), f"listing {path}")
        entries = []
        for info in infos:
            kind = _KINDS.get(info.type, "other")
            name = posixpath.relpath(info.path, path)
            entries.append(FileEntry(name=name, type=kind, size=info.size if kind == "file" else 0))
        entries.sort(key=lambda e: e.name)
        return Listing(entries=entries[:max_entries], truncated=len(entries) > max_entries)
