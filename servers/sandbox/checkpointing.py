"""The checkpoint tools' logic: checkpoint, list_checkpoints, restore, and the workspace a
caller's log names.

A checkpoint is taken by the backend's `snapshot` (incremental: the stat cache of the
sandbox's previous checkpoint is kept in memory, so only files that changed are read),
stored as a manifest delta plus new blobs, under a storage cap. Restoring gives a new
sandbox of the same template (or the same sandbox, `in_place`) exactly that state, and
records a checkpoint of it at once, so its next checkpoint is incremental again and its
`restored_from` tells which state it holds.

Running processes are not part of a checkpoint: an in-place restore stops them.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import CorralError, InvalidArgument, NotFound, Unavailable

from .backend import Backend, Destroyed, SandboxInfo, iso
from .checkpoints.manifest import Manifest, blobs_of, delta, encode
from .checkpoints.store import CheckpointRecord, CheckpointStore, new_checkpoint_id
from .checkpoints.tree import StatCache
from .config import SandboxSettings
from .registry import Record

T = TypeVar("T")


class Host(Protocol):
    """What checkpointing needs of the sandbox service (`service.SandboxService`)."""

    backend: Backend
    settings: SandboxSettings

    async def provision(self, *, template: str | None = None, label: str | None = None) -> SandboxInfo: ...

    async def resolve(self, sandbox_id: str | None, client: str) -> Record: ...

    async def destroy(self, sandbox_id: str) -> Destroyed: ...

    async def _guard(self, record: Record, work: Awaitable[T]) -> T: ...


__all__ = ["CheckpointInfo", "CheckpointList", "Checkpointer", "Restored"]

log = logging.getLogger("corral.sandbox")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointInfo(_Model):
    checkpoint_id: str
    sandbox_id: str
    label: str | None
    parent: str | None = Field(description="the sandbox's previous checkpoint")
    restored_from: str | None = Field(description="set when this checkpoint records a restore of that one")
    created_at: str = Field(description="ISO 8601, UTC")
    files: int = Field(description="files, dirs and links captured")
    files_changed: int = Field(description="added or changed since the previous checkpoint")
    bytes_added: int = Field(description="new content stored (content already stored anywhere is not stored again)")
    duration_ms: int | None = Field(None, description="how long taking it took (absent in listings)")
    skipped: builtins.list[str] = Field(
        default_factory=list, description="what was not captured (sockets, device nodes)"
    )


class CheckpointList(_Model):
    sandbox_id: str
    checkpoints: builtins.list[CheckpointInfo] = Field(description="oldest first")


class Restored(_Model):
    sandbox_id: str = Field(description="the sandbox now in the checkpoint's state")
    checkpoint_id: str
    in_place: bool
    notice: str | None = Field(None, description="what the caller should know (processes were stopped)")


def info(
    record: CheckpointRecord, duration_ms: int | None = None, skipped: builtins.list[str] | None = None
) -> CheckpointInfo:
    return CheckpointInfo(
        checkpoint_id=record.id,
        sandbox_id=record.sandbox_id,
        label=record.label,
        parent=record.parent,
        restored_from=record.restored_from,
        created_at=iso(record.created_at),
        files=record.files,
        files_changed=record.files_changed,
        bytes_added=record.bytes_added,
        duration_ms=duration_ms,
        skipped=skipped or [],
    )


class _Capped:
    """The store as the scan's blob sink, refusing content past the storage cap."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self.staging: Path = store.staging
        self.added = 0

    def put_blob(self, digest: str, data: bytes | Path) -> int:
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        if self.store.usage() + size > self.store.cap_bytes:
            if isinstance(data, Path):
                data.unlink(missing_ok=True)
            raise Unavailable(
                f"the checkpoint store is full ({self.store.usage() >> 20} MiB of its {self.store.cap_bytes >> 20} MiB "
                "cap); no checkpoint was taken, the sandbox is unchanged",
                hint="delete old sandboxes' checkpoints, or raise CORRAL_CHECKPOINT_MAX_MB",
            )
        added = self.store.put_blob(digest, data)
        self.added += added
        return added


class Checkpointer:
    def __init__(self, service: Host, store: CheckpointStore) -> None:
        self.service = service
        self.store = store
        self.backend = service.backend
        self._caches: dict[str, tuple[str, StatCache]] = {}  # sandbox id -> (its checkpoint, stat cache)
        self._locks: dict[str, asyncio.Lock] = {}
        self._heads: dict[str, CheckpointRecord] = {}  # sandbox id -> its latest checkpoint
        self._gc_at = float("-inf")

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    async def checkpoint(self, record: Record, label: str | None = None) -> CheckpointInfo:
        started = time.monotonic()
        async with self._lock(record.id):
            parent = await asyncio.to_thread(self.head, record.id)
            if self.backend.native_checkpoints:  # the provider keeps the files: we keep its snapshot's id
                snapshot = await self.service._guard(record, self.backend.snapshot_native(record.ref))
                saved = await asyncio.to_thread(self._commit, record, parent, {}, label, 0, 0, None, snapshot)
                return info(saved, round((time.monotonic() - started) * 1000))
            cached = self._caches.get(record.id)
            previous = cached[1] if cached and parent and cached[0] == parent.id else None
            sink = _Capped(self.store)
            scan = await self.service._guard(
                record,
                self.backend.snapshot(record.ref, sink, previous, self.service.settings.checkpoint_max_files),
            )
            saved = await asyncio.to_thread(
                self._commit, record, parent, scan.manifest, label, scan.files_changed, sink.added, None
            )
            self._caches[record.id] = (saved.id, scan.cache)
        return info(saved, round((time.monotonic() - started) * 1000), scan.skipped)

    def _commit(
        self,
        record: Record,
        parent: CheckpointRecord | None,
        manifest: Manifest,
        label: str | None,
        changed: int,
        added: int,
        restored_from: str | None,
        native: str | None = None,
    ) -> CheckpointRecord:
        full = self.store.next_is_full(parent)
        old = self.store.manifest(parent.id) if parent and not full else None
        step = delta(old, manifest, full=full)
        saved = CheckpointRecord(
            id=new_checkpoint_id(),
            sandbox_id=record.id,
            backend=record.backend,
            template=record.ref.spec.template,
            parent=parent.id if parent else None,
            depth=0 if step.full else (parent.depth + 1 if parent else 0),
            label=label,
            created_at=time.time(),
            files=len(manifest),
            files_changed=changed,
            bytes_added=added,
            restored_from=restored_from,
            native=native,
        )
        self.store.commit(saved, encode(step), blobs_of(step.put.values()))
        self.store.remember(saved.id, manifest)
        self._heads[record.id] = saved
        return saved

    async def list(self, record: Record) -> CheckpointList:
        found = await asyncio.to_thread(self.store.list, record.id)
        return CheckpointList(sandbox_id=record.id, checkpoints=[info(c) for c in found])

    async def restore(self, checkpoint_id: str, *, in_place: bool = False, label: str | None = None) -> Restored:
        saved = await asyncio.to_thread(self.store.require, checkpoint_id, self.backend.name)
        if self.backend.native_checkpoints:
            return await self._restore_native(saved, in_place=in_place, label=label)
        if in_place:
            record = await self.service.resolve(saved.sandbox_id, "")  # sandbox_lost if it is gone
        else:
            try:
                made = await self.service.provision(template=saved.template, label=label or f"restored {checkpoint_id}")
            except NotFound as err:
                raise NotFound(
                    f"checkpoint {checkpoint_id} was taken on template {saved.template!r}, which is not registered "
                    f"any more: {err.message}",
                    hint="register the template again (corral sandbox templates add), then restore",
                ) from err
            record = await self.service.resolve(made.sandbox_id, "")
        try:
            await self.restore_into(record, saved)
        except CorralError:
            if not in_place:
                await self.service.destroy(record.id)
            raise
        notice = None
        if in_place:
            notice = f"sandbox {record.id} is back at checkpoint {checkpoint_id}; its processes were stopped"
        return Restored(sandbox_id=record.id, checkpoint_id=checkpoint_id, in_place=in_place, notice=notice)

    async def _restore_native(self, saved: CheckpointRecord, *, in_place: bool, label: str | None) -> Restored:
        """A provider snapshot (e2b) starts a new sandbox; it cannot roll one back."""
        if in_place:
            raise InvalidArgument(
                f"the {self.backend.name} backend restores a checkpoint into a new sandbox only",
                hint="call restore with in_place=false",
            )
        snapshot = await asyncio.to_thread(self._native_of, saved)
        made = await self.service.provision(template=snapshot, label=label or f"restored {saved.id}")
        record = await self.service.resolve(made.sandbox_id, "")
        await asyncio.to_thread(self._commit, record, None, {}, None, 0, 0, saved.id)
        return Restored(sandbox_id=record.id, checkpoint_id=saved.id, in_place=False)

    def _native_of(self, saved: CheckpointRecord) -> str:
        """The provider snapshot holding a checkpoint's files (a restore's checkpoint names its source)."""
        seen: CheckpointRecord | None = saved
        while seen is not None and seen.native is None and seen.restored_from:
            seen = self.store.get(seen.restored_from)
        if seen is None or seen.native is None:
            raise NotFound(f"checkpoint {saved.id}'s snapshot is gone (its source was deleted)")
        return seen.native

    async def restore_into(self, record: Record, saved: CheckpointRecord) -> None:
        async with self._lock(record.id):
            manifest = await asyncio.to_thread(self.store.manifest, saved.id)
            if saved.template != record.ref.spec.template:
                raise InvalidArgument(
                    f"checkpoint {saved.id} is of template {saved.template!r}, sandbox {record.id} of "
                    f"{record.ref.spec.template!r}",
                    hint="restore it into a new sandbox (in_place=false)",
                )
            cache = await self.service._guard(record, self.backend.restore_files(record.ref, manifest, self.store))
            parent = await asyncio.to_thread(self.head, record.id)
            mark = await asyncio.to_thread(self._commit, record, parent, manifest, None, 0, 0, saved.id)
            self._caches[record.id] = (mark.id, cache)

    # -- the workspace a caller's log names -------------------------------------------

    def head(self, sandbox_id: str) -> CheckpointRecord | None:
        if sandbox_id not in self._heads:
            latest = self.store.latest(sandbox_id)
            if latest is None:
                return None
            self._heads[sandbox_id] = latest
        return self._heads[sandbox_id]

    def holds(self, sandbox_id: str, checkpoint_id: str) -> bool:
        """Whether the sandbox's files are (as of its last checkpoint) the state `checkpoint_id` names."""
        head = self.head(sandbox_id)
        return head is not None and checkpoint_id in (head.id, head.restored_from)

    def known(self, checkpoint_id: str) -> CheckpointRecord | None:
        try:
            return self.store.require(checkpoint_id, self.backend.name)
        except NotFound:
            return None

    def forget(self, sandbox_ids: builtins.list[str]) -> None:
        for sandbox_id in sandbox_ids:
            self._caches.pop(sandbox_id, None)
            self._locks.pop(sandbox_id, None)
            self._heads.pop(sandbox_id, None)

    def prune(self, before: float, running: set[str]) -> builtins.list[str]:
        """Delete the checkpoints of sandboxes no longer running whose last one is older than
        `before`; returns the provider snapshots (e2b) they held, for the caller to delete."""
        stale = [s for s in self.store.idle_sandboxes(before) if s not in running]
        natives = (
            [c.native for s in stale for c in self.store.list(s) if c.native] if self.backend.native_checkpoints else []
        )
        gone = self.store.delete_sandboxes(stale) if stale else 0
        if gone or time.monotonic() - self._gc_at > 3600:  # also what a crash left: blobs of no checkpoint
            self.store.gc()
            self._gc_at = time.monotonic()
        return natives
