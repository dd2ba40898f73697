"""Templates on bubblewrap: `corral sandbox templates add|list|rm`, and sandboxes whose `/` is
a registered root filesystem (the busybox test image; a Debian minbase tree), never a host
path or a flag."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.servers.sandbox.config import SandboxSettings
from tests.conftest import until
from tests.parts import TEST_IMAGE

from .conftest import Harness, _cleanup, call, fail

pytestmark = pytest.mark.anyio

DEBIAN_TREE = Path("/tmp/fresh/rootfs-template")


@pytest.fixture
def templates_dir(sandbox_root: Path) -> Iterator[Path]:
    """Beside the sandboxes: the sandbox uid must traverse it (pytest's tmp_path is 0700)."""
    path = sandbox_root.parent / f"templates-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def corral(templates_dir: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORRAL_HOME": str(home), "CORRAL_SANDBOX_TEMPLATES_DIR": str(templates_dir)}
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture
def tpl(settings: SandboxSettings, templates_dir: Path) -> Iterator[Harness]:
    h = Harness("bubblewrap", settings.model_copy(update={"sandbox_templates_dir": templates_dir}))
    yield h
    _cleanup(h)


@pytest.mark.requires("bwrap", "docker")
async def test_a_docker_image_becomes_a_template_and_sandboxes_run_on_it(
    tpl: Harness, templates_dir: Path, tmp_path: Path
) -> None:
    added = corral(templates_dir, tmp_path, "sandbox", "templates", "add", "box", "--from-docker", TEST_IMAGE)
    assert added.returncode == 0, added.stderr
    listed = corral(templates_dir, tmp_path, "sandbox", "templates", "list")
    assert listed.stdout.startswith("box\t") and f"docker:{TEST_IMAGE}" in listed.stdout
    again = corral(templates_dir, tmp_path, "sandbox", "templates", "add", "box", "--from-docker", TEST_IMAGE)
    assert again.returncode == 1 and "conflict:" in again.stderr and "already registered" in again.stderr
    async with tpl.client() as c:
        sid = (await call(c, "provision", template="box"))["sandbox_id"]
        # The image's userland, not the host's: busybox is /bin/sh, there is no python3, no host /usr/bin.
        out = await call(
            c,
            "execute",
            sandbox_id=sid,
            command="readlink /bin/sh; ls /usr/bin | wc -l; command -v python3 || echo none; pwd; id -u",
        )
        assert out["exit_code"] == 0, out
        assert out["stdout"].split("\n")[0] == "busybox" and out["stdout"].endswith("none\n/workspace\n0\n"), out
        # Same isolation: no network, no capabilities, a workspace that persists across calls.
        net = await call(c, "execute", sandbox_id=sid, command="cat /proc/net/dev | grep -c :")
        assert net["stdout"] == "1\n", net
        await call(c, "write_file", sandbox_id=sid, path="hello.txt", content="hi\n")
        assert (await call(c, "execute", sandbox_id=sid, command="cat hello.txt"))["stdout"] == "hi\n"
        caps = await call(c, "execute", sandbox_id=sid, command="grep CapEff /proc/self/status")
        assert caps["stdout"].split()[-1] == "0000000000000000", caps
        # A background process in the template's userland.
        bg = await call(c, "execute", sandbox_id=sid, command="echo started; sleep 30", background=True)
        assert bg["process_id"]
        await call(c, "destroy", sandbox_id=sid)
    assert not list(templates_dir.glob("box/rootfs/workspace/*")), "the template never changes"
    removed = corral(templates_dir, tmp_path, "sandbox", "templates", "rm", "box")
    assert removed.returncode == 0 and not (templates_dir / "box").exists()
    assert corral(templates_dir, tmp_path, "sandbox", "templates", "list").stdout == ""


@pytest.mark.requires("bwrap")
@pytest.mark.skipif(
    not DEBIAN_TREE.is_dir() and not os.environ.get("CI"),
    reason=f"no Debian minbase tree at {DEBIAN_TREE} (debootstrap needs the network)",
)
async def test_a_debian_userland_runs_as_a_template(tpl: Harness, templates_dir: Path, tmp_path: Path) -> None:
    if not DEBIAN_TREE.is_dir():
        pytest.skip(f"no Debian minbase tree at {DEBIAN_TREE}: debootstrap cannot run offline")
    added = corral(templates_dir, tmp_path, "sandbox", "templates", "add", "debian", "--from-rootfs", str(DEBIAN_TREE))
    assert added.returncode == 0, added.stderr
    async with tpl.client() as c:
        sid = (await call(c, "provision", template="debian"))["sandbox_id"]
        out = await call(
            c,
            "execute",
            sandbox_id=sid,
            command=". /etc/os-release; echo $ID $VERSION_CODENAME; dpkg -l | grep -c ^ii; echo $0",
        )
        assert out["exit_code"] == 0, out
        lines = out["stdout"].split("\n")
        assert lines[0] == "debian bookworm" and int(lines[1]) > 50 and lines[2] == "/bin/bash", out
        if os.geteuid() == 0:  # its writable system layer: the package database and /etc are the sandbox's own
            done = await call(
                c,
                "execute",
                sandbox_id=sid,
                command="echo 'Acquire::Retries 0;' > /etc/apt/apt.conf.d/9x && touch /var/lib/dpkg/lock-x && dpkg -s dash | head -1",
            )
            assert done["exit_code"] == 0 and done["stdout"] == "Package: dash\n", done
            assert not (templates_dir / "debian/rootfs/etc/apt/apt.conf.d/9x").exists()


@pytest.mark.requires("bwrap")
async def test_a_template_is_only_ever_a_registered_name(tpl: Harness, templates_dir: Path) -> None:
    before = set(os.listdir(tpl.settings.sandbox_dir)) if tpl.settings.sandbox_dir.exists() else set()
    async with tpl.client() as c:
        assert "no template 'nope' is registered" in await fail(c, "provision", "not_found", template="nope")
        assert "flag" in await fail(c, "provision", "invalid_argument", template="--privileged")
        assert "a path" in await fail(c, "provision", "invalid_argument", template="/usr")
        assert "a path" in await fail(c, "provision", "invalid_argument", template="../sandboxes")
        assert "a path" in await fail(c, "provision", "invalid_argument", template="a/b")
    after = set(os.listdir(tpl.settings.sandbox_dir)) if tpl.settings.sandbox_dir.exists() else set()
    assert after - before <= {".etc"}, "nothing was provisioned"


@pytest.mark.requires("bwrap")
def test_templates_cli_refuses_bad_names_and_sources(templates_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = corral(templates_dir, tmp_path, "sandbox", "templates", "add", "x", "--from-rootfs", str(empty))
    assert bad.returncode == 1 and "no /bin/sh" in bad.stderr, bad.stderr
    flag = corral(templates_dir, tmp_path, "sandbox", "templates", "add", "../x", "--from-rootfs", str(empty))
    assert flag.returncode == 1 and "invalid_argument" in flag.stderr and "a path" in flag.stderr
    gone = corral(templates_dir, tmp_path, "sandbox", "templates", "rm", "nope")
    assert gone.returncode == 1 and "not_found" in gone.stderr
    assert not templates_dir.exists() or not [p for p in templates_dir.iterdir()], "nothing half-made is left"


@pytest.mark.requires("bwrap", "docker")
@pytest.mark.skipif(os.geteuid() != 0, reason="the writable system layer is an overlay the server mounts as root")
async def test_a_template_sandbox_writes_its_own_system_layer(
    tpl: Harness, templates_dir: Path, tmp_path: Path
) -> None:
    added = corral(templates_dir, tmp_path, "sandbox", "templates", "add", "box", "--from-docker", TEST_IMAGE)
    assert added.returncode == 0, added.stderr
    rootfs = templates_dir / "box" / "rootfs"
    before = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*"))
    async with tpl.client() as c:
        a = (await call(c, "provision", template="box"))["sandbox_id"]
        b = (await call(c, "provision", template="box"))["sandbox_id"]
        write = "mkdir -p /usr/local/bin && printf '#!/bin/sh\\necho tool\\n' > /usr/local/bin/tool && chmod +x /usr/local/bin/tool"
        write += " && echo 'nameserver 10.0.0.1' > /etc/resolv.conf && echo ok >> /etc/passwd && rm /bin/vi"
        done = await call(c, "execute", sandbox_id=a, command=write)
        assert done["exit_code"] == 0, done
        seen = await call(
            c, "execute", sandbox_id=a, command="tool; cat /etc/resolv.conf; tail -1 /etc/passwd; ls /bin/vi"
        )
        assert seen["stdout"] == "tool\nnameserver 10.0.0.1\nok\n" and "No such file" in seen["stderr"], seen
        # Not in another sandbox of the template, not in the template.
        other = await call(
            c, "execute", sandbox_id=b, command="ls /usr/local/bin/tool; tail -1 /etc/passwd; ls /bin/vi"
        )
        assert "No such file" in other["stderr"] and "ok" not in other["stdout"] and "/bin/vi" in other["stdout"], other
        assert not (rootfs / "usr/local/bin/tool").exists() and (rootfs / "bin/vi").is_symlink()
        await call(c, "destroy", sandbox_id=a)
        base = tpl.settings.sandbox_dir / a
        assert not base.exists(), "destroy discards the layer"
        assert str(base) not in Path("/proc/self/mountinfo").read_text(), "and its mount"
        # The other one is untouched by the destroy.
        assert (await call(c, "execute", sandbox_id=b, command="echo still"))["stdout"] == "still\n"
        busy = corral(templates_dir, tmp_path, "sandbox", "templates", "rm", "box")
        assert busy.returncode == 1 and "conflict:" in busy.stderr and "in use by 1 sandbox" in busy.stderr, busy.stderr
        await call(c, "destroy", sandbox_id=b)
    assert sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*")) == before
    assert corral(templates_dir, tmp_path, "sandbox", "templates", "rm", "box").returncode == 0


@pytest.mark.requires("bwrap", "docker")
@pytest.mark.skipif(os.geteuid() != 0, reason="the writable system layer is an overlay the server mounts as root")
async def test_the_system_layer_outlives_a_reboot(tpl: Harness, templates_dir: Path, tmp_path: Path) -> None:
    tarball = tmp_path / "box.tar"
    subprocess.run(
        [
            "sh",
            "-c",
            f"c=$(docker create --pull never {TEST_IMAGE} /bin/sh) && docker export -o {tarball} $c && docker rm $c",
        ],
        check=True,
        capture_output=True,
    )
    added = corral(templates_dir, tmp_path, "sandbox", "templates", "add", "tarred", "--from-rootfs", str(tarball))
    assert added.returncode == 0, added.stderr
    async with tpl.client() as c:
        sid = (await call(c, "provision", template="tarred"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="echo kept > /etc/kept")
    base = tpl.settings.sandbox_dir / sid
    init = json.loads((base / "init.json").read_text())["init"]["pid"]
    os.kill(init, signal.SIGKILL)  # the host rebooted while the server was down: no init, no mount
    await until(lambda: not Path(f"/proc/{init}").exists(), "the init is gone", seconds=10)
    subprocess.run(["umount", str(base / "rootfs")], check=True)
    again = tpl.restart()
    async with again.client() as c:
        r = await call(c, "execute", sandbox_id=sid, command="cat /etc/kept")
        assert r["stdout"] == "kept\n" and "stopped" in r["notice"], r
        await call(c, "destroy", sandbox_id=sid)
    assert not base.exists() and str(base) not in Path("/proc/self/mountinfo").read_text()
