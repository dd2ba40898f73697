"""Checkpoints under bad input, on bubblewrap, through an MCP client: unknown, malformed and
foreign ids, a removed template, a 2 GB sparse file, 100,000 files, the caps, symlinks that
point out, FIFOs, sockets and device nodes, a file rewritten while it is captured, a server
killed mid-checkpoint, and what garbage collection frees. Each is a clear error (or a note)
and loses nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mcp import StdioServerParameters
from mcp.client import Client

from corral.servers.sandbox.checkpoints.local import LocalCheckpointStore
from corral.servers.sandbox.checkpoints.store import CheckpointStore
from corral.servers.sandbox.config import SandboxSettings
from corral.servers.sandbox.templates import TemplateStore
from tests.conftest import until
from tests.parts import corral_exe

from .conftest import Harness, _cleanup, call, fail

pytestmark = [pytest.mark.anyio, pytest.mark.requires("bwrap")]

GIB = 1 << 30


def workspace(h: Harness, sid: str) -> Path:
    return h.settings.sandbox_dir / sid / "workspace"


def store_of(h: Harness) -> CheckpointStore:
    assert h.service.checkpoints is not None
    return h.service.checkpoints.store


def blob_files(root: Path) -> dict[str, Path]:
    """digest -> file of every blob a local store holds."""
    return {p.name: p for p in (root / "blobs").glob("*/*")}


def referenced(root: Path) -> set[str]:
    """The blobs the store's committed checkpoints reference (read straight from its index)."""
    store = LocalCheckpointStore(root, 1 << 40)
    try:
        return {r[0] for r in store._db.execute("SELECT digest FROM refs")}
    finally:
        store.close()


def local_root(settings: SandboxSettings) -> Path:
    return settings.sandboxes_dir() / "checkpoints"


@pytest.fixture
def server(settings: SandboxSettings, needs_bwrap: None) -> Iterator[Callable[..., Harness]]:
    """Bubblewrap servers with settings the test overrides: `server(checkpoint_max_mb=1)`."""
    made: list[Harness] = []

    def make(**overrides: object) -> Harness:
        made.append(Harness("bubblewrap", settings.model_copy(update=overrides)))
        return made[-1]

    yield make
    for h in made:
        _cleanup(h)


# -- ids ---------------------------------------------------------------------------------


async def test_unknown_malformed_and_foreign_ids_are_not_found_and_lose_nothing(bw: Harness) -> None:
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="kept.txt", content="kept\n")
        good = (await call(c, "checkpoint", sandbox_id=sid, label="good"))["checkpoint_id"]
        for bad in (
            "ckpt_00000000000000000000",
            "../../etc/passwd",
            "",
            "ckpt_'; DROP TABLE checkpoints; --",
            "x" * 5000,
        ):
            text = await fail(c, "restore", "not_found", checkpoint_id=bad)
            assert "no checkpoint" in text and "list_checkpoints" in text, text
        # A checkpoint another backend wrote into a shared store: never restored by this one.
        store = store_of(bw)
        mine = store.get(good)
        assert mine is not None
        foreign = mine.model_copy(update={"id": "ckpt_" + "d0" * 10, "backend": "docker", "sandbox_id": "sb_other"})
        store.commit(foreign, store.raw_delta(good), set())
        text = await fail(c, "restore", "not_found", checkpoint_id=foreign.id)
        assert foreign.id in text, text
        # Nothing was lost or made: the good checkpoint is still listed and restores.
        listed = (await call(c, "list_checkpoints", sandbox_id=sid))["checkpoints"]
        assert [k["checkpoint_id"] for k in listed] == [good]
        assert len((await call(c, "list_sandboxes"))["sandboxes"]) == 1  # no half-made sandbox left
        back = (await call(c, "restore", checkpoint_id=good))["sandbox_id"]
        assert (await call(c, "read_file", sandbox_id=back, path="kept.txt"))["content"] == "kept\n"


# -- a removed template ----------------------------------------------------------------


def owner(h: Harness) -> int | None:
    """As root, the template belongs to the sandbox uid (what `corral sandbox templates add` does)."""
    return h.settings.sandbox_run_as_uid if os.geteuid() == 0 else None


@pytest.fixture
def tpl(
    settings: SandboxSettings, sandbox_root: Path, needs_bwrap: None
) -> Iterator[tuple[Harness, TemplateStore, Path]]:
    """A server with templates, and a tiny busybox root filesystem registered as `box`."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed: no small root filesystem to register")
    templates = sandbox_root.parent / f"templates-{uuid.uuid4().hex[:8]}"
    source = sandbox_root.parent / f"rootfs-{uuid.uuid4().hex[:8]}"
    (source / "bin").mkdir(parents=True)
    shutil.copy2(busybox, source / "bin" / "busybox")
    for tool in ("sh", "cat", "echo", "ls", "mkdir", "rm"):
        (source / "bin" / tool).symlink_to("busybox")
    h = Harness("bubblewrap", settings.model_copy(update={"sandbox_templates_dir": templates}))
    store = TemplateStore(templates)
    store.add("box", rootfs=source, owner=owner(h))
    yield h, store, source
    _cleanup(h)
    shutil.rmtree(templates, ignore_errors=True)
    shutil.rmtree(source, ignore_errors=True)


async def test_restore_of_a_checkpoint_whose_template_was_removed_names_the_template(
    tpl: tuple[Harness, TemplateStore, Path],
) -> None:
    h, templates, source = tpl
    async with h.client() as c:
        sid = (await call(c, "provision", template="box"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command="echo on-box > note.txt")
        ckpt = (await call(c, "checkpoint", sandbox_id=sid))["checkpoint_id"]
        await call(c, "destroy", sandbox_id=sid)  # a template in use cannot be removed
        templates.remove("box")
        text = await fail(c, "restore", "not_found", checkpoint_id=ckpt)
        assert "'box'" in text and "not registered" in text and "templates add" in text, text
        assert (await call(c, "list_sandboxes"))["sandboxes"] == []  # no sandbox half made
        # Nothing lost: the checkpoint is still listed, and restores once the template is back.
        assert [k["checkpoint_id"] for k in (await call(c, "list_checkpoints", sandbox_id=sid))["checkpoints"]] == [
            ckpt
        ]
        templates.add("box", rootfs=source, owner=owner(h))
        back = (await call(c, "restore", checkpoint_id=ckpt))["sandbox_id"]
        assert (await call(c, "execute", sandbox_id=back, command="cat note.txt"))["stdout"] == "on-box\n"


# -- a 2 GB sparse file ----------------------------------------------------------------


@pytest.mark.parametrize("data", [False, True], ids=["all-hole", "with-data"])
async def test_a_2gb_sparse_file_costs_seconds_and_only_its_data(server: Callable[..., Harness], data: bool) -> None:
    bw = server(sandbox_disk_mb=4096)  # the file size limit (RLIMIT_FSIZE) counts holes
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        make = "truncate -s 2G big"
        if data:  # a few data extents in the hole: at the start, at 1 GiB, at the end
            make += (
                " && printf head | dd of=big conv=notrunc 2>/dev/null"
                " && printf middle | dd of=big bs=1 seek=1073741824 conv=notrunc 2>/dev/null"
                " && printf tail | dd of=big bs=1 seek=2147483644 conv=notrunc 2>/dev/null"
            )
        assert (await call(c, "execute", sandbox_id=sid, command=make))["exit_code"] == 0
        started = time.monotonic()
        taken = await call(c, "checkpoint", sandbox_id=sid)
        assert time.monotonic() - started < 10, taken
        assert taken["bytes_added"] < 1 << 20, taken  # the data extents (a few KiB), not 2 GiB of zeros
        stored = sum(p.stat().st_size for p in blob_files(local_root(bw.settings)).values())
        assert stored < 1 << 20, stored
        started = time.monotonic()
        back = (await call(c, "restore", checkpoint_id=taken["checkpoint_id"]))["sandbox_id"]
        assert time.monotonic() - started < 10
        st = (workspace(bw, back) / "big").stat()
        assert st.st_size == 2 * GIB and st.st_blocks * 512 < 1 << 20, st  # sparse again
        if data:
            read = "dd if=big bs=1 count=4 2>/dev/null; dd if=big bs=1 skip=1073741824 count=6 2>/dev/null"
            read += "; dd if=big bs=1 skip=2147483644 2>/dev/null"
            assert (await call(c, "execute", sandbox_id=back, command=read))["stdout"] == "headmiddletail"


def layer_dirs(where: Harness | SandboxSettings, sid: str) -> set[str]:
    """The empty top dirs of a default sandbox's writable system layer (one per host system dir,
    made at its first command; none without a layer): a checkpoint holds them too."""
    settings = where.settings if isinstance(where, Harness) else where
    upper = settings.sandbox_dir / sid / "layer" / "upper"
    return {f"system/{name}" for name in os.listdir(upper)} if upper.is_dir() else set()


# -- 100,000 files, and the caps -------------------------------------------------------

MANY = (
    "python3 -c \"import os; os.mkdir('many'); [open(f'many/{i}', 'w').write(f'file {i}\\n') for i in range(100000)]\""
)


async def test_100000_small_files_past_the_file_cap_and_within_it(server: Callable[..., Harness]) -> None:
    """Past CORRAL_CHECKPOINT_MAX_FILES: a clear error and nothing stored. Within it (the same
    sandbox, a server restarted with the default cap): bounded time, each byte stored once."""
    low = server(checkpoint_max_files=1000)
    async with low.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        assert (await call(c, "execute", sandbox_id=sid, command=MANY, timeout_s=120))["exit_code"] == 0
        started = time.monotonic()
        text = await fail(c, "checkpoint", "invalid_argument", sandbox_id=sid)
        assert time.monotonic() - started < 30
        assert "more than 1000 files" in text and "nothing was stored" in text, text
        assert "CORRAL_CHECKPOINT_MAX_FILES" in text, text
        assert (await call(c, "list_checkpoints", sandbox_id=sid))["checkpoints"] == []
        assert blob_files(local_root(low.settings)) == {}, "a refused checkpoint stored content"
        assert store_of(low).usage() == 0
    bw = server()
    async with bw.client() as c:
        started = time.monotonic()
        first = await call(c, "checkpoint", sandbox_id=sid)
        assert time.monotonic() - started < 60, first
        n = 100001 + len(layer_dirs(bw, sid))
        assert first["files"] == n and first["files_changed"] == n, first
        content = sum(len(f"file {i}\n") for i in range(100000))
        assert first["bytes_added"] == content, first  # the bytes, once each
        await call(c, "execute", sandbox_id=sid, command="echo changed > many/7")
        started = time.monotonic()
        second = await call(c, "checkpoint", sandbox_id=sid)
        assert time.monotonic() - started < 20, second  # unchanged files are not read again
        assert (second["files_changed"], second["bytes_added"]) == (1, len("changed\n")), second
        await call(c, "destroy", sandbox_id=sid)
    shutil.rmtree(local_root(bw.settings))  # 100,000 blob files: not left in pytest's kept tmp dirs


async def test_past_the_storage_cap_a_clear_error_and_no_half_checkpoint(server: Callable[..., Harness]) -> None:
    bw = server(checkpoint_max_mb=1)
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        make = "for f in a b c d; do head -c 400000 /dev/urandom > $f.bin; done; sha256sum *.bin"
        made = await call(c, "execute", sandbox_id=sid, command=make)
        text = await fail(c, "checkpoint", "unavailable", sandbox_id=sid)
        assert "checkpoint store is full" in text and "no checkpoint was taken" in text, text
        assert "CORRAL_CHECKPOINT_MAX_MB" in text, text
        assert (await call(c, "list_checkpoints", sandbox_id=sid))["checkpoints"] == []
        assert referenced(local_root(bw.settings)) == set()  # no checkpoint row, no references
        again = await call(c, "execute", sandbox_id=sid, command="sha256sum *.bin")
        assert again["stdout"] == made["stdout"]  # the sandbox is unchanged
        # The content stored before the refusal belongs to no checkpoint: gc frees it, and a
        # checkpoint that fits is taken.
        store_of(bw).gc(grace_s=0)
        assert blob_files(local_root(bw.settings)) == {}
        await call(c, "execute", sandbox_id=sid, command="rm c.bin d.bin")
        assert (await call(c, "checkpoint", sandbox_id=sid))["files"] == 2 + len(layer_dirs(bw, sid))


# -- what a workspace may hold: links out, FIFOs, sockets, device nodes ----------------


async def test_symlinks_pointing_outside_are_captured_as_links_never_followed(bw: Harness) -> None:
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        links = "ln -s /etc/shadow shadow && ln -s ../../.. up && ln -s /etc/passwd ~/passwd && mkdir d"
        assert (await call(c, "execute", sandbox_id=sid, command=links))["exit_code"] == 0
        taken = await call(c, "checkpoint", sandbox_id=sid)
        assert taken["bytes_added"] == 0, taken  # links and a dir: no content read through them
        host_files = [Path(p).read_bytes() for p in ("/etc/shadow", "/etc/passwd") if os.access(p, os.R_OK)]
        for blob in blob_files(local_root(bw.settings)).values():
            assert blob.read_bytes() not in host_files, f"a host file was copied into the store: {blob}"
        back = (await call(c, "restore", checkpoint_id=taken["checkpoint_id"]))["sandbox_id"]
        ws, home = workspace(bw, back), bw.settings.sandbox_dir / back / "home"
        assert os.readlink(ws / "shadow") == "/etc/shadow" and os.readlink(ws / "up") == "../../.."
        assert os.readlink(home / "passwd") == "/etc/passwd"
        out = await call(c, "execute", sandbox_id=back, command="readlink shadow up ~/passwd; ls -d d")
        assert out["stdout"] == "/etc/shadow\n../../..\n/etc/passwd\nd\n", out


async def test_a_forged_manifest_cannot_write_through_a_link(bw: Harness, tmp_path: Path) -> None:
    """A shared store someone else can write: a file under a link is refused, nothing written outside."""
    from corral.servers.sandbox.checkpoints.manifest import Delta, Entry, encode

    outside = tmp_path / "outside"
    outside.mkdir()
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        real = await call(c, "checkpoint", sandbox_id=sid)
        store = store_of(bw)
        record = store.get(real["checkpoint_id"])
        assert record is not None
        empty_blob = hashlib.sha256(b"").hexdigest()
        store.put_blob(empty_blob, b"")
        forged = Delta(
            put={
                "workspace/esc": Entry("l", 0o777, 0, 0, str(outside)),
                "workspace/esc/pwned": Entry("f", 0o644, 0, 0, empty_blob),
            },
            delete=[],
            full=True,
        )
        bad = record.model_copy(update={"id": "ckpt_" + "f0" * 10, "parent": None, "depth": 0})
        store.commit(bad, encode(forged), {empty_blob})
        text = await fail(c, "restore", "invalid_argument", checkpoint_id=bad.id)
        assert "under a non-directory" in text, text
    assert list(outside.iterdir()) == []


async def test_fifos_are_captured_sockets_and_device_nodes_skipped_with_a_note(bw: Harness) -> None:
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        ws = workspace(bw, sid)
        await call(c, "execute", sandbox_id=sid, command="mkfifo pipe && chmod 640 pipe && echo data > plain")
        serve = "import socket, time; s = socket.socket(socket.AF_UNIX); s.bind('sock'); s.listen(); time.sleep(600)"
        await call(c, "execute", sandbox_id=sid, command=f'python3 -c "{serve}"', background=True)
        await until(lambda: (ws / "sock").exists(), "the socket server bound its socket")
        # A sandbox cannot make device nodes (no capabilities); one the host put there is skipped.
        os.mknod(ws / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(ws / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
        taken = await call(c, "checkpoint", sandbox_id=sid)
        assert sorted(taken["skipped"]) == [
            "workspace/loop: a device node (not captured)",
            "workspace/null: a device node (not captured)",
            "workspace/sock: a socket (not captured)",
        ], taken
        back = (await call(c, "restore", checkpoint_id=taken["checkpoint_id"]))["sandbox_id"]
        restored = workspace(bw, back)
        assert sorted(p.name for p in restored.iterdir()) == ["pipe", "plain"]
        st = (restored / "pipe").lstat()
        assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640, st
        assert (await call(c, "read_file", sandbox_id=back, path="plain"))["content"] == "data\n"


# -- a file rewritten while it is captured ---------------------------------------------

PAD = "x" * 200
WRITER = f'i=0; while true; do i=$((i+1)); for f in a b c; do echo "$f version $i {PAD}" > $f.txt; done; done'


async def test_a_checkpoint_while_a_process_rewrites_files_holds_whole_versions(bw: Harness) -> None:
    """Each file restored is one version the writer wrote (or the empty file its `>` leaves for
    an instant), never a mix; each manifest entry agrees with the bytes stored for it."""
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "write_file", sandbox_id=sid, path="still.txt", content="still\n")
        await call(c, "execute", sandbox_id=sid, command=WRITER, background=True)
        await until(lambda: (workspace(bw, sid) / "c.txt").exists(), "the writer wrote")
        store, seen = store_of(bw), set()
        for _ in range(5):
            taken = await call(c, "checkpoint", sandbox_id=sid)
            manifest = store.manifest(taken["checkpoint_id"])
            assert {p for p in manifest if p.startswith("workspace/")} == {
                "workspace/still.txt", "workspace/a.txt", "workspace/b.txt", "workspace/c.txt"
            }  # fmt: skip
            back = (await call(c, "restore", checkpoint_id=taken["checkpoint_id"]))["sandbox_id"]
            for name in ("a", "b", "c"):
                entry = manifest[f"workspace/{name}.txt"]
                data = (workspace(bw, back) / f"{name}.txt").read_bytes()
                assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.ref), entry
                text = data.decode()
                words = text.split(" ")
                whole = len(words) == 4 and words[:2] == [name, "version"] and words[2].isdigit()
                assert text == "" or (whole and words[3] == PAD + "\n"), f"{name}.txt is torn: {text!r}"
                seen.add(text)
            assert (workspace(bw, back) / "still.txt").read_text() == "still\n"
            await call(c, "destroy", sandbox_id=back)
        assert len(seen) > 3, seen  # the writer was writing all along


# -- a server killed mid-checkpoint ----------------------------------------------------

BIG_TREE = (
    "python3 -c \"import os; os.mkdir('big'); [open(f'big/{i}', 'wb').write(os.urandom(65536)) for i in range(2000)]\""
)


def _rpc(proc: subprocess.Popen, message: dict) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(message).encode() + b"\n")
    proc.stdin.flush()


def _start_checkpoint_then_kill(env: dict[str, str], sid: str, store_root: Path, log: Path) -> int:
    """A real `corral serve sandbox` over stdio, asked for a checkpoint of `sid`, killed with
    SIGKILL as soon as the checkpoint has stored its first content. Returns how many blobs it stored."""
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [corral_exe(), "serve", "sandbox"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env
        )
    try:
        assert proc.stdout is not None
        _rpc(proc, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}})  # fmt: skip
        assert json.loads(proc.stdout.readline())["id"] == 1
        _rpc(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        _rpc(proc, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                    "params": {"name": "checkpoint", "arguments": {"sandbox_id": sid}}})  # fmt: skip
        deadline = time.monotonic() + 60
        while not blob_files(store_root) and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()  # if an assertion above failed: never leave it running
        proc.wait(timeout=30)
    return len(blob_files(store_root))


async def test_a_server_killed_mid_checkpoint_leaves_a_consistent_store(
    settings: SandboxSettings, tmp_path: Path, needs_bwrap: None
) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CORRAL_HOME": str(settings.home),
           "CORRAL_SANDBOX_DIR": str(settings.sandbox_dir)}  # fmt: skip
    params = StdioServerParameters(command=corral_exe(), args=["serve", "sandbox"], env=env)
    root = local_root(settings)
    async with Client(params) as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        made = await call(c, "execute", sandbox_id=sid, command=BIG_TREE, timeout_s=120)
        assert made["exit_code"] == 0, made
    stored = await asyncio.to_thread(_start_checkpoint_then_kill, env, sid, root, tmp_path / "server.log")
    assert 0 < stored < 2000, f"the kill came too late: {stored} blobs were stored"

    store = LocalCheckpointStore(root, 1 << 40)  # what the next server opens
    try:
        assert store._db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert store.list(sid) == [] and referenced(root) == set()  # the half checkpoint is no checkpoint
        assert list(store.staging.iterdir()) == []  # half-written blob files were cleared at open
        for digest, path in blob_files(root).items():  # every blob whole: renamed into place, never torn
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path
    finally:
        store.close()

    async with Client(params) as c:
        assert (await call(c, "list_checkpoints", sandbox_id=sid))["checkpoints"] == []
        await call(c, "execute", sandbox_id=sid, command="rm -r big && echo after > after.txt")
        taken = await call(c, "checkpoint", sandbox_id=sid)
        n = 1 + len(layer_dirs(settings, sid))
        assert (taken["files"], taken["files_changed"]) == (n, n), taken
        assert [k["checkpoint_id"] for k in (await call(c, "list_checkpoints", sandbox_id=sid))["checkpoints"]] == [
            taken["checkpoint_id"]
        ]
        store = LocalCheckpointStore(root, 1 << 40)
        try:
            assert store.gc(grace_s=0) >= stored * 65536  # the orphans of the killed checkpoint
        finally:
            store.close()
        assert set(blob_files(root)) == referenced(root) != set()
        back = (await call(c, "restore", checkpoint_id=taken["checkpoint_id"]))["sandbox_id"]
        assert (await call(c, "read_file", sandbox_id=back, path="after.txt"))["content"] == "after\n"
        for box in (sid, back):
            await call(c, "destroy", sandbox_id=box)


# -- garbage collection ----------------------------------------------------------------


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def test_past_retention_a_sandboxs_unique_blobs_are_freed_and_shared_ones_kept(
    server: Callable[..., Harness],
) -> None:
    h = server(checkpoint_retention_s=0)
    root = local_root(h.settings)
    async with h.client() as c:
        a = (await call(c, "provision"))["sandbox_id"]
        b = (await call(c, "provision"))["sandbox_id"]
        for box, own in ((a, "only in a\n"), (b, "only in b\n")):
            await call(c, "write_file", sandbox_id=box, path="shared.txt", content="in both\n")
            await call(c, "write_file", sandbox_id=box, path="own.txt", content=own)
            await call(c, "checkpoint", sandbox_id=box)
        kept_b = (await call(c, "list_checkpoints", sandbox_id=b))["checkpoints"]
        assert set(blob_files(root)) == {sha("in both\n"), sha("only in a\n"), sha("only in b\n")}
        await call(c, "destroy", sandbox_id=a)
        old = time.time() - 2 * 3600  # older than gc's grace, which keeps blobs of checkpoints being written
        for path in blob_files(root).values():
            os.utime(path, (old, old))
        await h.service.sweep()
        assert set(blob_files(root)) == {sha("in both\n"), sha("only in b\n")}
        assert (await call(c, "list_checkpoints", sandbox_id=a))["checkpoints"] == []
        # A running sandbox's checkpoints are kept, whatever their age, and restore whole.
        assert (await call(c, "list_checkpoints", sandbox_id=b))["checkpoints"] == kept_b
        back = (await call(c, "restore", checkpoint_id=kept_b[0]["checkpoint_id"]))["sandbox_id"]
        out = await call(c, "execute", sandbox_id=back, command="cat shared.txt own.txt")
        assert out["stdout"] == "in both\nonly in b\n", out


async def test_a_directory_swapped_for_a_link_during_a_checkpoint_is_never_followed(bw: Harness) -> None:
    """The sandbox races the scan: `d` is a directory holding `passwd` one instant, a link to
    the host's `/etc` the next. Whatever the timing, no host file reaches the store."""
    host = Path("/etc/passwd").read_bytes()
    swap = "mkdir -p d && echo mine > d/passwd && while true; do mv d d.x; ln -s /etc d; rm d; mv d.x d; done"
    many = "mkdir m && cd m && seq 3000 | xargs touch"  # a long walk between seeing `d` and entering it
    async with bw.client() as c:
        sid = (await call(c, "provision"))["sandbox_id"]
        await call(c, "execute", sandbox_id=sid, command=many)
        await call(c, "execute", sandbox_id=sid, command=swap, background=True)
        await until(lambda: (workspace(bw, sid) / "d.x").exists(), "the swapper ran")
        for _ in range(40):
            taken = await call(c, "checkpoint", sandbox_id=sid)
            manifest = store_of(bw).manifest(taken["checkpoint_id"])
            ours = {"workspace/d", "workspace/d.x", "workspace/d/passwd", "workspace/d.x/passwd", "workspace/m"}
            ours |= layer_dirs(bw, sid)  # a system layer's empty top dirs (nothing under them)
            assert {p for p in manifest if not p.startswith("workspace/m/")} <= ours, sorted(manifest)[:20]
        for blob in blob_files(local_root(bw.settings)).values():
            assert blob.read_bytes() != host, "a host file was read through a swapped link"
