"""A fake of `e2b.AsyncSandbox`, derived from the installed SDK's own behaviour.

It honours the SDK's signatures (checked by `test_e2b_fake.py` with `inspect.signature`)
and, wherever it can, runs the SDK's own code rather than our idea of it:

- every failure is an exception built by the SDK's mapping functions from what the real
  service answers (`handle_api_exception` for the control plane, `format_envd_api_exception`
  and `handle_rpc_exception` for envd): bad key, 503, 404 sandbox, unreachable, invalid
  argument, a timeout over the tier's limit, a stream that ends without an exit;
- `commands.run` feeds envd-shaped process events to the SDK's own `AsyncCommandHandle`,
  so callbacks, `retain_output`, `CommandExitException`, "Command ended without an end
  event" and the health-probed error mapping are the SDK's;
- at a command's deadline it kills only the top process, as envd does (E2B issue #1031);
- `files.read(format="stream")` returns the SDK's `AsyncFileStreamReader`;
- a new VM's /home/user holds the template's dotfiles; `create` refuses a timeout over
  the tier's limit (`FakeCloud.max_ttl_s`, Hobby by default) and the VM ends at its timeout.

The "cloud" is a class-level dict of VMs, each a host temp directory standing in for
/home/user, so a new backend instance (a server restart) can `connect` by id and a test
can kill a VM from outside. Commands run as local bash processes (trusted test commands
only: the fake isolates nothing; isolation tests run on bubblewrap/docker). A test makes
the next call of an operation fail with `FakeCloud.fail_next(op, error)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import (
    AsyncCommandHandle,
    AuthenticationException,
    CommandResult,
    ConnectionConfig,
    EntryInfo,
    FileNotFoundException,
    FileType,
    SandboxInfo,
    SandboxNotFoundException,
    SnapshotInfo,
    WriteInfo,
)
from e2b.api import ApiClient, handle_api_exception
from e2b.api.client.models.sandbox_state import SandboxState
from e2b.envd.api import format_envd_api_exception
from e2b.envd.process import process_pb
from e2b.envd.rpc import format_sandbox_unreachable_exception, handle_rpc_exception
from e2b.sandbox.filesystem.filesystem import AsyncFileStreamReader
from protobuf import Oneof
from pyqwest import StreamError, StreamErrorCode

HOME = "/home/user"
DOTFILES = {".bashrc": "# ~/.bashrc\n", ".profile": "# ~/.profile\n", ".bash_logout": "# ~/.bash_logout\n"}
CHUNK = 64 * 1024  # envd sends file bodies and command output in chunks
_FILES_RPC = {Code.NOT_FOUND: FileNotFoundException}
_FILES_HTTP = {404: FileNotFoundException}


# -- the errors the real service gives, through the SDK's own mapping ----------------------


def api_error(status: int, message: str) -> Exception:
    """What the SDK raises for an error answer of the control plane (api.e2b.dev)."""
    return handle_api_exception(httpx.Response(status, json={"code": status, "message": message}))


def envd_http_error(status: int, message: str) -> Exception:
    """What the SDK raises for an error answer of envd's /files route."""
    return format_envd_api_exception(status, message, _FILES_HTTP)


def envd_rpc_error(code: Code, message: str, *, files: bool = False) -> Exception:
    """What the SDK raises for an error answer of an envd RPC."""
    return handle_rpc_exception(ConnectError(code, message), _FILES_RPC if files else None)


def sandbox_gone(sandbox_id: str) -> Exception:
    """The proxy's 502 for a sandbox that was killed or reached its timeout."""
    return envd_rpc_error(Code.UNAVAILABLE, f"The sandbox {sandbox_id} was not found")


def dropped_stream() -> ConnectError:
    """The transport's error for a stream reset mid-command (what the SDK hands back raw
    when its health probe finds the sandbox running)."""
    err = ConnectError(Code.UNAVAILABLE, "stream reset")
    err.__cause__ = StreamError("stream reset by peer", StreamErrorCode.INTERNAL_ERROR)
    return err


def unreachable() -> Exception:
    """A request and its follow-up health probe both failed: not confirmed stopped."""
    return format_sandbox_unreachable_exception(dropped_stream(), httpx.ConnectTimeout("health probe timed out"))


def _check_key(opts: dict[str, Any]) -> None:
    """The SDK refuses a missing key itself; the API answers 401 to a bad one."""
    key = opts.get("api_key") or os.environ.get("E2B_API_KEY")
    ApiClient(ConnectionConfig(api_key=key))  # raises AuthenticationException without a key
    if key in FakeCloud.revoked_keys:
        raise api_error(401, "Invalid API key")


# -- the cloud ------------------------------------------------------------------------------


class _VM:
    def __init__(self, envs: dict[str, str] | None, allow_internet_access: bool | None, timeout: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fake-e2b-"))
        self.tmp = Path(tempfile.mkdtemp(prefix="fake-e2b-tmp-"))
        for name, text in DOTFILES.items():  # what the base template copies into /home/user
            (self.root / name).write_text(text)
        self.envs = dict(envs or {})
        self.allow_internet_access = allow_internet_access
        self.started_at = time.time()
        self.end_at = self.started_at + timeout
        self.running = True
        self.sessions: set[int] = set()  # every command's session: all die with the VM

    def host(self, path: str) -> Path:
        if path == "/tmp" or path.startswith("/tmp/"):
            return self.tmp / path[len("/tmp/") :]
        rel = os.path.relpath(path, HOME) if path.startswith(HOME) else path.lstrip("/")
        return self.root / rel


def _kill_sessions(sessions: set[int]) -> None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) in sessions:
                    os.kill(int(entry), signal.SIGKILL)


class FakeCloud:
    vms: dict[str, _VM] = {}
    snapshots: dict[str, Path] = {}  # snapshot id -> a copy of the VM's files (a filesystem snapshot)
    api_keys: list[str | None] = []
    revoked_keys: set[str] = {"e2b_revoked_key"}
    max_ttl_s = 3600  # the Hobby tier's limit (Pro: 86400)
    faults: dict[str, list[Any]] = {}
    largest_read_buffer = 0  # most file bytes the SDK held at once for one read
    retained_output: list[str | None] = []  # what each command's SDK handle accumulated

    @classmethod
    def reset(cls) -> None:
        cls.faults, cls.largest_read_buffer, cls.retained_output, cls.max_ttl_s = {}, 0, [], 3600

    @classmethod
    def fail_next(cls, op: str, error: Any) -> None:
        """Make the next `op` call fail: an exception, or for "run" a mode
        ("drop", "no_end", "unreachable") the stream fails in after the command started."""
        cls.faults.setdefault(op, []).append(error)

    @classmethod
    def _fault(cls, op: str) -> Any:
        queue = cls.faults.get(op)
        return queue.pop(0) if queue else None

    @classmethod
    def _raise_fault(cls, op: str) -> None:
        if (err := cls._fault(op)) is not None:
            raise err

    @classmethod
    def kill_from_outside(cls, e2b_id: str) -> None:
        vm = cls.vms.pop(e2b_id)
        vm.running = False
        _kill_sessions(vm.sessions)
        shutil.rmtree(vm.root, ignore_errors=True)
        shutil.rmtree(vm.tmp, ignore_errors=True)


def _vm(sandbox_id: str) -> _VM | None:
    vm = FakeCloud.vms.get(sandbox_id)
    if vm is not None and time.time() >= vm.end_at:  # E2B ends a sandbox at its timeout
        FakeCloud.kill_from_outside(sandbox_id)
        return None
    return vm if vm is not None and vm.running else None


def _running_vm(sandbox_id: str, error: Callable[[], Exception]) -> _VM:
    vm = _vm(sandbox_id)
    if vm is None:
        raise error()
    return vm


# -- commands -------------------------------------------------------------------------------


def _event(kind: str, value: Any) -> process_pb.StartResponse:
    return process_pb.StartResponse(event=process_pb.ProcessEvent(event=Oneof(kind, value)))


def _data(stream: str, chunk: bytes) -> process_pb.StartResponse:
    return _event("data", process_pb.ProcessEvent.DataEvent(output=Oneof(stream, chunk)))


class _Commands:
    def __init__(self, sandbox_id: str) -> None:
        self._id = sandbox_id
        self._probe_fails = False

    async def _check_health(self) -> bool:
        """envd's /health as the SDK's probe sees it."""
        if self._probe_fails:  # once: the network comes back
            self._probe_fails = False
            raise httpx.ConnectTimeout("health probe timed out")
        return _vm(self._id) is not None

    async def run(
        self,
        cmd: str,
        background: bool | None = None,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        stdin: bool | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        *,
        retain_output: bool = True,
    ) -> Any:
        vm = _running_vm(self._id, lambda: sandbox_gone(self._id))
        if not vm.host(cwd or HOME).is_dir():  # envd checks the cwd before it starts anything
            raise envd_rpc_error(Code.INVALID_ARGUMENT, f"cwd '{cwd}' does not exist")
        # The fake's "/home/user" and "/tmp" are its temp dirs: rewrite them so commands can use them.
        cmd = cmd.replace("/tmp/", f"{vm.tmp}/").replace(HOME, str(vm.root))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(vm.root), **vm.envs, **(envs or {})}
        proc = await asyncio.create_subprocess_exec(
            "/bin/bash", "-l", "-c", cmd, cwd=vm.host(cwd or HOME), env=env, start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        vm.sessions.add(proc.pid)
        events = self._events(vm, proc, timeout, FakeCloud._fault("run"))
        await anext(events)  # the start event
        handle = AsyncCommandHandle(
            pid=proc.pid,
            handle_kill=self._kill(proc),
            events=events,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            check_health=self._check_health,
            retain_output=retain_output,
        )
        if background:
            return handle
        try:
            return await handle.wait()
        finally:
            FakeCloud.retained_output.append(handle.stdout)

    def _kill(self, proc: asyncio.subprocess.Process) -> Callable[[], Any]:
        async def kill() -> bool:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
                return True
            return False

        return kill

    async def _events(
        self, vm: _VM, proc: asyncio.subprocess.Process, timeout: float | None, fault: Any
    ) -> AsyncIterator[process_pb.StartResponse]:
        """envd's event stream for one process: start, output chunks, end."""
        yield _event("start", process_pb.ProcessEvent.StartEvent(pid=proc.pid))
        if fault is not None:  # the stream fails while the command runs (here: to its end)
            await proc.communicate()
            if fault == "no_end":
                return
            self._probe_fails = fault == "unreachable"
            raise dropped_stream()
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

        async def pump(stream: asyncio.StreamReader, name: str) -> None:
            while chunk := await stream.read(CHUNK):
                await queue.put((name, chunk))
            await queue.put((name, b""))

        pumps = [asyncio.ensure_future(pump(proc.stdout, "stdout")), asyncio.ensure_future(pump(proc.stderr, "stderr"))]
        deadline = None if not timeout else time.monotonic() + timeout
        open_streams = 2
        try:
            while open_streams:
                left = None if deadline is None else max(deadline - time.monotonic(), 0)
                try:
                    name, chunk = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)  # envd: the top process only, not its group
                    proc._transport.close()  # type: ignore[attr-defined]  # our ends of its pipes
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "deadline_exceeded") from None
                if chunk:  # ...and back, so the fake's paths look like the VM's
                    yield _data(name, chunk.replace(str(vm.root).encode(), HOME.encode()))
                else:
                    open_streams -= 1
            code = await proc.wait()
        finally:
            for task in pumps:
                task.cancel()
        if _vm(self._id) is None:  # killed with its VM: envd's connection ends mid-stream
            raise ConnectError(
                Code.UNAVAILABLE, f"the connection to sandbox {self._id} ended before the stream completed"
            )
        yield _event("end", process_pb.ProcessEvent.EndEvent(exit_code=code if code >= 0 else -1, exited=True))


# -- files ----------------------------------------------------------------------------------


class _Files:
    def __init__(self, sandbox_id: str) -> None:
        self._id = sandbox_id

    def _vm(self) -> _VM:
        return _running_vm(self._id, lambda: envd_http_error(502, f"The sandbox {self._id} was not found"))

    async def read(
        self, path: str, format: Literal["text", "bytes", "stream"] = "text", user: str | None = None,
        request_timeout: float | None = None, gzip: bool = False, stream_idle_timeout: float | None = None,
    ) -> Any:  # fmt: skip
        target = self._vm().host(path)
        FakeCloud._raise_fault("read")
        if target.is_dir():
            raise envd_http_error(400, f"path '{path}' is a directory")
        if not target.is_file():
            raise envd_http_error(404, f"path '{path}' does not exist")
        if format == "stream":
            FakeCloud.largest_read_buffer = max(FakeCloud.largest_read_buffer, CHUNK)
            return AsyncFileStreamReader(httpx.Response(200, content=_chunks(target)))
        data = target.read_bytes()
        FakeCloud.largest_read_buffer = max(FakeCloud.largest_read_buffer, len(data))
        return bytearray(data) if format == "bytes" else data.decode()

    async def write(
        self, path: str, data: Any, user: str | None = None, request_timeout: float | None = None,
        gzip: bool = False, use_octet_stream: bool | None = None, metadata: dict[str, str] | None = None,
    ) -> WriteInfo:  # fmt: skip
        target = self._vm().host(path)
        FakeCloud._raise_fault("write")
        if target.is_dir():
            raise envd_http_error(400, f"path '{path}' is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else bytes(data))
        return WriteInfo(name=target.name, type=FileType.FILE, path=path)

    async def make_dir(self, path: str, user: str | None = None, request_timeout: float | None = None) -> bool:
        target = self._vm().host(path)
        if target.is_dir():
            return False
        target.mkdir(parents=True)
        return True

    async def list(
        self, path: str, depth: int | None = 1, user: str | None = None, request_timeout: float | None = None
    ) -> list[EntryInfo]:
        base = self._vm().host(path)
        FakeCloud._raise_fault("list")
        if not base.exists():
            raise envd_rpc_error(Code.NOT_FOUND, f"path '{path}' does not exist", files=True)
        if not base.is_dir():
            raise envd_rpc_error(Code.INVALID_ARGUMENT, f"path '{path}' is not a directory", files=True)
        out = []
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(base)
            if len(rel.parts) > (depth or 1):
                continue
            kind = FileType.SYMLINK if p.is_symlink() else FileType.DIR if p.is_dir() else FileType.FILE
            st = p.lstat()
            out.append(
                EntryInfo(
                    name=p.name,
                    type=kind,
                    path=f"{path.rstrip('/')}/{rel}",
                    size=st.st_size,
                    mode=st.st_mode,
                    permissions="",
                    owner="user",
                    group="user",
                    modified_time=datetime.now(),
                    symlink_target=None,
                )  # fmt: skip
            )
        return out


async def _chunks(target: Path) -> AsyncIterator[bytes]:
    with target.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


# -- the sandbox ----------------------------------------------------------------------------


class FakeAsyncSandbox:
    """`e2b.AsyncSandbox` as far as the e2b backend uses it."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.commands = _Commands(sandbox_id)
        self.files = _Files(sandbox_id)

    @classmethod
    async def create(
        cls, template: str | None = None, timeout: int | None = None, metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None, secure: bool | None = None, allow_internet_access: bool | None = None,
        **opts: Any,
    ) -> FakeAsyncSandbox:  # fmt: skip
        _check_key(opts)
        FakeCloud.api_keys.append(opts.get("api_key"))
        FakeCloud._raise_fault("create")
        timeout = 300 if timeout is None else timeout  # the API's default
        if timeout > FakeCloud.max_ttl_s:
            raise api_error(400, f"Timeout cannot be greater than {FakeCloud.max_ttl_s // 3600} hours")
        sandbox_id = f"fake{secrets.token_hex(4)}"
        vm = _VM(envs, allow_internet_access, timeout)
        if template in FakeCloud.snapshots:  # a sandbox started from a snapshot has its files
            shutil.copytree(FakeCloud.snapshots[template], vm.root, symlinks=True, dirs_exist_ok=True)
        FakeCloud.vms[sandbox_id] = vm
        return cls(sandbox_id)

    @classmethod
    async def create_snapshot(
        cls, sandbox_id: str, name: str | None = None, *, mode: str | None = None, **opts: Any
    ) -> SnapshotInfo:
        """`AsyncSandbox.create_snapshot(sandbox_id, mode=...)`: its files (the fake keeps no memory)."""
        _check_key(opts)
        FakeCloud._raise_fault("create_snapshot")
        vm = _running_vm(sandbox_id, lambda: SandboxNotFoundException(f"Sandbox {sandbox_id} not found"))
        snapshot_id = f"snap{secrets.token_hex(4)}:default"
        copy = Path(tempfile.mkdtemp(prefix="fake-e2b-snap-"))
        shutil.copytree(vm.root, copy, symlinks=True, dirs_exist_ok=True)
        FakeCloud.snapshots[snapshot_id] = copy
        return SnapshotInfo(snapshot_id=snapshot_id, names=[snapshot_id])

    @classmethod
    async def delete_snapshot(cls, snapshot_id: str, **opts: Any) -> bool:
        _check_key(opts)
        copy = FakeCloud.snapshots.pop(snapshot_id, None)
        if copy is None:
            return False
        shutil.rmtree(copy, ignore_errors=True)
        return True

    @classmethod
    async def connect(
        cls, sandbox_id: str, timeout: int | None = None, logger: Any = None, *, on_resume: str = "restore", **opts: Any
    ) -> FakeAsyncSandbox:
        _check_key(opts)
        FakeCloud._raise_fault("connect")
        if _vm(sandbox_id) is None:
            raise SandboxNotFoundException(f"Paused sandbox {sandbox_id} not found")
        return cls(sandbox_id)

    @classmethod
    async def kill(cls, sandbox_id: str, **opts: Any) -> bool:
        _check_key(opts)
        FakeCloud._raise_fault("kill")
        if _vm(sandbox_id) is None:
            return False
        FakeCloud.kill_from_outside(sandbox_id)
        return True

    @classmethod
    async def get_info(cls, sandbox_id: str, **opts: Any) -> SandboxInfo:
        _check_key(opts)
        FakeCloud._raise_fault("get_info")
        vm = _vm(sandbox_id)
        if vm is None:
            raise SandboxNotFoundException(f"Sandbox {sandbox_id} not found")
        return SandboxInfo(
            sandbox_id=sandbox_id, sandbox_domain=None, template_id="base", name="base", metadata={},
            started_at=datetime.fromtimestamp(vm.started_at, UTC),
            end_at=datetime.fromtimestamp(vm.started_at, UTC) + timedelta(seconds=vm.end_at - vm.started_at),
            state=SandboxState.RUNNING, cpu_count=2, memory_mb=512, envd_version="0.6.7",
        )  # fmt: skip

    async def is_running(self, request_timeout: float | None = None) -> bool:
        return _vm(self.sandbox_id) is not None


__all__ = [
    "AuthenticationException",
    "CommandResult",
    "FakeAsyncSandbox",
    "FakeCloud",
    "api_error",
    "dropped_stream",
    "envd_http_error",
    "envd_rpc_error",
    "sandbox_gone",
    "unreachable",
]
