"""Hands that move between machines: two sandbox servers that share nothing but PostgreSQL
(each its own CORRAL_HOME, sandbox root and registry). A session's sandbox checkpointed on
host A, whose host then dies, continues on host B with its files restored from the store."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.servers.sandbox.config import SandboxSettings
from tests.session.pg import pg_schema_url  # noqa: F401 - fixture

from .conftest import Harness, _cleanup, call, fail

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
