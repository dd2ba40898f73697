"""Hands that move between machines: two sandbox servers that share nothing but PostgreSQL
(each its own CORRAL_HOME, sandbox root and registry). A session's sandbox checkpointed on
host A, whose host then dies, continues on host B with its files restored from the store."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import StdioServerParameters
from mcp.client import Client

from corral.servers.sandbox.config import SandboxSettings
from tests.parts import corral_exe
from tests.session.pg import pg_schema_url  # noqa: F401 - fixture

from .conftest import Harness, _cleanup, call, fail
from .procs import kill_sandboxes_under

pytestmark = [pytest.mark.anyio, pytest.mark.requires("bwrap"), pytest.mark.requires("postgres")]

SESSION = {"corral/client": "sess-1"}


class Hosts:
    """Sandbox servers, each configured from its own environment as `corral serve sandbox` is:
    its own CORRAL_HOME and sandbox root (so its own registry), plus what the test sets."""

    def __init__(self, tmp_path: Path, sandbox_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path, self.sandbox_root, self.monkeypatch = tmp_path, sandbox_root, monkeypatch
        self.started: list[Harness] = []
        for name in ("CORRAL_CHECKPOINT_STORE", "CORRAL_SESSION_STORE"):
            monkeypatch.delenv(name, raising=False)

    def start(self, name: str, **env: str) -> Harness:
        with self.monkeypatch.context() as patch:
            patch.setenv("CORRAL_HOME", str(self.tmp_path / name / "home"))
            patch.setenv("CORRAL_SANDBOX_DIR", str(self.sandbox_root / name))
            patch.setenv("CORRAL_SANDBOX_REAP_INTERVAL_S", "3600")
            for key, value in env.items():
                patch.setenv(key, value)
            started = Harness("bubblewrap", SandboxSettings())
        self.started.append(started)
        return started


@pytest.fixture
def hosts(tmp_path: Path, sandbox_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hosts]:
    made = Hosts(tmp_path, sandbox_root, monkeypatch)
    yield made
    for h in made.started:
        _cleanup(h)
        if h.service.checkpoints is not None:
            h.service.checkpoints.store.close()


async def die(h: Harness) -> None:
    """The worker host is gone: its sandboxes, its registry, its disk."""
    for record in h.service.registry.all("bubblewrap", states=("running", "lost")):
        await h.backend.destroy(record.ref)
    if h.service.checkpoints is not None:
        h.service.checkpoints.store.close()
    for path in (h.settings.home, h.settings.sandbox_dir):
        assert path is not None
        shutil.rmtree(path, ignore_errors=True)


async def test_a_session_moved_to_another_host_continues_with_its_files(hosts: Hosts, pg_schema_url: str) -> None:  # noqa: F811
    a = hosts.start("a", CORRAL_CHECKPOINT_STORE=pg_schema_url)
    b = hosts.start("b", CORRAL_CHECKPOINT_STORE=pg_schema_url)
    async with a.client() as c:
        made = await c.call_tool(
            "execute",
            {"command": "mkdir -p src && echo 'print(42)' > src/main.py && printf 'step 1\\n' > notes.txt"},
            meta=SESSION,
        )
        assert not made.is_error and made.structured_content["exit_code"] == 0
        taken = await c.call_tool("checkpoint", {"label": "after step 1"}, meta=SESSION)
        assert not taken.is_error, taken.content[0].text
        ckpt = taken.structured_content["checkpoint_id"]
        assert taken.structured_content["files_changed"] >= 3
    await die(a)

    async with b.client() as c:
        # Host B has never seen this session: no sandbox, no registry entry, no local store.
        assert (await call(c, "list_sandboxes"))["sandboxes"] == []
        moved = await c.call_tool(
            "execute", {"command": "cat notes.txt src/main.py"}, meta={**SESSION, "corral/checkpoint": ckpt}
        )
        assert not moved.is_error, moved.content[0].text
        out = moved.structured_content
        assert out["stdout"] == "step 1\nprint(42)\n"
        assert f"restored from checkpoint {ckpt}" in out["notice"]
        again = await c.call_tool("execute", {"command": "cat notes.txt"}, meta={**SESSION, "corral/checkpoint": ckpt})
        assert again.structured_content["sandbox_id"] == out["sandbox_id"]  # the same sandbox, bound to the session
        assert not again.structured_content.get("notice")


async def test_hosts_sharing_a_postgresql_session_store_share_checkpoints_by_default(
    hosts: Hosts,
    pg_schema_url: str,  # noqa: F811
) -> None:
    a = hosts.start("a", CORRAL_SESSION_STORE=pg_schema_url)  # as a worker or `corral up` on each host
    b = hosts.start("b", CORRAL_SESSION_STORE=pg_schema_url)
    async with a.client() as c:
        await call(c, "write_file", path="data/report.md", content="# results\n")
        ckpt = (await call(c, "checkpoint"))["checkpoint_id"]
    await die(a)

    async with b.client() as c:
        restored = await call(c, "restore", checkpoint_id=ckpt)
        assert restored["checkpoint_id"] == ckpt and not restored["in_place"]
        read = await call(c, "read_file", path="data/report.md", sandbox_id=restored["sandbox_id"])
        assert read["content"] == "# results\n"
        text = await fail(c, "restore", "not_found", checkpoint_id="ckpt_00000000000000000000")
        assert "ckpt_00000000000000000000" in text


async def test_local_keeps_checkpoints_on_the_host_even_with_a_postgresql_session_store(
    hosts: Hosts,
    pg_schema_url: str,  # noqa: F811
) -> None:
    a = hosts.start("a", CORRAL_SESSION_STORE=pg_schema_url, CORRAL_CHECKPOINT_STORE="local")
    b = hosts.start("b", CORRAL_SESSION_STORE=pg_schema_url, CORRAL_CHECKPOINT_STORE="local")
    async with a.client() as c:
        await call(c, "write_file", path="f.txt", content="here only")
        ckpt = (await call(c, "checkpoint"))["checkpoint_id"]
        restored = await call(c, "restore", checkpoint_id=ckpt)  # on its own host it is there
        assert (await call(c, "read_file", path="f.txt", sandbox_id=restored["sandbox_id"]))["content"] == "here only"
    async with b.client() as c:
        await fail(c, "restore", "not_found", checkpoint_id=ckpt)


async def test_corral_serve_sandbox_spawned_as_a_worker_does_restores_a_moved_session(
    tmp_path: Path,
    sandbox_root: Path,
    pg_schema_url: str,  # noqa: F811
) -> None:
    """Over real stdio, the server a worker spawns with its own environment (so with its
    CORRAL_SESSION_STORE): checkpoints go to PostgreSQL with no CORRAL_CHECKPOINT_STORE set."""
    roots = {name: sandbox_root / f"{name}-{uuid.uuid4().hex[:8]}" for name in ("a", "b")}

    def spawned(name: str) -> Client:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CORRAL_HOME": str(tmp_path / name),
            "CORRAL_SANDBOX_DIR": str(roots[name]),
            "CORRAL_SESSION_STORE": pg_schema_url,
        }
        return Client(StdioServerParameters(command=corral_exe(), args=["serve", "sandbox"], env=env))

    try:
        async with spawned("a") as c:
            wrote = await c.call_tool("execute", {"command": "echo from-a > state.txt"}, meta=SESSION)
            assert not wrote.is_error, wrote.content[0].text
            taken = await c.call_tool("checkpoint", {}, meta=SESSION)
            assert not taken.is_error, taken.content[0].text
            ckpt = taken.structured_content["checkpoint_id"]
        kill_sandboxes_under(roots["a"])  # host a dies: its sandboxes and its disk are gone
        shutil.rmtree(roots["a"], ignore_errors=True)
        shutil.rmtree(tmp_path / "a", ignore_errors=True)
        async with spawned("b") as c:
            moved = await c.call_tool(
                "execute", {"command": "cat state.txt"}, meta={**SESSION, "corral/checkpoint": ckpt}
            )
            assert not moved.is_error, moved.content[0].text
            assert moved.structured_content["stdout"] == "from-a\n"
            assert f"restored from checkpoint {ckpt}" in moved.structured_content["notice"]
    finally:
        for root in roots.values():
            kill_sandboxes_under(root)
