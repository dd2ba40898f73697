"""The sandbox server's logic as plain async methods over a backend and the registry.

The MCP layer (`server.py`) is a thin shell over this. Here live: resolving a tool's
`sandbox_id` (or the caller's lazy default sandbox), the cattle rules (a sandbox that
died, expired or was destroyed answers `sandbox_lost`), limits on what a call may ask,
compare-and-swap writes, and the reaper.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import CorralError, InvalidArgument, NotFound, SandboxLost

from .backend import Backend, ExecRequest, ExecResult, SandboxSpec, workspace_path
from .config import SandboxSettings
from .registry import Record, Registry

__all__ = ["Resources", "SandboxService", "iso"]

log = logging.getLogger("corral.sandbox")
Progress = Callable[[float, str], Awaitable[None]]


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpus: float | None = Field(None, gt=0, le=64, description="CPUs (docker, e2b; bubblewrap does not cap CPU share)")
    memory_mb: int | None = Field(None, gt=0, le=1 << 20, description="memory in MiB")
    disk_mb: int | None = Field(None, gt=0, le=1 << 20, description="largest file a command may write, MiB")
    ttl_s: int | None = Field(None, gt=0, le=30 * 86400, description="lifetime in seconds")
    idle_timeout_s: int | None = Field(None, gt=0, le=30 * 86400, description="reaped after this long unused")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _check_env(env: dict[str, str] | None) -> dict[str, str]:
    for key, value in (env or {}).items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidArgument(f"bad environment variable name or value: {key!r}")
    return dict(env or {})


class SandboxService:
    def __init__(self, backend: Backend, registry: Registry, settings: SandboxSettings) -> None:
        self.backend = backend
        self.registry = registry
        self.settings = settings
        self._defaults: dict[str, str] = {}  # client key -> its lazy default sandbox
        self._busy: Counter[str] = Counter()  # sandbox id -> calls in flight (never reaped while busy)
        self._locks: dict[str, asyncio.Lock] = {}
        self._key_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # idempotency key / client default -> (lock, [users])

    # -- provision / resolve -------------------------------------------------------------

    def _spec(self, template: str | None, resources: Resources, env: dict[str, str], network: str) -> SandboxSpec:
        s = self.settings
        return SandboxSpec(
            template=template or s.sandbox_image or None,
            cpus=resources.cpus or s.sandbox_cpus,
            memory_mb=resources.memory_mb or s.sandbox_memory_mb,
            disk_mb=resources.disk_mb or s.sandbox_disk_mb,
            max_processes=s.sandbox_max_processes,
            env=env,
            network=network,  # type: ignore[arg-type]
            ttl_s=resources.ttl_s or s.sandbox_ttl_s,
        )

    async def provision(
        self,
        *,
        template: str | None = None,
        resources: Resources | None = None,
        env: dict[str, str] | None = None,
        network: Literal["none", "full"] = "none",
        label: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        resources = resources or Resources()
        spec = self._spec(template, resources, _check_env(env), network)
        # Only calls sharing an idempotency key wait for each other (docker provisioning takes ~1 s).
        async with self._lock_for(f"key:{idempotency_key}") if idempotency_key else contextlib.nullcontext():
            if idempotency_key and (old := self.registry.by_idempotency_key(self.backend.name, idempotency_key)):
                return self.describe(old)
            sandbox_id = f"sbx_{secrets.token_hex(8)}"
            ref = await self.backend.provision(sandbox_id, spec)
            now = time.time()
            record = Record(
                id=sandbox_id,
                backend=self.backend.name,
                state="running",
                label=label,
                idempotency_key=idempotency_key,
                ref=ref,
                created_at=now,
                expires_at=now + ref.spec.ttl_s,  # the backend may shorten it (e2b: the tier's limit)
                idle_timeout_s=resources.idle_timeout_s or self.settings.sandbox_idle_timeout_s,
                last_used_at=now,
            )
            self.registry.add(record)
        log.info("provisioned %s on %s", sandbox_id, self.backend.name)
        return self.describe(record)

    def describe(self, record: Record) -> dict[str, Any]:
        return {
            "sandbox_id": record.id,
            "backend": record.backend,
            "isolation": self.backend.isolation,
            "state": record.state,
            "label": record.label,
            "network": record.ref.spec.network,
            "created_at": iso(record.created_at),
            "expires_at": iso(record.expires_at),
            "workdir": self.backend.workdir,
        }

    async def resolve(self, sandbox_id: str | None, client: str) -> Record:
        """The record a call acts on: the given sandbox, or the caller's default (made now if needed)."""
        if sandbox_id is None:
            sandbox_id = await self._default_for(client)
        record = self.registry.get(sandbox_id)
        if record is None or record.backend != self.backend.name:
            raise NotFound(f"no sandbox {sandbox_id!r}", hint="call list_sandboxes, or provision a new one")
        if record.state != "running":
            raise SandboxLost(f"sandbox {sandbox_id} is {record.state}" + (f" ({record.reason})" if record.reason else ""))
        if time.time() >= record.expires_at:
            await self._reap(record, "expired")
            raise SandboxLost(f"sandbox {sandbox_id} expired")
        return record

    @contextlib.asynccontextmanager
    async def _lock_for(self, key: str) -> AsyncIterator[None]:
        """Serialise the calls that share `key`; the lock lives only while someone holds or awaits it."""
        lock, users = self._key_locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._key_locks[key]

    async def _default_for(self, client: str) -> str:
        """The caller's default sandbox, provisioned on first need (nothing exists at connect time)."""
        async with self._lock_for(f"default:{client}"):  # two first calls at once make one sandbox
            known = self._defaults.get(client)
            if known and (record := self.registry.get(known)) and record.state == "running":
                return known
            created = (await self.provision(label="default"))["sandbox_id"]
            self._defaults[client] = created
            return created

    async def _guard(self, record: Record, work: Awaitable[Any]) -> Any:
        """Run one backend call on `record`: busy while running; lost means lost for good."""
        self._busy[record.id] += 1
        self.registry.touch(record.id)
        try:
            return await work
        except SandboxLost as err:
            self.registry.set_state(record.id, "lost", err.message)
            self._defaults = {c: s for c, s in self._defaults.items() if s != record.id}
            log.warning("sandbox %s lost: %s", record.id, err.message)
            raise
        finally:
            self._busy[record.id] -= 1
            if self._busy[record.id] <= 0:
                del self._busy[record.id]
            self.registry.touch(record.id)

    # -- tools -------------------------------------------------------------------------

    async def execute(
        self,
        record: Record,
        command: str,
        *,
        timeout_s: float = 60.0,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
        progress: Progress | None = None,
    ) -> ExecResult:
        request = ExecRequest(
            command=command,
            timeout_s=timeout_s,
            cwd=cwd,
            env=_check_env(env),
            stdin=stdin.encode() if stdin is not None else None,
            output_limit=self.settings.sandbox_output_limit,
        )
        task = asyncio.ensure_future(self._guard(record, self.backend.execute(record.ref, request)))
        if progress is None:
            return await task
        return await self._with_progress(record, task, timeout_s, progress)

    async def _with_progress(self, record: Record, task: asyncio.Future, timeout_s: float, progress: Progress) -> Any:
        """Tell the client the command still runs (and keep the sandbox fresh) every few seconds."""
        start = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.settings.sandbox_progress_interval_s)
                if done:
                    return task.result()
                elapsed = time.monotonic() - start
                self.registry.touch(record.id)
                await progress(min(elapsed, timeout_s), f"running for {elapsed:.0f}s (timeout {timeout_s:g}s)")
        finally:
            if not task.done():
                task.cancel()

    async def read_file(
        self, record: Record, path: str, *, offset: int = 0, limit: int | None = None, encoding: str = "text"
    ) -> dict[str, Any]:
        full = workspace_path(path, self.backend.workdir)
        limit = min(self.settings.sandbox_read_limit if limit is None else limit, self.settings.sandbox_max_file_bytes)
        got = await self._guard(record, self.backend.read(record.ref, full, offset, limit))
        if encoding == "base64":
            content = base64.b64encode(got.data).decode()
        else:
            try:
                content = got.data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InvalidArgument(f"{full} is not UTF-8 text", hint="read it with encoding='base64'") from err
        return {
            "path": full,
            "content": content,
            "encoding": encoding,
            "size": got.size,
            "sha256": got.sha256,
            "offset": offset,
            "length": len(got.data),
            "truncated": offset + len(got.data) < got.size,
        }

    async def write_file(
        self,
        record: Record,
        path: str,
        content: str,
        *,
        encoding: str = "text",
        mode: str | None = None,
        if_sha256: str | None = None,
    ) -> dict[str, Any]:
        full = workspace_path(path, self.backend.workdir)
        data = _decode(content, encoding)
        limit = min(self.settings.sandbox_max_file_bytes, record.ref.spec.disk_mb << 20)
        if len(data) > limit:
            raise InvalidArgument(f"content is {len(data)} bytes; this sandbox accepts files up to {limit} bytes")
        bits = int(mode, 8) if mode else None
        lock = self._locks.setdefault(record.id, asyncio.Lock())
        async with lock:  # compare-and-swap: no other tool call writes in between
            await self._guard(record, self.backend.write(record.ref, full, data, bits, if_sha256))
        return {"path": full, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    async def list_files(self, record: Record, path: str | None, *, depth: int = 1, max_entries: int = 1000) -> dict[str, Any]:
        full = workspace_path(path, self.backend.workdir)
        listing = await self._guard(record, self.backend.list(record.ref, full, depth, max_entries))
        return {"path": full, "entries": [e.model_dump() for e in listing.entries], "truncated": listing.truncated}

    async def destroy(self, sandbox_id: str, keep_workspace: bool = False) -> dict[str, Any]:
        record = self.registry.get(sandbox_id)
        if record is None or record.backend != self.backend.name:
            raise NotFound(f"no sandbox {sandbox_id!r}", hint="call list_sandboxes to see the sandboxes")
        already = record.state == "destroyed"
        if not already:
            await self._reap(record, "destroyed by request", keep_workspace=keep_workspace)
        return {"sandbox_id": sandbox_id, "destroyed": True, "already_destroyed": already}

    def list_sandboxes(self) -> list[dict[str, Any]]:
        out = []
        for record in self.registry.running(self.backend.name):
            item = self.describe(record)
            item["last_used_at"] = iso(record.last_used_at)
            out.append(item)
        return out

    # -- reaping ------------------------------------------------------------------------

    async def _reap(self, record: Record, reason: str, keep_workspace: bool = False) -> None:
        await self.backend.destroy(record.ref, keep_workspace=keep_workspace)
        self.registry.set_state(record.id, "destroyed", reason)
        self._defaults = {c: s for c, s in self._defaults.items() if s != record.id}
        self._locks.pop(record.id, None)
        log.info("sandbox %s destroyed: %s", record.id, reason)

    async def sweep(self) -> list[str]:
        """Destroy idle, expired and lost sandboxes; returns the ids reaped."""
        now, reaped = time.time(), []
        for record in self.registry.running(self.backend.name):
            reason = record.reapable(now)
            if reason is None or self._busy.get(record.id):
                continue
            try:
                await self._reap(record, reason if reason != "lost" else f"lost: {record.reason}")
            except CorralError as err:  # one sandbox that cannot be destroyed now must not shield the rest
                log.warning("could not reap sandbox %s: %s", record.id, err)
                continue
            reaped.append(record.id)
        return reaped

    async def reap_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # the reaper must outlive one bad sweep; the operator sees why
                log.exception("sandbox sweep failed")
            await asyncio.sleep(self.settings.sandbox_reap_interval_s)


def _decode(content: str, encoding: str) -> bytes:
    if encoding == "text":
        return content.encode("utf-8")
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidArgument("content is not valid base64; nothing was written") from err
