"""Where checkpoints are kept: content-addressed blobs plus one manifest delta per checkpoint.

Two implementations: `local.py` (files + SQLite under the data dir: one host) and
`postgres.py` (both in PostgreSQL: every host that shares the database can restore any
checkpoint). The rules they share live here, over five primitive verbs each implements.

Consistency: blobs are stored first, the checkpoint row (its delta and the blobs it
references) in one transaction after. A checkpoint that is not committed is never listed;
a blob nothing references is removed by `gc` once it is older than `GRACE_S` (so a
checkpoint being written, whose blobs are in but whose row is not yet, keeps them).

A sandbox's checkpoints form one chain of deltas (a restored sandbox starts its own chain
with a full manifest), so deleting a sandbox's checkpoints never strands another's.
"""

from __future__ import annotations

import builtins
import secrets
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import NotFound

from .manifest import FULL_EVERY, Delta, Manifest, apply, decode

__all__ = ["GRACE_S", "CheckpointRecord", "CheckpointStore", "new_checkpoint_id"]

GRACE_S = 3600.0


def new_checkpoint_id() -> str:
    return f"ckpt_{secrets.token_hex(10)}"


class CheckpointRecord(BaseModel):
    """A committed checkpoint, as the store keeps it (the tool results are built from this)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    sandbox_id: str
    backend: str
    template: str | None = Field(description="the sandbox's template (its lower layer); None: the host's userland")
    parent: str | None = Field(description="the previous checkpoint of this sandbox's chain")
    depth: int = Field(description="deltas since the chain's last full manifest")
    label: str | None
    created_at: float
    files: int
    files_changed: int
    bytes_added: int
    restored_from: str | None = Field(None, description="the checkpoint this one is a copy of (a restore)")


class CheckpointStore(ABC):
    """Primitive verbs per implementation; the shared rules (chains, caches) in this class."""

    staging: Path  # a host dir for blob files in flight (the same file system as local blobs)

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()  # checkpoint id -> manifest (a few)
        self._lock = threading.Lock()

    # -- primitives ------------------------------------------------------------------

    @abstractmethod
    def put_blob(self, digest: str, data: bytes | Path) -> int:
        """Store `data` under `digest` unless it is there; a staging file is consumed. Returns new bytes."""

    @abstractmethod
    def copy_blob(self, digest: str, fd: int) -> None: ...

    @abstractmethod
    def commit(self, record: CheckpointRecord, raw_delta: bytes, blobs: set[str]) -> None:
        """Atomically: the checkpoint row, its delta, and references to the blobs its delta puts."""

    @abstractmethod
    def get(self, checkpoint_id: str) -> CheckpointRecord | None: ...

    @abstractmethod
    def raw_delta(self, checkpoint_id: str) -> bytes: ...

    @abstractmethod
    def list(self, sandbox_id: str) -> builtins.list[CheckpointRecord]:
        """The sandbox's checkpoints, oldest first."""

    @abstractmethod
    def delete_sandboxes(self, sandbox_ids: builtins.list[str]) -> int:
        """Forget every checkpoint of these sandboxes; returns how many."""

    @abstractmethod
    def idle_sandboxes(self, before: float) -> builtins.list[str]:
        """Sandboxes whose newest checkpoint is older than `before`."""

    @abstractmethod
    def gc(self, grace_s: float = GRACE_S) -> int:
        """Remove blobs no checkpoint references (older than `grace_s`); returns bytes freed."""

    @abstractmethod
    def usage(self) -> int:
        """Bytes of blobs and deltas held."""

    def close(self) -> None:  # noqa: B027 - optional: a store holding no connection has nothing to close
        pass

    # -- shared rules ----------------------------------------------------------------

    def require(self, checkpoint_id: str, backend: str) -> CheckpointRecord:
        record = self.get(checkpoint_id) if checkpoint_id.startswith("ckpt_") else None
        if record is None or record.backend != backend:
            raise NotFound(
                f"no checkpoint {checkpoint_id!r}", hint="call list_checkpoints to see a sandbox's checkpoints"
            )
        return record

    def latest(self, sandbox_id: str) -> CheckpointRecord | None:
        found = self.list(sandbox_id)
        return found[-1] if found else None

    def manifest(self, checkpoint_id: str) -> Manifest:
        """The whole manifest of a checkpoint: its chain's last full one plus the deltas since."""
        with self._lock:
            if (known := self._manifests.get(checkpoint_id)) is not None:
                self._manifests.move_to_end(checkpoint_id)
                return known
        chain: builtins.list[Delta] = []
        current: str | None = checkpoint_id
        while current is not None:
            with self._lock:
                base = self._manifests.get(current)
            if base is not None:
                break
            step = decode(self.raw_delta(current))
            chain.append(step)
            if step.full:
                break
            record = self.get(current)
            current = record.parent if record else None
        manifest: Manifest | None = base
        for step in reversed(chain):
            manifest = apply(manifest, step)
        result = manifest or {}
        self.remember(checkpoint_id, result)
        return result

    def remember(self, checkpoint_id: str, manifest: Manifest) -> None:
        with self._lock:
            self._manifests[checkpoint_id] = manifest
            while len(self._manifests) > 8:
                self._manifests.popitem(last=False)

    @staticmethod
    def next_is_full(parent: CheckpointRecord | None) -> bool:
        return parent is None or parent.depth + 1 >= FULL_EVERY
