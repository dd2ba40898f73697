"""The operator's limits are ceilings: a client may lower them, never raise them (SPEC, issue 12
item 3). Refused rather than clamped: a client that needs 4 GiB must learn it cannot have it
now, not from a command killed later; and nothing is created."""

from __future__ import annotations

import pytest

from corral.servers.sandbox.config import SandboxSettings

from .conftest import Harness, call, fail

pytestmark = pytest.mark.anyio

ALLOCATE_100M = "dd if=/dev/zero of=/dev/null bs=100M count=1"  # dd holds (and fills) one 100 MiB buffer
ALLOCATE_1M = "dd if=/dev/zero of=/dev/null bs=1M count=1"


@pytest.fixture
def settings(settings: SandboxSettings) -> SandboxSettings:
    return settings.model_copy(update={"sandbox_memory_mb": 64, "sandbox_ttl_s": 600, "sandbox_cpus": 1.0})


async def test_a_client_cannot_raise_the_operators_limits(iso: Harness) -> None:
    async with iso.client() as c:
        text = await fail(c, "provision", "invalid_argument", resources={"memory_mb": 4096, "ttl_s": 90000, "cpus": 2})
        assert (
            "memory_mb=4096 (at most 64)" in text
            and "ttl_s=90000 (at most 600)" in text
            and "cpus=2 (at most 1)" in text
        )
        assert (await call(c, "list_sandboxes"))["sandboxes"] == []  # nothing was provisioned
        # the ceiling is also the default; a command allocating past it fails
        full = (await call(c, "provision"))["sandbox_id"]
        assert (await call(c, "execute", sandbox_id=full, command=ALLOCATE_1M))["exit_code"] == 0
        assert (await call(c, "execute", sandbox_id=full, command=ALLOCATE_100M, timeout_s=60))["exit_code"] != 0
        # lowering works, up to and including the ceiling
        lower = await call(c, "provision", resources={"memory_mb": 64, "ttl_s": 60})
        assert (await call(c, "execute", sandbox_id=lower["sandbox_id"], command=ALLOCATE_100M, timeout_s=60))[
            "exit_code"
        ] != 0
        for sid in (full, lower["sandbox_id"]):
            await call(c, "destroy", sandbox_id=sid)
