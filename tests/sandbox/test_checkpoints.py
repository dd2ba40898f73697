"""Checkpoints through an MCP client: a checkpoint holds exactly the sandbox's files, the next
one stores only what changed, restore gives them back (a new sandbox, or in place), and a
caller whose log names a checkpoint gets its default sandbox in that state. The tests that take
`iso` run on bubblewrap and docker; test_checkpoints_docker.py has docker's own."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mcp.client import Client

from tests.parts import TEST_IMAGE

from .conftest import Harness, call, fail
from .test_templates import DEBIAN_TREE, corral, templates_dir, tpl  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio

# Every kind of entry a checkpoint keeps; modes, an empty dir, a symlink out, a fifo, a sparse file.
MAKE = (
    "mkdir -p src/pkg empty && echo 'print(1)' > src/pkg/main.py && printf 'x' > src/one && chmod 0751 src/one"
    " && ln -s /etc/passwd out-link && ln -s src/pkg rel-link && mkfifo pipe && printf 'a\\nb' > 'name with spaces'"
    " && truncate -s 5M sparse && printf tail >> sparse && echo home > /root/.profile-test && chmod 0700 empty"
)
# What a restore must reproduce: type, mode, size, link target and content hash of everything.
# Portable: GNU tools (bubblewrap runs the host's) and busybox (the docker test image).
LISTING = (
    "cd /workspace && find . /root/.profile-test | sort | while IFS= read -r p; do stat -c '%F %a %s %N' \"$p\"; done"
    " && find . -type f -exec sha256sum {} + | sort && du -k sparse | cut -f1"
)


async def _state(c: Client, sid: str) -> str:
    out = await call(c, "execute", sandbox_id=sid, command=LISTING)
    assert out["exit_code"] == 0, out
    return out["stdout"]


async def test_restore_gives_back_exactly_the_checkpointed_files(iso: Harness) -> None:
    async with iso.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        assert (await call(c, "execute", sandbox_id=sid, command=MAKE))["exit_code"] == 0
        first = await _state(c, sid)
        one = await call(c, "checkpoint", sandbox_id=sid, label="made")
        assert one["label"] == "made" and one["parent"] is None and one["files"] >= 9, one
        await call(c, "execute", sandbox_id=sid, command="rm -r src/pkg && echo new > new.txt && chmod 600 src/one")
        later = await _state(c, sid)
        two = await call(c, "checkpoint", sandbox_id=sid)
        assert two["parent"] == one["checkpoint_id"] and two["bytes_added"] < 100, two
        restored = await call(c, "restore", checkpoint_id=one["checkpoint_id"])
        new = restored["sandbox_id"]
        assert new != sid and not restored["in_place"]
        assert await _state(c, new) == first
        sparse_kib = int(first.split()[-1])
        assert sparse_kib < 1024, "a sparse file comes back sparse"
        assert await _state(c, sid) == later, "the original is untouched"
        listed = await call(c, "list_checkpoints", sandbox_id=sid)
        assert [x["checkpoint_id"] for x in listed["checkpoints"]] == [one["checkpoint_id"], two["checkpoint_id"]]


async def test_an_incremental_checkpoint_reads_and_stores_only_what_changed(iso: Harness) -> None:
    async with iso.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        make = "mkdir d && for i in $(seq 300); do head -c 2000 /dev/urandom > d/f$i; done"
        await call(c, "execute", sandbox_id=sid, command=make)
        full = await call(c, "checkpoint", sandbox_id=sid)
        assert full["bytes_added"] >= 600_000 and full["files_changed"] >= 301, full  # + a system layer's dirs
        await call(c, "execute", sandbox_id=sid, command="echo changed > d/f7")
        step = await call(c, "checkpoint", sandbox_id=sid)
        assert step["files_changed"] == 1 and step["bytes_added"] == 8, step
        same = await call(c, "checkpoint", sandbox_id=sid)
        assert same["files_changed"] == 0 and same["bytes_added"] == 0, same
        # The same content in another sandbox is stored once.
        other = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=other, command="echo changed > copy")
        assert (await call(c, "checkpoint", sandbox_id=other))["bytes_added"] == 0


async def test_restore_in_place_rolls_back_and_stops_processes(iso: Harness) -> None:
    async with iso.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="true")  # started: its system layer (if any) is made
        await call(c, "write_file", sandbox_id=sid, path="a.txt", content="v1")
        one = await call(c, "checkpoint", sandbox_id=sid)
        await call(c, "write_file", sandbox_id=sid, path="a.txt", content="v2")
        await call(c, "write_file", sandbox_id=sid, path="b.txt", content="later")
        await call(c, "execute", sandbox_id=sid, command="sleep 600", background=True)
        back = await call(c, "restore", checkpoint_id=one["checkpoint_id"], in_place=True)
        assert back["sandbox_id"] == sid and back["in_place"] and "stopped" in back["notice"]
        out = await call(c, "execute", sandbox_id=sid, command="cat a.txt; ls; pgrep -f 'slee[p] 600' | wc -l")
        assert out["stdout"] == "v1a.txt\n0\n", out
        after = await call(c, "checkpoint", sandbox_id=sid)
        assert after["files_changed"] == 0, "a restore primes the next checkpoint: nothing to reread"


async def test_bad_checkpoint_ids_are_clear_errors(iso: Harness) -> None:
    async with iso.client() as c:
        assert "no checkpoint" in await fail(c, "restore", "not_found", checkpoint_id="ckpt_00000000000000000000")
        assert "no checkpoint" in await fail(c, "restore", "not_found", checkpoint_id="../../etc/passwd")
        sid = (await call(c, "provision"))["sandbox_id"]
        one = await call(c, "checkpoint", sandbox_id=sid)
        await call(c, "destroy", sandbox_id=sid)
        await fail(c, "restore", "sandbox_lost", checkpoint_id=one["checkpoint_id"], in_place=True)
        # Its checkpoints outlive it: the session's log names them.
        again = await call(c, "restore", checkpoint_id=one["checkpoint_id"])
        assert again["sandbox_id"] != sid
        listed = await call(c, "list_checkpoints", sandbox_id=sid)
        assert [x["checkpoint_id"] for x in listed["checkpoints"]] == [one["checkpoint_id"]]


async def test_checkpoints_off_says_so(settings, needs_bwrap) -> None:
    h = Harness("bubblewrap", settings.model_copy(update={"checkpoint_store": "off"}))
    async with h.client() as c:
        text = await fail(c, "checkpoint", "invalid_argument")
        assert "checkpoints are off" in text


# -- the workspace a caller's log names (_meta corral/checkpoint) ------------------------


def _meta(client: str, checkpoint: str | None = None) -> dict[str, str]:
    return {"corral/client": client, **({"corral/checkpoint": checkpoint} if checkpoint else {})}


async def _run(c: Client, command: str, meta: dict[str, str]) -> dict:
    result = await c.call_tool("execute", {"command": command}, meta=meta)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def test_a_forked_caller_gets_its_default_sandbox_restored_from_its_checkpoint(iso: Harness) -> None:
    async with iso.client() as c:
        parent = await _run(c, "echo step1 > f", _meta("ses_parent"))
        one = await c.call_tool("checkpoint", {}, meta=_meta("ses_parent"))
        ckpt = one.structured_content["checkpoint_id"]
        await _run(c, "echo step2 > f", _meta("ses_parent", ckpt))
        # A child forked at the first step: no sandbox of its own yet, its log names `ckpt`. Even its
        # first call being a read finds that state.
        read = await c.call_tool("read_file", {"path": "f"}, meta=_meta("ses_child", ckpt))
        assert read.structured_content["content"] == "step1\n", read.content[0].text
        child = await _run(c, "cat f", _meta("ses_child", ckpt))
        assert child["stdout"] == "step1\n" and child["sandbox_id"] != parent["sandbox_id"]
        assert ckpt in child["notice"] and "restored" in child["notice"]
        assert child["sandbox_id"] == read.structured_content["sandbox_id"]
        again = await _run(c, "cat f", _meta("ses_child", ckpt))
        assert again["sandbox_id"] == child["sandbox_id"] and again["notice"] is None
        # A child whose log names no checkpoint starts fresh.
        fresh = await _run(c, "ls", _meta("ses_other"))
        assert fresh["stdout"] == "" and fresh["sandbox_id"] not in (parent["sandbox_id"], child["sandbox_id"])


async def test_a_default_sandbox_ahead_of_its_log_is_put_back(iso: Harness) -> None:
    async with iso.client() as c:
        await _run(c, "echo kept > f", _meta("ses_a"))
        ckpt = (await c.call_tool("checkpoint", {}, meta=_meta("ses_a"))).structured_content["checkpoint_id"]
        # Work the log never recorded (the harness died before writing its checkpoint event).
        await _run(c, "echo lost > f && touch extra", _meta("ses_a", ckpt))
        newer = (await c.call_tool("checkpoint", {}, meta=_meta("ses_a", ckpt))).structured_content
        back = await _run(c, "cat f; ls", _meta("ses_a", ckpt))
        assert back["stdout"] == "kept\nf\n" and "put back" in back["notice"], back
        assert back["sandbox_id"] == newer["sandbox_id"]
        # In step with its log: nothing happens.
        same = await _run(c, "cat f", _meta("ses_a", ckpt))
        assert same["notice"] is None
        # An id this server does not know changes nothing.
        other = await _run(c, "cat f", _meta("ses_a", "ckpt_ffffffffffffffffffff"))
        assert other["stdout"] == "kept\n" and other["notice"] is None


@pytest.mark.requires("bwrap", "docker")
@pytest.mark.skipif(os.geteuid() != 0, reason="the writable system layer is an overlay the server mounts as root")
async def test_a_template_sandbox_checkpoints_its_system_layer(
    tpl: Harness,  # noqa: F811
    templates_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    added = corral(templates_dir, tmp_path, "sandbox", "templates", "add", "box", "--from-docker", TEST_IMAGE)
    assert added.returncode == 0, added.stderr
    async with tpl.client() as c:
        sid = (await call(c, "provision", template="box"))["sandbox_id"]
        change = "mkdir -p /usr/local/bin && echo tool > /usr/local/bin/mytool && echo x >> /etc/passwd && rm /bin/vi && mkdir -p /opt/app/empty"
        assert (await call(c, "execute", sandbox_id=sid, command=change))["exit_code"] == 0
        look = "cat /usr/local/bin/mytool; tail -1 /etc/passwd; ls /bin/vi 2>&1; ls -d /opt/app/empty"
        before = (await call(c, "execute", sandbox_id=sid, command=look))["stdout"]
        one = await call(c, "checkpoint", sandbox_id=sid)
        restored = await call(c, "restore", checkpoint_id=one["checkpoint_id"])
        assert (await call(c, "execute", sandbox_id=restored["sandbox_id"], command=look))["stdout"] == before
        assert "No such file" in before and "tool" in before
        for s in (sid, restored["sandbox_id"]):
            await call(c, "destroy", sandbox_id=s)
        gone = corral(templates_dir, tmp_path, "sandbox", "templates", "rm", "box")
        assert gone.returncode == 0, gone.stderr
        text = await fail(c, "restore", "not_found", checkpoint_id=one["checkpoint_id"])
        assert "'box'" in text and "not registered" in text


def _deb(tmp_path: Path) -> bytes:
    """A tiny Debian package, built here (no network): installs /usr/bin/corral-hello."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        "Package: corral-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@localhost>\nDescription: test\n"
    )
    tool = root / "usr/bin/corral-hello"
    tool.write_text("#!/bin/sh\necho hello from a package\n")
    tool.chmod(0o755)
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(tmp_path / "p.deb")], check=True)
    return (tmp_path / "p.deb").read_bytes()


@pytest.mark.requires("bwrap")
@pytest.mark.skipif(os.geteuid() != 0, reason="the writable system layer is an overlay the server mounts as root")
@pytest.mark.skipif(
    not DEBIAN_TREE.is_dir(), reason=f"no Debian minbase tree at {DEBIAN_TREE} (debootstrap needs the network)"
)
@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb (Debian's dpkg) builds the test package")
async def test_apt_get_installs_a_package_that_a_checkpoint_keeps(
    tpl: Harness,  # noqa: F811
    templates_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    added = corral(templates_dir, tmp_path, "sandbox", "templates", "add", "debian", "--from-rootfs", str(DEBIAN_TREE))
    assert added.returncode == 0, added.stderr
    async with tpl.client() as c:
        sid = (await call(c, "provision", template="debian"))["sandbox_id"]
        deb = base64.b64encode(_deb(tmp_path)).decode()
        await call(c, "write_file", sandbox_id=sid, path="hello.deb", content=deb, encoding="base64")
        # What an agent types: plain apt-get, as the sandbox's root.
        done = await call(c, "execute", sandbox_id=sid, command="apt-get install -y ./hello.deb", timeout_s=180)
        assert done["exit_code"] == 0, done
        use = "corral-hello && dpkg -s corral-hello | grep Status"
        assert (await call(c, "execute", sandbox_id=sid, command=use))["stdout"] == (
            "hello from a package\nStatus: install ok installed\n"
        )
        one = await call(c, "checkpoint", sandbox_id=sid)
        again = await call(c, "restore", checkpoint_id=one["checkpoint_id"])
        kept = await call(c, "execute", sandbox_id=again["sandbox_id"], command=use)
        assert kept["stdout"].startswith("hello from a package"), kept
    assert not os.path.exists("/usr/bin/corral-hello"), "the host is unchanged"
    assert not (templates_dir / "debian/rootfs/usr/bin/corral-hello").exists(), "and so is the template"


async def test_a_checkpoint_never_follows_a_directory_swapped_for_a_symlink(bw: Harness) -> None:
    """The scan runs while the sandbox does: a directory it keeps replacing with a symlink to
    `/` (the host's root, seen from the server) must be captured as what it is at that
    instant, never walked into."""
    swap = "while true; do mkdir -p d/x; rm -rf d; ln -s / d; rm -f d; done"
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command=swap, background=True)
        taken = [(await call(c, "checkpoint", sandbox_id=sid))["checkpoint_id"] for _ in range(100)]
        store = bw.service.checkpoints.store
        seen = set()
        for checkpoint_id in taken:
            for path, entry in store.manifest(checkpoint_id).items():
                if path.startswith("workspace/d"):
                    seen.add(entry.type)
                    assert path in ("workspace/d", "workspace/d/x"), f"walked out of the sandbox: {path}"
    assert seen, "the race was never caught: the test checked nothing"


@pytest.mark.skipif(os.geteuid() != 0, reason="the writable system layer is an overlay the server mounts as root")
async def test_the_default_sandboxs_system_layer_is_checkpointed(bw: Harness) -> None:
    """The host-userland sandbox's own layer: installed tools, /etc edits and deletions of host
    files come back with a restore (new or in place), and the host never changes."""
    if bw.backend.hostlayer is None:
        pytest.skip("this kernel gives sandboxes a read-only system (no id-mapped mounts)")
    change = (
        "printf '#!/bin/sh\\necho mine\\n' > /usr/local/bin/mytool && chmod 755 /usr/local/bin/mytool"
        " && echo 'setting=1' > /etc/corral-test.conf && rm /usr/bin/true"
    )
    look = "mytool; cat /etc/corral-test.conf; ls /usr/bin/true 2>&1 | grep -c 'No such'"
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        assert (await call(c, "execute", sandbox_id=sid, command=change))["exit_code"] == 0
        before = (await call(c, "execute", sandbox_id=sid, command=look))["stdout"]
        assert before == "mine\nsetting=1\n1\n", before
        one = await call(c, "checkpoint", sandbox_id=sid)
        fresh = await call(c, "restore", checkpoint_id=one["checkpoint_id"])
        assert (await call(c, "execute", sandbox_id=fresh["sandbox_id"], command=look))["stdout"] == before
        await call(c, "execute", sandbox_id=sid, command="rm /usr/local/bin/mytool /etc/corral-test.conf")
        await call(c, "restore", checkpoint_id=one["checkpoint_id"], in_place=True)
        assert (await call(c, "execute", sandbox_id=sid, command=look))["stdout"] == before
    assert os.path.exists("/usr/bin/true") and not os.path.exists("/etc/corral-test.conf")
