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


def host(name: str, tmp_path: Path, sandbox_root: Path, store_url: str) -> Harness:
    return Harness(
        "bubblewrap",
        SandboxSettings(
            home=tmp_path / name / "home",
            sandbox_dir=sandbox_root / name,
            sandbox_reap_interval_s=3600,
            checkpoint_store=store_url,
        ),
    )


@pytest.fixture
def hosts(tmp_path: Path, sandbox_root: Path, pg_schema_url: str) -> Iterator[tuple[Harness, Harness]]:  # noqa: F811
    a = host("a", tmp_path, sandbox_root, pg_schema_url)
    b = host("b", tmp_path, sandbox_root, pg_schema_url)
    yield a, b
    for h in (a, b):
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


async def test_a_session_moved_to_another_host_continues_with_its_files(hosts: tuple[Harness, Harness]) -> None:
    a, b = hosts
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


async def test_restore_by_id_on_another_host_and_an_unknown_id(hosts: tuple[Harness, Harness]) -> None:
    a, b = hosts
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
