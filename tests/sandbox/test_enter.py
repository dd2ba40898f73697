"""Both ways into a live sandbox — the one-exec helper `corral-enter` (built where a C compiler
is) and the portable chain (nsenter, setpriv, env -i, prlimit) — give a command exactly the
same world: no capabilities, the sandbox's environment only, its limits and cgroups, its cwd."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from corral.servers.sandbox.config import SandboxSettings

from .conftest import Harness, _cleanup, call, fail

pytestmark = [pytest.mark.anyio, pytest.mark.requires("bwrap")]

PROBE = (
    "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Uid|Gid)' /proc/self/status; env | grep -v '^_=' | sort;"
    " ulimit -v; ulimit -u; ulimit -f; ulimit -t; pwd"
)


@pytest.fixture(params=["helper", "chain"])
def entered(request: pytest.FixtureRequest, settings: SandboxSettings) -> Iterator[Harness]:
    fast = request.param == "helper"
    if fast and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here to build corral-enter (.ci/run installs gcc)")
    h = Harness("bubblewrap", settings.model_copy(update={"sandbox_fast_enter": fast}))
    assert (h.backend.enter is not None) == fast
    yield h
    _cleanup(h)


async def test_a_command_gets_exactly_the_sandboxs_world(entered: Harness) -> None:
    async with entered.client() as c:
        sid = (await call(c, "provision", env={"FROM_PROVISION": "1"}))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="mkdir sub")
        out = await call(c, "execute", sandbox_id=sid, command=PROBE, env={"FOO": "bar"}, cwd="sub", timeout_s=30)
        lines = out["stdout"].splitlines()
        assert out["exit_code"] == 0, out
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert f"{cap}:\t0000000000000000" in lines, lines
        assert "NoNewPrivs:\t1" in lines and "Uid:\t0\t0\t0\t0" in lines
        env = [line for line in lines if "=" in line]
        assert env == sorted(
            [
                "FOO=bar", "FROM_PROVISION=1", "HOME=/root", "LANG=C.UTF-8", "LOGNAME=root",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PWD=/workspace/sub",
                "SHLVL=1", "TERM=dumb", "USER=root",
            ]
        ), env  # fmt: skip
        spec = entered.settings
        assert str(spec.sandbox_memory_mb * 1024) in lines and str(spec.sandbox_max_processes) in lines, lines
        assert "35" in lines, "CPU seconds: the timeout + 5"
        assert "/workspace/sub" in lines
        if entered.backend.cgroups is not None:  # seen from the host: the command joined the sandbox's groups
            procs = [entered.backend.cgroups.path(c, sid) / "cgroup.procs" for c in ("memory", "pids", "cpu")]
            before = [len(p.read_text().split()) for p in procs]
            await call(c, "execute", sandbox_id=sid, command="sleep 300", background=True)
            assert [len(p.read_text().split()) for p in procs] == [n + 2 for n in before], "the helper/nsenter + sleep"


async def test_a_missing_cwd_is_a_clear_error(entered: Harness) -> None:
    async with entered.client() as c:
        text = await fail(c, "execute", "invalid_argument", command="true", cwd="nope")
        assert "does not exist" in text


async def test_a_background_process_leads_its_own_group(entered: Harness) -> None:
    async with entered.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        started = await call(c, "execute", sandbox_id=sid, command="sleep 300 & sleep 301", background=True)
        killed = await call(c, "kill_process", process_id=started["process_id"], signal="KILL")
        assert killed["state"] == "killed", killed
        left = await call(c, "execute", sandbox_id=sid, command="pgrep -c 'sleep 30[01]' || true")
        assert left["stdout"] == "0\n", "kill_process reached every process of its group"
