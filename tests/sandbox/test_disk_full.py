"""The sandbox registry on a full disk (issue 18, item 4): `provision` names the full disk and
where to free space, loses no sandbox it already recorded, leaves no unrecorded sandbox
running, and works again once space is freed, in the same server."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.servers.sandbox.config import SandboxSettings
from tests.conftest import fill_disk

from .conftest import Harness, call
from .fake_e2b import FakeCloud

pytestmark = pytest.mark.anyio


async def test_provision_on_a_full_disk_is_named_and_works_again_once_space_is_freed(
    small_disk: Path, tmp_path: Path
) -> None:
    FakeCloud.reset()
    earlier = set(FakeCloud.vms)  # other tests' fake VMs

    def running() -> set[str]:
        return {vm for vm, box in FakeCloud.vms.items() if box.running and vm not in earlier}

    settings = SandboxSettings(home=small_disk, sandbox_dir=tmp_path / "sandboxes", sandbox_reap_interval_s=3600)
    h = Harness("e2b", settings)
    registry_dir = h.service.registry.path.parent
    async with h.client() as c:
        first = await call(c, "provision")
        filler = fill_disk(small_disk)
        acknowledged = [first["sandbox_id"]]
        for _ in range(200):  # the registry's last pages may still hold a row or two
            result = await c.call_tool("provision", {})
            if result.is_error:
                break
            acknowledged.append(result.structured_content["sandbox_id"])
        assert result.is_error, "the disk never filled up"
        assert result.content[0].text.endswith(
            f"unavailable: no space left on device (free space under {registry_dir})"
        )
        assert len(running()) == len(acknowledged), "an unrecorded sandbox was left running"
        filler.unlink()  # space is freed: the same server provisions again
        again = await call(c, "provision")
        listed = await call(c, "list_sandboxes")
    assert [s["sandbox_id"] for s in listed["sandboxes"]] == [*acknowledged, again["sandbox_id"]]
    restarted = h.restart()  # every acknowledged sandbox is on disk, not just in memory
    async with restarted.client() as c:
        listed = await call(c, "list_sandboxes")
    assert [s["sandbox_id"] for s in listed["sandboxes"]] == [*acknowledged, again["sandbox_id"]]
    for vm in running():
        FakeCloud.vms[vm].running = False
