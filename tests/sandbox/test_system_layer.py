"""The default bubblewrap sandbox's writable system layer (as root): /etc, /usr, /opt... are the
sandbox's own copy-on-write layer over the host's userland; the host's files never change, a
second sandbox sees none of it, destroy leaves no mount and no layer, a reboot keeps it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.servers.sandbox.config import SandboxSettings
from tests.conftest import until

from .conftest import Harness, _cleanup, call

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.requires("bwrap"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the system layer is an overlay the server mounts as root"),
]

# Host files the sandboxes change or delete in their layers: each must stay exactly as it is.
WATCHED = ["/usr/bin/true", "/usr/bin", "/usr/local/bin", "/usr/local/lib", "/etc/hostname"]
# A wheel made inside the sandbox (nothing to download): `hello` prints "hello from the layer".
MAKE_WHEEL = r"""
import zipfile
files = {
    "hello/__init__.py": "print('hello from the layer')\n",
    "hello-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: hello\nVersion: 1.0\n",
    "hello-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
with zipfile.ZipFile("hello-1.0-py3-none-any.whl", "w") as whl:
    for name, text in files.items():
        whl.writestr(name, text)
    whl.writestr("hello-1.0.dist-info/RECORD", "".join(f"{n},,\n" for n in [*files, "hello-1.0.dist-info/RECORD"]))
"""


def snapshot() -> dict[str, tuple[int, int, int, int]]:
    """What the watched host paths are: mode, size, mtime, and the entry count of directories."""
    seen = {}
    for path in WATCHED:
        if os.path.lexists(path):
            st = os.lstat(path)
            entries = len(os.listdir(path)) if os.path.isdir(path) else 0
            seen[path] = (st.st_mode, st.st_size, st.st_mtime_ns, entries)
    return seen


def mounts_under(path: Path) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(path) in line]


@pytest.fixture
def layered(bw: Harness) -> Harness:
    assert bw.backend.hostlayer is not None, "this kernel has id-mapped mounts: the layer must be on"  # type: ignore[attr-defined]
    return bw


@pytest.fixture
def read_only(settings: SandboxSettings, needs_bwrap: None) -> Iterator[Harness]:
    h = Harness("bubblewrap", settings.model_copy(update={"sandbox_system_layer": False}))
    yield h
    _cleanup(h)


async def test_a_default_sandbox_writes_its_own_system(layered: Harness) -> None:
    before = snapshot()
    async with layered.client() as c:
        a = (await call(c, "provision"))["sandbox_id"]
        b = (await call(c, "provision"))["sandbox_id"]
        etc = await call(
            c, "execute", sandbox_id=a, command="echo x > /etc/foo && cat /etc/foo && echo y >> /etc/hostname"
        )
        assert etc["exit_code"] == 0 and etc["stdout"] == "x\n", etc
        tool = "printf '#!/bin/sh\\necho tool\\n' > /usr/local/bin/tool && chmod +x /usr/local/bin/tool && tool"
        tool += (
            " && cp /usr/bin/true /usr/bin/corral-true && corral-true && rm /usr/bin/true && mkdir -p /opt/x /var/lib/y"
        )
        made = await call(c, "execute", sandbox_id=a, command=tool)
        assert made["exit_code"] == 0 and made["stdout"] == "tool\n", made
        gone = await call(c, "execute", sandbox_id=a, command="ls /usr/bin/true; ls -d /opt/x /var/lib/y")
        assert "No such file" in gone["stderr"] and gone["stdout"] == "/opt/x\n/var/lib/y\n", gone
        # A second sandbox has the host's system as it is.
        other = await call(
            c,
            "execute",
            sandbox_id=b,
            command="ls /etc/foo /usr/local/bin/tool /opt/x; ls /usr/bin/true; cat /etc/hostname",
        )
        assert other["stdout"] == "/usr/bin/true\nsandbox\n" and other["stderr"].count("No such file") == 3, other
        # The sandbox's uid 0 is the unprivileged sandbox uid: no capability came with the layer.
        caps = await call(c, "execute", sandbox_id=a, command="grep CapEff /proc/self/status; id -u")
        assert caps["stdout"].split()[1:] == ["0000000000000000", "0"], caps
    assert snapshot() == before, "the host's /etc and /usr never change"
    assert not os.path.exists("/etc/foo") and not os.path.exists("/usr/local/bin/tool")


@pytest.mark.skipif(
    subprocess.run(["/usr/bin/python3", "-m", "pip", "--version"], capture_output=True).returncode != 0,
    reason="the host's python3 has no pip",
)
async def test_a_system_wide_pip_install_lands_in_the_layer(layered: Harness) -> None:
    async with layered.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="make_wheel.py", content=MAKE_WHEEL)
        install = (
            "/usr/bin/python3 make_wheel.py && /usr/bin/python3 -m pip install -q --no-index --break-system-packages "
        )
        install += "hello-1.0-py3-none-any.whl && cd / && /usr/bin/python3 -c 'import hello; print(hello.__file__)'"
        done = await call(c, "execute", sandbox_id=sid, command=install, timeout_s=120)
        assert done["exit_code"] == 0, done
        assert done["stdout"].startswith("hello from the layer\n/usr/local/lib/python3"), done
        other = (await call(c, "provision"))["sandbox_id"]
        missing = await call(c, "execute", sandbox_id=other, command="cd / && /usr/bin/python3 -c 'import hello'")
        assert missing["exit_code"] == 1 and "No module named 'hello'" in missing["stderr"], missing
    host = subprocess.run(["/usr/bin/python3", "-c", "import hello"], capture_output=True, text=True, cwd="/")
    assert "No module named 'hello'" in host.stderr, "the host's python never sees it"


async def test_destroy_discards_the_layer_and_leaves_the_host_intact(layered: Harness) -> None:
    before = snapshot()
    async with layered.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        base = layered.settings.sandbox_dir / sid
        # The worst a sandbox can do to its system: all of it lands in its layer.
        wreck = await call(
            c, "execute", sandbox_id=sid, command="rm -rf /usr/local /usr/bin/true /etc/hostname; echo done"
        )
        assert wreck["stdout"] == "done\n", wreck
        assert mounts_under(base), "the layer is mounted while the sandbox lives"
        kept = (await call(c, "provision"))["sandbox_id"]
        await call(c, "destroy", sandbox_id=sid)
        assert not base.exists(), "destroy discards the layer"
        assert mounts_under(base) == [], "and leaves no mount"
        assert (await call(c, "execute", sandbox_id=kept, command="ls /usr/local/bin"))["exit_code"] == 0
        await call(c, "destroy", sandbox_id=kept)
    assert mounts_under(layered.settings.sandbox_dir / kept) == []
    assert snapshot() == before and os.access("/usr/bin/true", os.X_OK), "the host's /usr is intact"


async def test_destroy_keeping_the_workspace_discards_the_layer(layered: Harness) -> None:
    async with layered.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="echo mine > notes.txt && echo x > /etc/foo")
        await call(c, "destroy", sandbox_id=sid, keep_workspace=True)
    base = layered.settings.sandbox_dir / sid
    assert (base / "workspace" / "notes.txt").read_text() == "mine\n"
    assert not (base / "layer").exists() and not (base / "rootfs").exists() and mounts_under(base) == []


async def test_the_tools_that_join_a_sandbox_are_never_the_sandbox_s(layered: Harness) -> None:
    """They run with capabilities in the sandbox's namespace until they drop them: a layer that
    replaces setpriv or preloads a library must not run its code there."""
    async with layered.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        trap = "printf '#!/bin/sh\\ntouch /tmp/pwned\\n' > /usr/bin/setpriv; chmod +x /usr/bin/setpriv; "
        trap += "echo /tmp/evil.so > /etc/ld.so.preload; echo $?"
        planted = await call(c, "execute", sandbox_id=sid, command=trap)
        assert planted["stdout"] == "1\n" and "Read-only" in planted["stderr"], planted
        after = await call(c, "execute", sandbox_id=sid, command="ls /tmp/pwned; grep CapEff /proc/self/status")
        assert "No such file" in after["stderr"] and after["stdout"].split()[-1] == "0000000000000000", after


async def test_the_layer_outlives_a_server_restart_and_a_reboot(layered: Harness) -> None:
    async with layered.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="echo kept > /etc/kept && touch /usr/local/bin/kept")
    base = layered.settings.sandbox_dir / sid
    async with layered.restart().client() as c:  # the init lives on: its layer stays mounted
        r = await call(c, "execute", sandbox_id=sid, command="cat /etc/kept")
        assert r["stdout"] == "kept\n" and r["notice"] is None, r
    init = json.loads((base / "init.json").read_text())["init"]["pid"]
    os.kill(init, signal.SIGKILL)  # the host rebooted while the server was down: no init, no mount
    await until(lambda: not Path(f"/proc/{init}").exists(), "the init is gone", seconds=10)
    subprocess.run(["umount", "-R", str(base / "rootfs")], check=True)
    assert mounts_under(base) == []
    again = layered.restart()
    async with again.client() as c:
        r = await call(c, "execute", sandbox_id=sid, command="cat /etc/kept && ls /usr/local/bin/kept")
        assert r["stdout"] == "kept\n/usr/local/bin/kept\n" and "stopped" in r["notice"], r
        await call(c, "destroy", sandbox_id=sid)
    assert not base.exists() and mounts_under(base) == []


async def test_a_live_sandbox_keeps_its_system_when_the_operator_turns_the_layer_on_or_off(layered: Harness) -> None:
    """A restarted server re-adopts live inits started under the other setting: each goes on
    with the system it had, and the tools that join a layered one are still the host's."""
    # The same registry (its fixture destroys what is left): one server, restarted with the other setting.
    off = Harness("bubblewrap", layered.settings.model_copy(update={"sandbox_system_layer": False}))
    async with off.client() as c:
        plain = (await call(c, "provision"))["sandbox_id"]
        assert (await call(c, "execute", sandbox_id=plain, command="echo up"))["stdout"] == "up\n"
    async with layered.restart().client() as c:
        r = await call(c, "execute", sandbox_id=plain, command="touch /usr/local/bin/x 2>&1; echo ran")
        assert "Read-only file system" in r["stdout"] and r["stdout"].endswith("ran\n"), r
        sid = (await call(c, "provision"))["sandbox_id"]
        trap = "printf '#!/bin/sh\\ntouch /tmp/pwned\\n' > /usr/bin/setpriv && chmod +x /usr/bin/setpriv"
        assert (await call(c, "execute", sandbox_id=sid, command=trap))["exit_code"] == 0
    async with off.restart().client() as c:
        r = await call(c, "execute", sandbox_id=sid, command="ls /tmp/pwned; echo ran")
        assert "No such file" in r["stderr"] and r["stdout"] == "ran\n", r


async def test_without_the_layer_the_system_is_read_only(read_only: Harness) -> None:
    async with read_only.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        r = await call(c, "execute", sandbox_id=sid, command="echo x > /etc/foo; touch /usr/local/bin/x")
        assert r["stderr"].count("Read-only file system") == 2, r
        assert mounts_under(read_only.settings.sandbox_dir / sid) == []
