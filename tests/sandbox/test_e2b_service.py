"""The e2b backend against what the real service does (through the SDK-derived fake).

One test (or a few) per mismatch of issue 16: a timeout leaves children, the tier's TTL
limit, untranslated errors, unreachable is not gone, wrong error kinds, a workdir that is
not empty, unbounded memory, a loose version pin. Every call goes through an MCP client.
"""

from __future__ import annotations

import os
import re
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from packaging.version import Version

from corral.servers.sandbox.config import E2BConfig, SandboxSettings
from corral.servers.sandbox.server import build_server, make_backend
from tests.conftest import until

from .conftest import Harness, call, fail
from .fake_e2b import _VM, CHUNK, FakeAsyncSandbox, FakeCloud, api_error

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def cloud() -> Iterator[type[FakeCloud]]:
    FakeCloud.reset()
    yield FakeCloud
    FakeCloud.reset()


@pytest.fixture
def h(settings: SandboxSettings) -> Harness:
    return Harness("e2b", settings)


def _server(settings: SandboxSettings, **config: object):
    backend = make_backend(E2BConfig(**config), sandbox_cls=FakeAsyncSandbox)  # type: ignore[arg-type]
    return build_server(settings, backend, reap=False)


def _vm(h: Harness, sandbox_id: str) -> _VM:
    record = h.service.registry.get(sandbox_id)
    assert record is not None
    return FakeCloud.vms[record.ref.data["e2b_id"]]


def _live_processes(vm: _VM) -> list[int]:
    """The VM's processes that still run (zombies excluded)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getsid(int(entry)) in vm.sessions:
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry))
        except (OSError, IndexError):
            continue
    return pids


# -- 1. a timeout kills the command and everything it started --------------------------------


@pytest.mark.parametrize("stdin", [None, "input\n"], ids=["plain", "stdin"])
async def test_timeout_kills_children_and_leaves_no_temp_file(h: Harness, stdin: str | None) -> None:
    async with h.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        vm = _vm(h, sid)
        args = {"stdin": stdin} if stdin else {}
        r = await call(c, "execute", sandbox_id=sid, command="cat > got; sleep 300 & sleep 300", timeout_s=1, **args)
        assert r["timed_out"] and r["exit_code"] is None
        await until(lambda: not _live_processes(vm), "every process of the timed-out command to die", seconds=5)
        assert [p.name for p in vm.tmp.iterdir()] == []  # no stdin file, no pid file behind
        assert (await call(c, "read_file", sandbox_id=sid, path="got"))["content"] == (stdin or "")


# -- 2. default provisioning fits the tier ----------------------------------------------------


async def test_default_ttl_is_clamped_to_the_tier(h: Harness) -> None:
    assert h.settings.sandbox_ttl_s == 86400 and FakeCloud.max_ttl_s == 3600  # Corral's default, Hobby's limit
    async with h.client() as c:
        box = await call(c, "provision")
        expires = time.mktime(time.strptime(box["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert expires <= time.time() + 3600 + 5  # says when E2B will really end it
        assert (await call(c, "execute", sandbox_id=box["sandbox_id"], command="echo up"))["stdout"] == "up\n"


async def test_pro_tier_keeps_a_longer_ttl_and_a_wrong_limit_says_what_to_set(settings: SandboxSettings) -> None:
    from mcp.client import Client

    FakeCloud.max_ttl_s = 86400  # Pro
    server, _ = _server(settings, api_key="e2b_test_key", max_ttl_s=86400)
    async with Client(server) as c:
        box = await call(c, "provision", resources={"ttl_s": 7200})
        expires = time.mktime(time.strptime(box["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert expires > time.time() + 7000
    FakeCloud.max_ttl_s = 3600  # the operator said Pro, the key is Hobby: E2B's own 400
    async with Client(server) as c:
        text = await fail(c, "provision", "unavailable", resources={"ttl_s": 7200})
        assert "Timeout cannot be greater than 1 hours" in text and "CORRAL_E2B_MAX_TTL_S" in text


# -- 3. every exception translated ------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "e2b_revoked_key"], ids=["missing", "revoked"])
async def test_bad_api_key_tells_the_operator(settings: SandboxSettings, monkeypatch, key: str) -> None:
    from mcp.client import Client

    monkeypatch.delenv("E2B_API_KEY", raising=False)
    server, _ = _server(settings, api_key=key)
    async with Client(server) as c:
        text = await fail(c, "provision", "unavailable")
        assert "E2B_API_KEY is missing or invalid" in text and "unexpectedly" not in text


async def test_the_real_sdk_without_a_key_tells_the_operator(settings: SandboxSettings, monkeypatch) -> None:
    """The real `AsyncSandbox`, not the fake: it refuses before sending anything."""
    from mcp.client import Client

    monkeypatch.delenv("E2B_API_KEY", raising=False)
    server, _ = build_server(settings, make_backend(E2BConfig(api_key="")), reap=False)
    async with Client(server) as c:
        assert "E2B_API_KEY is missing or invalid" in await fail(c, "provision", "unavailable")


async def test_service_busy_is_unavailable_with_a_retry_hint(h: Harness) -> None:
    FakeCloud.fail_next("create", api_error(503, "no capacity to place the sandbox"))
    async with h.client() as c:
        text = await fail(c, "provision", "unavailable")
        assert "busy" in text and "retry" in text and "unexpectedly" not in text
        await call(c, "provision")  # the next try works


async def test_file_read_timeout_is_a_timeout(h: Harness) -> None:
    async with h.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="f.txt", content="x")
        FakeCloud.fail_next("read", httpx.ReadTimeout("timed out"))
        await fail(c, "read_file", "timeout", sandbox_id=sid, path="f.txt")
        assert (await call(c, "read_file", sandbox_id=sid, path="f.txt"))["content"] == "x"


@pytest.mark.parametrize("mode", ["no_end", "drop"])
async def test_stream_ending_early_keeps_a_running_sandbox(h: Harness, mode: str) -> None:
    async with h.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        FakeCloud.fail_next("run", mode)
        text = await fail(c, "execute", "unavailable", sandbox_id=sid, command="true")
        assert "still running" in text and "unexpectedly" not in text
        assert (await call(c, "execute", sandbox_id=sid, command="echo alive"))["stdout"] == "alive\n"


async def test_dropped_file_transfer_keeps_a_running_sandbox(h: Harness) -> None:
    async with h.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="f.txt", content="x")
        FakeCloud.fail_next("read", httpx.ReadError("connection reset by peer"))  # what the SDK re-raises raw
        assert "still running" in await fail(c, "read_file", "unavailable", sandbox_id=sid, path="f.txt")
        assert (await call(c, "read_file", sandbox_id=sid, path="f.txt"))["content"] == "x"


async def test_a_failing_kill_does_not_stop_the_sweep(h: Harness) -> None:
    async with h.client() as c:
        first = (await call(c, "provision", resources={"ttl_s": 1}))["sandbox_id"]
        second = (await call(c, "provision", resources={"ttl_s": 1}))["sandbox_id"]
        await until(lambda: time.time() > h.service.registry.get(second).expires_at, "both to expire")
        FakeCloud.fail_next("kill", api_error(500, "internal error"))
        assert await h.service.sweep() == [second]  # the first is kept for the next sweep
        assert await h.service.sweep() == [first]


# -- 4. unreachable is not gone ---------------------------------------------------------------


async def test_unreachable_sandbox_is_confirmed_before_it_is_lost(h: Harness) -> None:
    async with h.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="work.txt", content="precious")
        FakeCloud.fail_next("run", "unreachable")
        text = await fail(c, "execute", "unavailable", sandbox_id=sid, command="true")
        assert "still running" in text
        assert await h.service.sweep() == []  # the reaper leaves it alone
        assert (await call(c, "read_file", sandbox_id=sid, path="work.txt"))["content"] == "precious"


# -- 5. error kinds as on bubblewrap and docker --------------------------------------------------


async def test_directory_read_file_list_and_missing_cwd_are_invalid_arguments(h: Harness) -> None:
    async with h.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="mkdir d && echo x > f")
        await fail(c, "read_file", "invalid_argument", sandbox_id=sid, path="d")
        await fail(c, "list_files", "invalid_argument", sandbox_id=sid, path="f")
        await fail(c, "execute", "invalid_argument", sandbox_id=sid, command="pwd", cwd="nowhere")
        await fail(c, "read_file", "not_found", sandbox_id=sid, path="nothing")
        await fail(c, "execute", "invalid_argument", sandbox_id=sid, command="cat", cwd="nowhere", stdin="x")
        assert [p.name for p in _vm(h, sid).tmp.iterdir()] == []  # the stdin file went with the refusal


# -- 6. the workdir is what the contract says ---------------------------------------------------


async def test_workdir_starts_empty_though_the_template_home_is_not(h: Harness) -> None:
    async with h.client() as c:
        box = await call(c, "provision")
        assert (await call(c, "list_files", sandbox_id=box["sandbox_id"]))["entries"] == []
        home = await call(c, "execute", sandbox_id=box["sandbox_id"], command="ls -A ~")
        assert ".bashrc" in home["stdout"].split()  # the template's dotfiles are where E2B puts them


# -- 7. bounded memory -------------------------------------------------------------------------


async def test_output_and_reads_are_capped_as_they_arrive(h: Harness) -> None:
    async with h.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        r = await call(c, "execute", sandbox_id=sid, command="head -c 3000000 /dev/zero | tr '\\0' x")
        assert r["stdout_bytes"] == 3000000 and r["stdout_truncated"]
        assert FakeCloud.retained_output[-1] is None  # the SDK accumulated nothing
        await call(c, "execute", sandbox_id=sid, command="head -c 3000000 /dev/zero > big")
        part = await call(c, "read_file", sandbox_id=sid, path="big", encoding="base64", offset=2999990, limit=100)
        assert (part["size"], part["length"]) == (3000000, 10)
        assert FakeCloud.largest_read_buffer <= CHUNK  # streamed, not downloaded whole


# -- 8. the version pin -----------------------------------------------------------------------

# First e2b release with each SDK feature the backend relies on (found by reading the wheels).
FIRST_WITH = {
    "SandboxUnreachableException, SandboxNotRunningException": "2.53.1",
    "ServiceBusyException": "2.48.0",
    "commands.run(retain_output=...)": "2.63.0",
}


def test_pin_requires_every_sdk_feature_the_backend_uses() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pin = next(r for r in extras["e2b"] if r.startswith("e2b"))
    minimum = Version(re.search(r">=\s*([\d.]+)", pin).group(1))
    for feature, first in FIRST_WITH.items():
        assert minimum >= Version(first), f"{pin!r} allows e2b releases without {feature} (first in {first})"
    imported = re.search(r"from e2b import \(([^)]*)\)", (ROOT / "servers/sandbox/e2b.py").read_text()).group(1)
    import e2b

    for name in (n.strip() for n in imported.split(",") if n.strip()):
        assert hasattr(e2b, name), f"the installed e2b has no {name}"
