"""Checkpoints of docker sandboxes (what the container changed of its image: workspace, /root
and the rest of its writable layer) through an MCP client; E2B says it cannot take them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mcp.client import Client

from corral.servers.sandbox.config import SandboxSettings

from .conftest import Harness, _cleanup, call, fail

pytestmark = pytest.mark.anyio

# The system layer (test_checkpoints.py covers the workspace on both backends): an image file
# changed, one deleted, software installed, a file in /root, image files that became dirs.
MAKE = (
    "rm /bin/vi && mkdir -p /usr/local/bin && echo tool > /usr/local/bin/mytool && chmod 0755 /usr/local/bin/mytool"
    " && echo 'extra:x:1000:1000::/:/bin/sh' >> /etc/passwd && echo home > /root/.profile-test && echo w > in-workspace"
    " && rm /bin/cal && mkdir /bin/cal && echo in > /bin/cal/inner && rm /etc/mtab && mkdir /etc/mtab"
)
# What a restore must reproduce: type, mode, size, link target and content hash of everything.
LISTING = (
    "find /workspace /root /usr /etc/passwd /etc/mtab /bin/cal | sort | while IFS= read -r p; do stat -c '%F %a %s %N' \"$p\"; done"
    " && find /workspace /root /usr /etc/passwd /bin/cal -type f -exec sha256sum {} + | sort && ls /bin/vi 2>&1"
)


@pytest.fixture
def dk(settings: SandboxSettings, docker_image: str) -> Iterator[Harness]:
    h = Harness("docker", settings)
    yield h
    _cleanup(h)


async def _state(c: Client, sid: str) -> str:
    out = await call(c, "execute", sandbox_id=sid, command=LISTING)
    assert out["exit_code"] == 1, out  # `ls /bin/vi` fails: it was deleted
    return out["stdout"]


async def _run(c: Client, sid: str, command: str) -> str:
    out = await call(c, "execute", sandbox_id=sid, command=command)
    assert out["exit_code"] == 0, out
    return out["stdout"]


@pytest.mark.requires("docker")
async def test_a_docker_checkpoint_keeps_the_containers_system_layer(dk: Harness) -> None:
    async with dk.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await _run(c, sid, MAKE)
        first = await _state(c, sid)
        assert "No such file" in first and "/usr/local/bin/mytool" in first  # sanity: the listing sees both
        one = await call(c, "checkpoint", sandbox_id=sid, label="made")
        assert one["files_changed"] == one["files"] >= 8, one
        await _run(c, sid, "rm /root/.profile-test && rm /bin/ls && echo more >> /usr/local/bin/mytool")
        later = await _state(c, sid)
        two = await call(c, "checkpoint", sandbox_id=sid)
        assert two["parent"] == one["checkpoint_id"] and two["bytes_added"] == 10, two
        assert two["files_changed"] == 2, two  # mytool, the whiteout of /bin/ls (deletions are not counted)
        restored = await call(c, "restore", checkpoint_id=one["checkpoint_id"])
        new = restored["sandbox_id"]
        assert await _state(c, new) == first
        assert await _state(c, sid) == later, "the original is untouched"
        again = await call(c, "checkpoint", sandbox_id=new)
        assert again["files_changed"] == 0 and again["bytes_added"] == 0, "a restore primes the next checkpoint"


@pytest.mark.requires("docker")
async def test_a_docker_restore_in_place_stops_processes_and_undoes_later_changes(dk: Harness) -> None:
    async with dk.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="a.txt", content="v1")
        await _run(c, sid, "echo one >> /etc/passwd")
        one = await call(c, "checkpoint", sandbox_id=sid)
        await call(c, "write_file", sandbox_id=sid, path="a.txt", content="v2")
        await call(c, "write_file", sandbox_id=sid, path="b.txt", content="later")
        # Image files changed or deleted after the checkpoint come back as the image has them.
        await _run(c, sid, "echo two >> /etc/passwd && rm /bin/tar && echo x > /etc/group && mkdir /opt")
        await call(c, "execute", sandbox_id=sid, command="sleep 600", background=True)
        back = await call(c, "restore", checkpoint_id=one["checkpoint_id"], in_place=True)
        assert back["sandbox_id"] == sid and back["in_place"] and "stopped" in back["notice"]
        out = await _run(
            c, sid, "cat a.txt; ls; tail -1 /etc/passwd; ls /bin/tar; grep -c root /etc/group; ls -d /opt 2>&1; ps"
        )
        assert out.startswith("v1a.txt\none\n/bin/tar\n1\n"), out
        assert "No such file" in out and "sleep 600" not in out, out
        after = await call(c, "checkpoint", sandbox_id=sid)
        assert after["files_changed"] == 0, after


@pytest.mark.requires("docker")
async def test_a_docker_restore_in_place_of_an_unchanged_sandbox_still_stops_its_processes(dk: Harness) -> None:
    async with dk.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        one = await call(c, "checkpoint", sandbox_id=sid)
        await call(c, "execute", sandbox_id=sid, command="sleep 600", background=True)
        back = await call(c, "restore", checkpoint_id=one["checkpoint_id"], in_place=True)
        assert "stopped" in back["notice"]
        assert "sleep 600" not in await _run(c, sid, "ps")


@pytest.mark.requires("docker")
async def test_a_docker_checkpoint_taken_while_a_process_writes_is_consistent_per_file(dk: Harness) -> None:
    async with dk.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="while :; do echo line >> log; done", background=True)
        taken = [await call(c, "checkpoint", sandbox_id=sid) for _ in range(3)]
        assert all(t["files"] >= 1 for t in taken), taken
        new = (await call(c, "restore", checkpoint_id=taken[-1]["checkpoint_id"]))["sandbox_id"]
        out = await _run(c, new, "wc -c < log; grep -vc '^line$' log; true")
        size, others = out.split()
        assert int(size) > 0 and int(size) % 5 == 0 and others == "0", out  # whole lines, as tar read them


@pytest.mark.requires("docker")
async def test_a_docker_checkpoint_skips_device_nodes_with_a_note(dk: Harness) -> None:
    async with dk.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await _run(c, sid, "mknod null c 1 3 && echo kept > f")
        one = await call(c, "checkpoint", sandbox_id=sid)
        assert one["skipped"] == ["/workspace/null: a device node (not captured)"], one
        new = (await call(c, "restore", checkpoint_id=one["checkpoint_id"]))["sandbox_id"]
        assert await _run(c, new, "ls") == "f\n"


@pytest.mark.requires("docker")
async def test_a_docker_checkpoint_is_taken_of_a_lost_sandbox_as_lost(dk: Harness) -> None:
    async with dk.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        import subprocess

        subprocess.run(["docker", "rm", "-f", f"corral-{sid}"], capture_output=True, timeout=60, check=True)
        await fail(c, "checkpoint", "sandbox_lost", sandbox_id=sid)


@pytest.mark.requires("docker")
async def test_a_docker_checkpoint_keeps_odd_names_hard_links_and_a_remade_image_dir(dk: Harness) -> None:
    # /bin deleted and made anew (an opaque dir for overlayfs), a name holding a newline (docker
    # diff prints it raw) and one that is not UTF-8, two hard links to one changed file, large files: dense and all zeros.
    make = (
        "printf one > \"$(printf 'new\\nline')\" && printf two > \"$(printf 'bad\\377name')\" && echo same > h1 && ln h1 h2 && cp /bin/busybox /busybox"
        " && /busybox rm -rf /bin && /busybox mkdir /bin && /busybox --install -s /bin && echo kept > /bin/mine && rm /bin/vi"
        " && head -c 2500000 /dev/urandom > big && head -c 3000000 /dev/zero > zeros"
    )
    look = "cat \"$(printf 'new\\nline')\" \"$(printf 'bad\\377name')\" h1 h2 /bin/mine; readlink /bin/sh; ls /bin | wc -l; ls /bin/vi 2>&1; ls -a /bin | grep -c vi; sha256sum big zeros; true"
    async with dk.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await _run(c, sid, make)
        before = await _run(c, sid, look)
        assert before == "onetwosame\nsame\nkept\n/busybox\n" + before.split("/busybox\n")[1], before
        one = await call(c, "checkpoint", sandbox_id=sid)
        new = (await call(c, "restore", checkpoint_id=one["checkpoint_id"]))["sandbox_id"]
        assert await _run(c, new, look) == before
        await _run(c, sid, "rm /bin/mine h2")
        await call(c, "restore", checkpoint_id=one["checkpoint_id"], in_place=True)
        assert await _run(c, sid, look) == before


@pytest.mark.requires("docker")
async def test_a_docker_checkpoint_past_the_file_cap_is_refused(settings: SandboxSettings, docker_image: str) -> None:
    h = Harness("docker", settings.model_copy(update={"checkpoint_max_files": 20}))
    try:
        async with h.client() as c:
            sid = (await call(c, "provision"))["sandbox_id"]
            await _run(c, sid, "for i in $(seq 30); do echo $i > f$i; done")
            assert "too many to checkpoint" in await fail(c, "checkpoint", "invalid_argument", sandbox_id=sid)
            assert (await call(c, "list_checkpoints", sandbox_id=sid))["checkpoints"] == []
    finally:
        _cleanup(h)


async def test_e2b_checkpoints_are_its_own_snapshots(settings: SandboxSettings) -> None:
    """E2B snapshots whole sandboxes itself: a checkpoint is a filesystem snapshot (recorded with
    its id), restore starts a new sandbox from it, in place is refused, and the retention sweep
    deletes the snapshot at E2B (against the fake that honours the SDK's interface)."""
    from .fake_e2b import FakeCloud

    h = Harness("e2b", settings.model_copy(update={"checkpoint_retention_s": 0}))
    async with h.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="notes.txt", content="step one")
        one = await call(c, "checkpoint", sandbox_id=sid, label="one")
        assert one["files"] == 0 and one["bytes_added"] == 0, "the files are E2B's, not in our store"
        await call(c, "write_file", sandbox_id=sid, path="notes.txt", content="step two")
        text = await fail(c, "restore", "invalid_argument", checkpoint_id=one["checkpoint_id"], in_place=True)
        assert "new sandbox only" in text
        new = (await call(c, "restore", checkpoint_id=one["checkpoint_id"]))["sandbox_id"]
        assert new != sid
        assert (await call(c, "read_file", sandbox_id=new, path="notes.txt"))["content"] == "step one"
        assert (await call(c, "read_file", sandbox_id=sid, path="notes.txt"))["content"] == "step two"
        # A forked caller whose log names the checkpoint starts in that state, in a sandbox of its own.
        meta = {"corral/client": "ses_child", "corral/checkpoint": one["checkpoint_id"]}
        forked = await c.call_tool("read_file", {"path": "notes.txt"}, meta=meta)
        assert forked.structured_content["content"] == "step one", forked.content[0].text
        made = await c.call_tool("execute", {"command": "cat notes.txt"}, meta=meta)
        assert made.structured_content["stdout"] == "step one", made.structured_content
        assert made.structured_content["sandbox_id"] == forked.structured_content["sandbox_id"]
        snapshots = set(FakeCloud.snapshots)
        assert len(snapshots) == 1
        for box in (sid, new, made.structured_content["sandbox_id"]):
            await call(c, "destroy", sandbox_id=box)
        await h.service.sweep()  # retention 0: the destroyed sandboxes' checkpoints go, and E2B's snapshot
        assert not snapshots & set(FakeCloud.snapshots)
