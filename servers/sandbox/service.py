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
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import CorralError, InvalidArgument, NotFound, SandboxLost, Timeout

from .backend import (
    Backend,
    Destroyed,
    ExecOutcome,
    ExecRequest,
    FileListing,
    FileRead,
    FileWritten,
    ListedSandbox,
    SandboxInfo,
    SandboxList,
    SandboxSpec,
    iso,
    workspace_path,
)  # fmt: skip
from .checkpointing import Checkpointer
from .checkpoints.store import CheckpointStore
from .config import SandboxSettings
from .processes import ProcessInfo, ProcessOutput, Signal, new_process_id, sandbox_of
from .registry import Record, Registry

__all__ = ["Resources", "SandboxService", "iso"]

log = logging.getLogger("corral.sandbox")
Progress = Callable[[float, str], Awaitable[None]]
T = TypeVar("T")


class Resources(BaseModel):
    """What a client may ask of a sandbox: at most the operator's setting for each (the default)."""

    model_config = ConfigDict(extra="forbid")

    cpus: float | None = Field(
        None,
        gt=0,
        le=64,
        description="CPUs (docker, e2b; bubblewrap does not cap CPU share); at most the server's limit",
    )
    memory_mb: int | None = Field(None, gt=0, le=1 << 20, description="memory in MiB; at most the server's limit")
    disk_mb: int | None = Field(
        None, gt=0, le=1 << 20, description="largest file a command may write, MiB; at most the server's limit"
    )
    ttl_s: int | None = Field(None, gt=0, le=30 * 86400, description="lifetime in seconds; at most the server's limit")
    idle_timeout_s: int | None = Field(
        None, gt=0, le=30 * 86400, description="reaped after this long unused; at most the server's limit"
    )


def _check_env(env: dict[str, str] | None) -> dict[str, str]:
    for key, value in (env or {}).items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidArgument(f"bad environment variable name or value: {key!r}")
    return dict(env or {})


class SandboxService:
    def __init__(
        self,
        backend: Backend,
        registry: Registry,
        settings: SandboxSettings,
        checkpoints: CheckpointStore | None = None,
    ) -> None:
        self.backend = backend
        self.checkpoints = Checkpointer(self, checkpoints) if checkpoints is not None else None
        self._notices: dict[str, str] = {}  # sandbox id -> what its next execute should say
        self.registry = registry
        self.settings = settings
        self._defaults: dict[str, str] = {}  # client key -> its lazy default sandbox
        self._busy: Counter[str] = Counter()  # sandbox id -> calls in flight (never reaped while busy)
        self._locks: dict[str, asyncio.Lock] = {}
        self._key_locks: dict[
            str, tuple[asyncio.Lock, list[int]]
        ] = {}  # idempotency key / client default -> (lock, [users])
        self._file_slots: dict[str, asyncio.Semaphore] = {}  # sandbox id -> its file operations' slots
        self._serving = 0  # transports running the server now (see `running`)
        self._reaper: asyncio.Task[None] | None = None

    # -- provision / resolve -------------------------------------------------------------

    def _spec(self, template: str | None, resources: Resources, env: dict[str, str], network: str) -> SandboxSpec:
        """The operator's limits, lowered where the client asked: they are ceilings, never raised."""
        if template is not None and (
            template.startswith("-") or not template.strip() or any(c.isspace() or c == "\0" for c in template)
        ):
            # Never a flag on a backend's command line (`docker run --privileged`), on any backend.
            raise InvalidArgument(
                f"template {template!r} looks like a flag, not a name", hint="name a template or image"
            )
        spec = self.settings.spec(template=template, env=env, network=network)
        ceilings = {**spec.model_dump(), "idle_timeout_s": self.settings.sandbox_idle_timeout_s}
        asked = resources.model_dump(exclude_none=True)
        over = [
            f"{key}={value:g} (at most {ceilings[key]:g})" for key, value in asked.items() if value > ceilings[key]
        ]  # :g: 2.0 -> 2
        if over:
            raise InvalidArgument(
                f"resources above this server's limits: {', '.join(over)}; nothing was provisioned",
                hint="ask for at most the maximum, or leave the field out to get it",
            )
        asked.pop("idle_timeout_s", None)
        return spec.model_copy(update=asked)

    async def provision(
        self,
        *,
        template: str | None = None,
        resources: Resources | None = None,
        env: dict[str, str] | None = None,
        network: Literal["none", "full"] = "none",
        label: str | None = None,
        idempotency_key: str | None = None,
    ) -> SandboxInfo:
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
            try:
                self.registry.add(record)
            except Exception:  # unrecorded, nobody could reach or reap it (a full disk): take it down
                await self.backend.destroy(ref)
                raise
        log.info("provisioned %s on %s", sandbox_id, self.backend.name)
        return self.describe(record)

    def describe(self, record: Record) -> SandboxInfo:
        return SandboxInfo(
            sandbox_id=record.id,
            backend=record.backend,
            isolation=self.backend.isolation,
            limits=self.backend.limits_scope,
            state=record.state,
            label=record.label,
            network=record.ref.spec.network,
            created_at=iso(record.created_at),
            expires_at=iso(record.expires_at),
            workdir=self.backend.workdir,
        )

    async def resolve(
        self, sandbox_id: str | None, client: str, *, create: bool = True, checkpoint: str | None = None
    ) -> Record:
        """The record a call acts on: the given sandbox, or the caller's default, made now if
        needed unless `create` is False (a read-only tool changes nothing, not even that).

        `checkpoint` is the state the caller's log says its default sandbox holds: a default
        sandbox that is missing (a forked session, another host) is restored from it, and one
        whose last checkpoint is another is put back to it."""
        if sandbox_id is None:
            sandbox_id = await self._default_for(client, create=create, checkpoint=checkpoint)
        record = self.registry.get(sandbox_id)
        if record is None or record.backend != self.backend.name:
            raise NotFound(f"no sandbox {sandbox_id!r}", hint="call list_sandboxes, or provision a new one")
        if record.state != "running":
            raise SandboxLost(
                f"sandbox {sandbox_id} is {record.state}" + (f" ({record.reason})" if record.reason else "")
            )
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

    async def _default_for(self, client: str, *, create: bool = True, checkpoint: str | None = None) -> str:
        """The caller's default sandbox, provisioned on first need (nothing exists at connect time)."""
        async with self._lock_for(f"default:{client}"):  # two first calls at once make one sandbox
            known = self._defaults.get(client) or self.registry.bound(self.backend.name, client)
            if known and (record := self.registry.get(known)) and record.state == "running":
                self._defaults[client] = known
                await self._catch_up(record, checkpoint)
                return known
            # A fork, a move to this host, a lost sandbox: its log names a state, which exists, so even a
            # read (which never makes an empty sandbox) gets it.
            if checkpoint and (restored := await self._restore_default(client, checkpoint)):
                return restored
            if known:
                self._forget_default(known)
                if record is not None and record.reason != "destroyed by request":
                    # Its files are gone: say so once rather than carry on in an empty sandbox.
                    raise SandboxLost(
                        f"your default sandbox {known} is {record.state} ({record.reason}): its files and processes are gone",
                        hint="call again: the next call gets a fresh default sandbox",
                    )
            if not create:
                raise NotFound(
                    "you have no default sandbox yet, so there is nothing to read",
                    hint="execute, write_file or provision creates one; or pass sandbox_id",
                )
            created = (await self.provision(label="default")).sandbox_id
            self._defaults[client] = created
            self.registry.bind(self.backend.name, client, created)
            return created

    async def _catch_up(self, record: Record, checkpoint: str | None) -> None:
        """Put a default sandbox that ran ahead of its caller's log back to the state the log names.
        Asked on every call: the common case (it holds that state) is a comparison of ids."""
        checkpoints = self.checkpoints
        if checkpoint is None or checkpoints is None or self.backend.native_checkpoints:
            return  # (a provider snapshot cannot roll a sandbox back)
        if checkpoints.holds(record.id, checkpoint):
            return
        saved = await asyncio.to_thread(checkpoints.known, checkpoint)
        if saved is None:  # not in this server's store: nothing to go back to
            return
        await checkpoints.restore_into(record, saved)
        self._notices[record.id] = (
            f"the workspace was put back to checkpoint {saved.id}, the state your session's log names; "
            "its processes were stopped"
        )

    async def _restore_default(self, client: str, checkpoint: str) -> str | None:
        """A new default sandbox in the state `checkpoint` names, if this server's store has it."""
        checkpoints = self.checkpoints
        if checkpoints is None or (saved := await asyncio.to_thread(checkpoints.known, checkpoint)) is None:
            return None
        restored = await checkpoints.restore(saved.id, label="default")
        self._defaults[client] = restored.sandbox_id
        self.registry.bind(self.backend.name, client, restored.sandbox_id)
        self._notices[restored.sandbox_id] = (
            f"this sandbox was restored from checkpoint {saved.id}, the state your session's log names "
            "(files only: background processes are not part of a checkpoint)"
        )
        return restored.sandbox_id

    def _forget_default(self, sandbox_id: str) -> None:
        self._defaults = {c: s for c, s in self._defaults.items() if s != sandbox_id}
        self.registry.unbind(sandbox_id)

    async def _guard(self, record: Record, work: Awaitable[Any]) -> Any:
        """Run one backend call on `record`: busy while running; lost means lost for good."""
        self._busy[record.id] += 1
        self.registry.touch(record.id)
        try:
            return await work
        except SandboxLost as err:
            self.registry.set_state(record.id, "lost", err.message)
            self._forget_default(record.id)
            log.warning("sandbox %s lost: %s", record.id, err.message)
            raise
        finally:
            self._busy[record.id] -= 1
            if self._busy[record.id] <= 0:
                del self._busy[record.id]
            self.registry.touch(record.id)

    async def _file_op(self, record: Record, work: Coroutine[Any, Any, T], what: str) -> T:
        """One file operation: at most `sandbox_file_concurrency` per sandbox at once (file work
        runs in the shared thread pool: one sandbox must not take every thread), and a deadline.

        A slot is held until the work really ends, even when the caller has stopped waiting, so
        a sandbox whose operations overrun cannot start more of them meanwhile."""
        slots = self._file_slots.setdefault(record.id, asyncio.Semaphore(self.settings.sandbox_file_concurrency))
        await slots.acquire()
        task = asyncio.ensure_future(self._guard(record, work))
        task.add_done_callback(lambda done: _release(slots, done))
        timeout = self.settings.sandbox_file_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise Timeout(
                f"{what} did not finish within {timeout:g}s; its outcome is unknown",
                hint="check the state; read less at once, or list a smaller directory",
            ) from None

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
    ) -> ExecOutcome:
        request = ExecRequest(
            command=command,
            timeout_s=timeout_s,
            cwd=cwd,
            env=_check_env(env),
            stdin=stdin.encode() if stdin is not None else None,
            output_limit=self.settings.sandbox_output_limit,
        )
        task = asyncio.ensure_future(self._guard(record, self.backend.execute(record.ref, request)))
        result = await task if progress is None else await self._with_progress(record, task, timeout_s, progress)
        if (notice := self._notices.pop(record.id, None)) is not None:
            result.notice = f"{notice}; {result.notice}" if result.notice else notice
        return ExecOutcome(sandbox_id=record.id, **result.model_dump())

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
    ) -> FileRead:
        full = workspace_path(path, self.backend.workdir)
        limit = min(self.settings.sandbox_read_limit if limit is None else limit, self.settings.sandbox_max_file_bytes)
        got = await self._file_op(
            record,
            self.backend.read(record.ref, full, offset, limit, self.settings.sandbox_max_file_bytes),
            f"read_file {full}",
        )
        if encoding == "base64":
            content = base64.b64encode(got.data).decode()
        else:
            try:
                content = got.data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InvalidArgument(f"{full} is not UTF-8 text", hint="read it with encoding='base64'") from err
        return FileRead(
            sandbox_id=record.id,
            path=full,
            content=content,
            encoding=encoding,
            size=got.size,
            sha256=got.sha256,
            offset=offset,
            length=len(got.data),
            truncated=offset + len(got.data) < got.size,
        )

    async def write_file(
        self,
        record: Record,
        path: str,
        content: str,
        *,
        encoding: str = "text",
        mode: str | None = None,
        if_sha256: str | None = None,
    ) -> FileWritten:
        full = workspace_path(path, self.backend.workdir)
        data = _decode(content, encoding)
        limit = min(self.settings.sandbox_max_file_bytes, record.ref.spec.disk_mb << 20)
        if len(data) > limit:
            raise InvalidArgument(f"content is {len(data)} bytes; this sandbox accepts files up to {limit} bytes")
        bits = int(mode, 8) if mode else None
        lock = self._locks.setdefault(record.id, asyncio.Lock())
        async with lock:  # compare-and-swap: no other tool call writes in between
            await self._file_op(
                record, self.backend.write(record.ref, full, data, bits, if_sha256), f"write_file {full}"
            )
        return FileWritten(sandbox_id=record.id, path=full, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    async def list_files(
        self, record: Record, path: str | None, *, depth: int = 1, max_entries: int = 1000
    ) -> FileListing:
        full = workspace_path(path, self.backend.workdir)
        listing = await self._file_op(
            record, self.backend.list(record.ref, full, depth, max_entries), f"list_files {full}"
        )
        return FileListing(sandbox_id=record.id, path=full, entries=listing.entries, truncated=listing.truncated)

    async def destroy(self, sandbox_id: str, keep_workspace: bool = False) -> Destroyed:
        record = self.registry.get(sandbox_id)
        if record is None or record.backend != self.backend.name:
            raise NotFound(f"no sandbox {sandbox_id!r}", hint="call list_sandboxes to see the sandboxes")
        already = record.state == "destroyed"
        if not already:
            await self._reap(record, "destroyed by request", keep_workspace=keep_workspace)
        return Destroyed(sandbox_id=sandbox_id, destroyed=True, already_destroyed=already)

    def list_sandboxes(self, cursor: str | None = None, limit: int = 100) -> SandboxList:
        """One page of live sandboxes, oldest first; `next_cursor` continues after its last."""
        records = self.registry.page(self.backend.name, _decode_cursor(cursor) if cursor else None, limit + 1)
        more, records = len(records) > limit, records[:limit]
        return SandboxList(
            sandboxes=[
                ListedSandbox(**self.describe(r).model_dump(), last_used_at=iso(r.last_used_at)) for r in records
            ],
            next_cursor=_encode_cursor(records[-1]) if more else None,
        )

    # -- background processes --------------------------------------------------------

    async def start_process(
        self, record: Record, command: str, *, cwd: str | None = None, env: dict[str, str] | None = None
    ) -> ProcessInfo:
        request = ExecRequest(
            command=command, cwd=cwd, env=_check_env(env), output_limit=self.settings.sandbox_output_limit
        )
        process_id = new_process_id(record.id)
        return await self._guard(record, self.backend.start_process(record.ref, request, process_id))

    async def processes(self, record: Record) -> list[ProcessInfo]:
        return await self._guard(record, self.backend.list_processes(record.ref))

    async def _owner(self, process_id: str) -> Record:
        """The sandbox a process id names; its sandbox must be this server's and alive."""
        sandbox_id = sandbox_of(process_id)
        record = self.registry.get(sandbox_id)
        if record is None or record.backend != self.backend.name:
            raise NotFound(f"no process {process_id!r}", hint="call processes to list the background processes")
        return await self.resolve(sandbox_id, "")

    async def process_output(
        self, process_id: str, *, offset: int = 0, stderr_offset: int = 0, limit: int | None = None
    ) -> ProcessOutput:
        record = await self._owner(process_id)
        limit = min(limit or self.settings.sandbox_output_limit, self.settings.sandbox_read_limit)
        work = self.backend.process_output(record.ref, process_id, offset, stderr_offset, limit)
        return await self._guard(record, work)

    async def kill_process(self, process_id: str, signal: Signal = "TERM") -> ProcessInfo:
        record = await self._owner(process_id)
        return await self._guard(record, self.backend.kill_process(record.ref, process_id, signal))

    # -- reaping ------------------------------------------------------------------------

    async def _reap(self, record: Record, reason: str, keep_workspace: bool = False) -> None:
        await self.backend.destroy(record.ref, keep_workspace=keep_workspace)
        self.registry.set_state(record.id, "destroyed", reason)
        self._forget_default(record.id)
        self._locks.pop(record.id, None)
        self._file_slots.pop(record.id, None)
        self._notices.pop(record.id, None)
        if self.checkpoints is not None:  # its checkpoints stay: the session's log names them (see prune)
            self.checkpoints.forget([record.id])
        log.info("sandbox %s destroyed: %s", record.id, reason)

    async def sweep(self) -> list[str]:
        """Destroy idle, expired and lost sandboxes and forget old tombstones; returns the ids
        reaped. The registry's queries run in a thread: a sweep never stalls the event loop."""
        now, reaped = time.time(), []
        retention = self.settings.sandbox_tombstone_retention_s
        await asyncio.to_thread(self.registry.prune, self.backend.name, now - retention)
        if self.checkpoints is not None:
            running = {r.id for r in await asyncio.to_thread(self.registry.running, self.backend.name)}
            before = now - self.settings.checkpoint_retention_s
            try:
                snapshots = await asyncio.to_thread(self.checkpoints.prune, before, running)
            except CorralError as err:  # a store that is away must not stop the reaping below
                log.warning("could not prune checkpoints: %s", err)
                snapshots = []
            for snapshot in snapshots:
                try:
                    await self.backend.delete_native(snapshot)
                except CorralError as err:  # kept at the provider; the operator sees which
                    log.warning("could not delete %s snapshot %s: %s", self.backend.name, snapshot, err)
        for record in await asyncio.to_thread(self.registry.reapable, self.backend.name, now):
            reason = record.reapable(now)
            if reason is None or self._busy.get(record.id):
                continue
            if reason == "idle" and await self.backend.active(record.ref):
                continue  # a background process still runs: that is use (the TTL still ends it)
            try:
                await self._reap(record, reason if reason != "lost" else f"lost: {record.reason}")
            except CorralError as err:  # one sandbox that cannot be destroyed now must not shield the rest
                log.warning("could not reap sandbox %s: %s", record.id, err)
                continue
            reaped.append(record.id)
        return reaped

    @contextlib.asynccontextmanager
    async def running(self, *, reap: bool = True) -> AsyncIterator[None]:
        """The server's lifetime: the reaper runs while it serves, and the backend and the
        registry are closed when the last transport serving it ends (an in-process server
        runs once per client, so uses are counted)."""
        self._serving += 1
        if self._serving == 1 and reap:
            self._reaper = asyncio.create_task(self.reap_forever())
        try:
            yield
        finally:
            self._serving -= 1
            if not self._serving:
                await self._shut_down()

    async def _shut_down(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await self.backend.close()
        self.registry.close()
        if self.checkpoints is not None:
            self.checkpoints.store.close()

    async def reap_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # the reaper must outlive one bad sweep; the operator sees why
                log.exception("sandbox sweep failed")
            await asyncio.sleep(self.settings.sandbox_reap_interval_s)


def _encode_cursor(record: Record) -> str:
    return base64.urlsafe_b64encode(json.dumps([record.created_at, record.id]).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, sandbox_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(created_at), str(sandbox_id)
    except (ValueError, TypeError) as err:
        raise InvalidArgument(
            "cursor is not one list_sandboxes returned", hint="pass next_cursor as it came, or omit it"
        ) from err


def _release(slots: asyncio.Semaphore, done: asyncio.Future[Any]) -> None:
    """Free a file slot when its work ends; an outcome nobody waits for any more is dropped here."""
    slots.release()
    if not done.cancelled():
        done.exception()  # retrieved: a late failure of abandoned work is not an "unhandled" error


def _decode(content: str, encoding: str) -> bytes:
    if encoding == "text":
        return content.encode("utf-8")
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidArgument("content is not valid base64; nothing was written") from err
