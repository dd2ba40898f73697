"""Checkpoints under bad input, on bubblewrap, through an MCP client: unknown, malformed and
foreign ids, a removed template, a 2 GB sparse file, 100,000 files, the caps, symlinks that
point out, FIFOs, sockets and device nodes, a file rewritten while it is captured, a server
killed mid-checkpoint, and what garbage collection frees. Each is a clear error (or a note)
and loses nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import StdioServerParameters
from mcp.client import Client

from corral.servers.sandbox.checkpoints.local import LocalCheckpointStore
from corral.servers.sandbox.checkpoints.store import CheckpointRecord, CheckpointStore
from corral.servers.sandbox.config import SandboxSettings
from corral.servers.sandbox.templates import TemplateStore
from tests.conftest import until
from tests.parts import corral_exe

from .conftest import Harness, _cleanup, call, fail

pytestmark = [pytest.mark.anyio, pytest.mark.requires("bwrap")]

GIB = 1 << 30


def workspace(h: Harness, sid: str) -> Path:
    return h.settings.sandbox_dir / sid / "workspace"


def store_of(h: Harness) -> CheckpointStore:
    assert h.service.checkpoints is not None
    return h.service.checkpoints.store


def blob_files(root: Path) -> dict[str, Path]:
    """digest -> file of every blob a local store holds."""
    return {p.name: p for p in (root / "blobs").glob("*/*")}


def referenced(root: Path) -> set[str]:
    """The blobs the store's committed checkpoints reference (read straight from its index)."""
    store = LocalCheckpointStore(root, 1 << 40)
    try:
        return {r[0] for r in store._db.execute("SELECT digest FROM refs")}
    finally:
        store.close()


def local_root(settings: SandboxSettings) -> Path:
    return settings.sandboxes_dir() / "checkpoints"


@pytest.fixture
def capped(request: pytest.FixtureRequest, settings: SandboxSettings, needs_bwrap: None) -> Iterator[Harness]:
    """A bubblewrap server whose settings the test overrides (`@pytest.mark.settings(...)`)."""
    marker = request.node.get_closest_marker("settings")
    h = Harness("bubblewrap", settings.model_copy(update=marker.kwargs if marker else {}))
    yield h
    _cleanup(h)


# -- ids ---------------------------------------------------------------------------------


async def test_unknown_malformed_and_foreign_ids_are_not_found_and_lose_nothing(bw: Harness) -> None:
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="kept.txt", content="kept\n")
        good = (await call(c, "checkpoint", sandbox_id=sid, label="good"))["checkpoint_id"]
        for bad in ("ckpt_00000000000000000000", "../../etc/passwd", "", "ckpt_'; DROP TABLE checkpoints; --", "x" * 5000):
            text = await fail(c, "restore", "not_found", checkpoint_id=bad)
            assert "no checkpoint" in text and "list_checkpoints" in text, text
        # A checkpoint another backend wrote into a shared store: never restored by this one.
        store = store_of(bw)
        mine = store.get(good)
        assert mine is not None
        foreign = mine.model_copy(update={"id": "ckpt_" + "d0" * 10, "backend": "docker", "sandbox_id": "sb_other"})
        store.commit(foreign, store.raw_delta(good), set())
        text = await fail(c, "restore", "not_found", checkpoint_id=foreign.id)
        assert foreign.id in text, text
        # Nothing was lost or made: the good checkpoint is still listed and restores.
        listed = (await call(c, "list_checkpoints", sandbox_id=sid))["checkpoints"]
        assert [k["checkpoint_id"] for k in listed] == [good]
        assert len((await call(c, "list_sandboxes"))["sandboxes"]) == 1  # no half-made sandbox left
        back = (await call(c, "restore", checkpoint_id=good))["sandbox_id"]
        assert (await call(c, "read_file", sandbox_id=back, path="kept.txt"))["content"] == "kept\n"


# -- a removed template ----------------------------------------------------------------


def owner(h: Harness) -> int | None:
    """As root, the template belongs to the sandbox uid (what `corral sandbox templates add` does)."""
    return h.settings.sandbox_run_as_uid if os.geteuid() == 0 else None


@pytest.fixture
def tpl(settings: SandboxSettings, sandbox_root: Path, needs_bwrap: None) -> Iterator[tuple[Harness, TemplateStore, Path]]:
    """A server with templates, and a tiny busybox root filesystem registered as `box`."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed: no small root filesystem to register")
    templates = sandbox_root.parent / f"templates-{uuid.uuid4().hex[:8]}"
    source = sandbox_root.parent / f"rootfs-{uuid.uuid4().hex[:8]}"
    (source / "bin").mkdir(parents=True)
    shutil.copy2(busybox, source / "bin" / "busybox")
    for tool in ("sh", "cat", "echo", "ls", "mkdir", "rm"):
        (source / "bin" / tool).symlink_to("busybox")
    h = Harness("bubblewrap", settings.model_copy(update={"sandbox_templates_dir": templates}))
    store = TemplateStore(templates)
    store.add("box", rootfs=source, owner=owner(h))
    yield h, store, source
    _cleanup(h)
    shutil.rmtree(templates, ignore_errors=True)
    shutil.rmtree(source, ignore_errors=True)


async def test_restore_of_a_checkpoint_whose_template_was_removed_names_the_template(
    tpl: tuple[Harness, TemplateStore, Path],
) -> None:
    h, templates, source = tpl
    async with h.client() as c:
        sid = (await call(c, "provision", template="box"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="echo on-box > note.txt")
        ckpt = (await call(c, "checkpoint", sandbox_id=sid))["checkpoint_id"]
        await call(c, "destroy", sandbox_id=sid)  # a template in use cannot be removed
        templates.remove("box")
        text = await fail(c, "restore", "not_found", checkpoint_id=ckpt)
        assert "'box'" in text and "not registered" in text and "templates add" in text, text
        assert (await call(c, "list_sandboxes"))["sandboxes"] == []  # no sandbox half made
        # Nothing lost: the checkpoint is still listed, and restores once the template is back.
        assert [k["checkpoint_id"] for k in (await call(c, "list_checkpoints", sandbox_id=sid))["checkpoints"]] == [
            ckpt
        ]
        templates.add("box", rootfs=source, owner=owner(h))
        back = (await call(c, "restore", checkpoint_id=ckpt))["sandbox_id"]
        assert (await call(c, "execute", sandbox_id=back, command="cat note.txt"))["stdout"] == "on-box\n"
