"""A fake of `e2b.AsyncSandbox` at the narrowest boundary the backend uses.

It honours the SDK's signatures (`create`, `connect`, `kill`, `is_running`,
`commands.run`, `files.read/write/list`) and raises the SDK's own exceptions and result
types. The "cloud" is a class-level dict of VMs, each a host temp directory standing in
for /home/user, so a new backend instance (a server restart) can `connect` by id and a
test can kill a VM from outside. Commands run as local bash processes (trusted test
commands only: the fake isolates nothing; isolation tests run on bubblewrap/docker).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from e2b import (
    CommandExitException,
    CommandResult,
    EntryInfo,
    FileType,
    NotFoundException,
    SandboxNotFoundException,
    TimeoutException,
    WriteInfo,
)

HOME = "/home/user"


class _VM:
    def __init__(self, envs: dict[str, str] | None, allow_internet_access: bool | None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fake-e2b-"))
        self.tmp = Path(tempfile.mkdtemp(prefix="fake-e2b-tmp-"))
        self.envs = dict(envs or {})
        self.allow_internet_access = allow_internet_access
        self.running = True
        self.procs: set[asyncio.subprocess.Process] = set()

    def host(self, path: str) -> Path:
        if path.startswith("/tmp/"):
            return self.tmp / path[len("/tmp/") :]
        rel = os.path.relpath(path, HOME) if path.startswith(HOME) else path.lstrip("/")
        return self.root / rel


class FakeCloud:
    vms: dict[str, _VM] = {}
    api_keys: list[str | None] = []

    @classmethod
    def kill_from_outside(cls, e2b_id: str) -> None:
        vm = cls.vms.pop(e2b_id)
        vm.running = False
        for proc in vm.procs:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(vm.root, ignore_errors=True)
        shutil.rmtree(vm.tmp, ignore_errors=True)


def _vm(sandbox_id: str) -> _VM:
    vm = FakeCloud.vms.get(sandbox_id)
    if vm is None or not vm.running:
        raise SandboxNotFoundException(f"Sandbox {sandbox_id} not found")
    return vm


class _Commands:
    def __init__(self, sandbox_id: str) -> None:
        self._id = sandbox_id

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
    ) -> CommandResult:
        vm = _vm(self._id)
        # The fake's "/home/user" and "/tmp" are its temp dir: rewrite them so commands can use them.
        cmd = cmd.replace("/tmp/", f"{vm.tmp}/").replace(HOME, str(vm.root))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(vm.root), **vm.envs, **(envs or {})}
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", cmd, cwd=vm.host(cwd or HOME), env=env, start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        vm.procs.add(proc)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise TimeoutException("context deadline exceeded: the command timed out") from None
        finally:
            vm.procs.discard(proc)
        if not vm.running:
            raise SandboxNotFoundException(f"Sandbox {self._id} not found")
        # ...and back, so the fake's paths look like the VM's.
        stdout, stderr = (b.decode(errors="replace").replace(str(vm.root), HOME) for b in (out, err))
        if on_stdout and stdout:
            on_stdout(stdout)
        if on_stderr and stderr:
            on_stderr(stderr)
        if proc.returncode != 0:
            raise CommandExitException(stderr=stderr, stdout=stdout, exit_code=proc.returncode, error=None)
        return CommandResult(stderr=stderr, stdout=stdout, exit_code=0, error=None)


class _Files:
    def __init__(self, sandbox_id: str) -> None:
        self._id = sandbox_id

    async def read(
        self, path: str, format: Literal["text", "bytes", "stream"] = "text", user: str | None = None,
        request_timeout: float | None = None, gzip: bool = False, stream_idle_timeout: float | None = None,
    ) -> Any:  # fmt: skip
        target = _vm(self._id).host(path)
        if not target.is_file():
            raise NotFoundException(f"file {path} not found")
        data = target.read_bytes()
        return bytearray(data) if format == "bytes" else data.decode()

    async def write(
        self, path: str, data: Any, user: str | None = None, request_timeout: float | None = None,
        gzip: bool = False, use_octet_stream: bool | None = None, metadata: dict[str, str] | None = None,
    ) -> WriteInfo:  # fmt: skip
        target = _vm(self._id).host(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else bytes(data))
        return WriteInfo(name=target.name, type=FileType.FILE, path=path)

    async def list(
        self, path: str, depth: int | None = 1, user: str | None = None, request_timeout: float | None = None
    ) -> list[EntryInfo]:
        vm = _vm(self._id)
        base = vm.host(path)
        if not base.is_dir():
            raise NotFoundException(f"directory {path} not found")
        out = []
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(base)
            if len(rel.parts) > (depth or 1):
                continue
            kind = FileType.SYMLINK if p.is_symlink() else FileType.DIR if p.is_dir() else FileType.FILE
            st = p.lstat()
            out.append(
                EntryInfo(
                    name=p.name, type=kind, path=f"{path.rstrip('/')}/{rel}", size=st.st_size, mode=st.st_mode,
                    permissions="", owner="user", group="user", modified_time=datetime.now(), symlink_target=None,
                )  # fmt: skip
            )
        return out


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
        FakeCloud.api_keys.append(opts.get("api_key"))
        sandbox_id = f"fake{secrets.token_hex(4)}"
        FakeCloud.vms[sandbox_id] = _VM(envs, allow_internet_access)
        return cls(sandbox_id)

    @classmethod
    async def connect(cls, sandbox_id: str, timeout: int | None = None, **opts: Any) -> FakeAsyncSandbox:
        _vm(sandbox_id)
        return cls(sandbox_id)

    @classmethod
    async def kill(cls, sandbox_id: str, **opts: Any) -> bool:
        if sandbox_id not in FakeCloud.vms:
            return False
        FakeCloud.kill_from_outside(sandbox_id)
        return True

    async def is_running(self, request_timeout: float | None = None) -> bool:
        return self.sandbox_id in FakeCloud.vms
