"""No file tool can be made to work unboundedly (issue 12 item 4): a huge sparse file is not
hashed, and one sandbox's file calls cannot starve another's in the shared thread pool."""

from __future__ import annotations

import asyncio
import time

import pytest

from corral.servers.sandbox.config import SandboxSettings

from .conftest import Harness, call, fail

pytestmark = pytest.mark.anyio

TIB = 1 << 40


@pytest.fixture
def settings(settings: SandboxSettings) -> SandboxSettings:
    # the sandbox may make a 1 TiB (sparse) file: RLIMIT_FSIZE / --ulimit fsize follow disk_mb
    return settings.model_copy(update={"sandbox_disk_mb": 2 << 20})


async def test_reading_one_byte_of_a_sparse_terabyte_is_prompt(iso: Harness) -> None:
    async with iso.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command=f"truncate -s {TIB} big && printf x >> big")
        start = time.monotonic()
        got = await call(c, "read_file", sandbox_id=sid, path="big", offset=TIB, limit=1)
        assert time.monotonic() - start < 5
        assert (got["content"], got["size"], got["sha256"], got["truncated"]) == ("x", TIB + 1, None, False)
        head = await call(c, "read_file", sandbox_id=sid, path="big", limit=4, encoding="base64")
        assert head["content"] == "AAAAAA==" and head["truncated"]
        small = await call(c, "write_file", sandbox_id=sid, path="small", content="abc")
        assert (await call(c, "read_file", sandbox_id=sid, path="small", limit=1))["sha256"] == small["sha256"]


async def test_one_sandbox_cannot_starve_anothers_file_calls(iso: Harness) -> None:
    """Many slow reads in one sandbox (each hashes a 64 MiB file, the most a read hashes) queue
    behind that sandbox's own slots; a read in another sandbox goes straight through."""
    async with iso.client() as c:
        busy = (await call(c, "provision"))["sandbox_id"]
        calm = (await call(c, "provision"))["sandbox_id"]
        limit = iso.settings.sandbox_max_file_bytes
        await call(c, "execute", sandbox_id=busy, command=f"head -c {limit} /dev/urandom > blob")
        await call(c, "write_file", sandbox_id=calm, path="note", content="hi")

        async def read_blob() -> float:
            await call(c, "read_file", sandbox_id=busy, path="blob", limit=1, encoding="base64")
            return time.monotonic()

        start = time.monotonic()
        flood = [asyncio.create_task(read_blob()) for _ in range(16)]
        await asyncio.sleep(0.05)  # the flood is queued first
        assert (await call(c, "read_file", sandbox_id=calm, path="note"))["content"] == "hi"
        calm_done = time.monotonic() - start
        flood_done = max(await asyncio.gather(*flood)) - start
        assert calm_done < flood_done / 3, (calm_done, flood_done)


async def test_a_file_call_past_its_deadline_is_a_timeout(iso: Harness) -> None:
    hasty = Harness(iso.kind, iso.settings.model_copy(update={"sandbox_file_timeout_s": 0.01}))
    async with hasty.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(
            c, "execute", sandbox_id=sid, command=f"head -c {iso.settings.sandbox_max_file_bytes} /dev/zero > blob"
        )
        text = await fail(c, "read_file", "timeout", sandbox_id=sid, path="blob", limit=1)
        assert "did not finish within 0.01s" in text
        await call(c, "destroy", sandbox_id=sid)
