"""Checkpoints of a docker sandbox: what its container changed of its image.

Capture: `docker diff` names every path the container added (A), changed (C) or deleted (D)
relative to its image: its writable layer, so the workspace, /root and any software it
installed. One `docker exec` stats them all (busybox `stat` is enough); a path whose stat key
(inode, ctime, size, mtime) equals the previous checkpoint's keeps its entry unread, and the
files and symlinks left come out in one `tar` stream, hashed here as they arrive. A D path
that no longer exists is a whiteout (`w`); should docker report an existing dir as deleted
(an overlay dir deleted and made anew), it is kept as an opaque dir (`D`). Docker prints
names raw (a newline continues a name) but replaces bytes that are not UTF-8: those names are
found again by listing their dir inside. Tar carries a sparse file's holes as zeros (read
time follows its apparent size); chunks of zeros become holes again.

Restore writes a manifest into a container that holds exactly its image (see
`DockerBackend.restore_files`): deletions, remade dirs and image entries of another kind are
removed inside (PREPARE), sparse files laid with `dd` (LAY_SPARSE), then everything goes in
one tar stream built here, which the daemon unpacks inside the container (`docker cp -`: no
tools needed inside, never a path outside the container's root; it keeps modes, nanosecond
mtimes, symlinks and fifos).

Not captured: what docker manages (/etc/hosts, /etc/hostname, /etc/resolv.conf, /proc, /sys,
/dev), /tmp (as on bubblewrap; the backend's own bookkeeping lives there), sockets and device
nodes (noted in `skipped`). Owners are not kept (restored files belong to root, as
everything the sandbox runs does); hard links come back as separate files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

from corral.errors import InvalidArgument, Unavailable

from .checkpoints.manifest import Entry, Manifest, differs, sandbox_path
from .checkpoints.tree import CHUNK, SMALL, BlobSink, BlobSource, Scan, StatCache

__all__ = [
    "STAT",
    "STAT_ALL",
    "STAT_FORMAT",
    "PREPARE",
    "EACH",
    "FIND",
    "TAR_ALL",
    "WHITEOUT_KEY",
    "Change",
    "Stat",
    "Started",
    "StreamFailed",
    "check_tree",
    "classify",
    "container_path",
    "mangled",
    "manifest_path",
    "nul_list",
    "parse_diff",
    "parse_stats",
    "preparations",
    "read_files",
    "unmangle",
    "write_files",
]

# Not captured: what docker manages, and /tmp (as on bubblewrap, where it is not kept either; the
# backend's own bookkeeping lives there: background process records, pid files).
MANAGED = ("/proc", "/sys", "/dev", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/.dockerenv", "/tmp")
AREA_ROOTS = (("/workspace", "workspace"), ("/root", "home"))

# A batch of paths (as arguments) -> one line each, in order: the stat fields, or "-" for a
# path gone meanwhile. One `stat` for the batch; one per path only when one is missing.
STAT_FORMAT = "%f %s %i %Y %y %Z %z"
STAT = r"""m=$(stat -c "$0" -- "$@" 2>/dev/null) && [ "$(printf '%s\n' "$m" | wc -l)" -eq "$#" ] || m=
if [ -n "$m" ]; then printf '%s\n' "$m"; else for f; do stat -c "$0" -- "$f" 2>/dev/null || echo -; done; fi"""
# NUL-separated paths on stdin -> STAT's lines.
STAT_ALL = 'exec xargs -0 -r sh -c "$0" "$1"'
# Runs the script given as $0 over the NUL-separated arguments on stdin (in batches).
EACH = 'exec xargs -0 -r sh -c "$0" sh'
# Every path under the given dirs, NUL-terminated: names exactly as the file system holds them.
FIND = 'find "$@" -xdev -print0'
# NUL-separated paths on stdin (relative to /, each "./..."): one tar stream of them (xargs may
# run tar more than once: the stream is then several archives back to back).
TAR_ALL = "cd / && exec xargs -0 -r tar -c -f -"


class Change(NamedTuple):
    kind: str  # A, C or D
    path: str  # absolute, in the container


class Stat(NamedTuple):
    mode: int  # st_mode (type and permissions)
    size: int
    key: tuple[int, int, int, int]  # (inode, ctime ns, size, mtime ns): unchanged file, same key
    mtime_ns: int


def parse_diff(out: bytes) -> list[Change]:
    """`docker diff`'s lines. Docker prints names raw, so a line that does not start like a
    change continues the previous name (which held a newline)."""
    found: list[Change] = []
    for line in out.removesuffix(b"\n").split(b"\n"):
        if line[:1] in (b"A", b"C", b"D") and line[1:3] == b" /":
            found.append(Change(chr(line[0]), os.fsdecode(line[2:])))
        elif found:
            found[-1] = found[-1]._replace(path=found[-1].path + "\n" + os.fsdecode(line))
    return found


def mangled(changes: list[Change]) -> list[str]:
    """Dirs to list to find the real names of `changes` whose name is not UTF-8: docker passes
    names through JSON, which replaces each byte that is not UTF-8 with U+FFFD."""
    roots = set()
    for change in changes:
        if "\ufffd" in change.path and change.kind != "D":  # a deleted name cannot be listed: lost
            roots.add(change.path[: change.path.index("\ufffd")].rpartition("/")[0] or "/")
    return sorted(roots)


def unmangle(changes: list[Change], found: bytes) -> list[Change]:
    """`changes` with each mangled name replaced by the real names (`found`: FIND's output) it stands for."""
    real: dict[str, list[str]] = {}
    for raw in found.split(b"\0")[:-1]:
        real.setdefault(_fold(raw.decode("utf-8", "replace")), []).append(os.fsdecode(raw))
    out = []
    for change in changes:
        if "\ufffd" not in change.path:
            out.append(change)
        else:
            out += [change._replace(path=path) for path in real.get(_fold(change.path), [])]
    return out


def _fold(name: str) -> str:
    """Go writes one U+FFFD per bad byte, Python one per bad sequence: compare runs as one."""
    return re.sub("\ufffd+", "\ufffd", name)


def manifest_path(path: str) -> str | None:
    """The manifest path of a container path; None for an area's root and what is not captured."""
    if any(path == m or path.startswith(m + "/") for m in MANAGED):
        return None
    for root, area in AREA_ROOTS:
        if path == root:
            return None
        if path.startswith(root + "/"):
            return f"{area}/{path[len(root) + 1 :]}"
    return "system" + path


container_path = sandbox_path


def nul_list(paths: list[str]) -> bytes:
    return b"".join(os.fsencode(p) + b"\0" for p in paths)


def parse_stats(out: bytes, count: int) -> list[Stat | None]:
    lines = out.decode().splitlines()
    if len(lines) != count:
        raise Unavailable(f"stat of the sandbox's changed files gave {len(lines)} lines for {count} paths")
    return [None if line == "-" else _stat(line) for line in lines]


def _stat(line: str) -> Stat:
    raw, size, ino, mtime_s, _, mtime_hms, _, ctime_s, _, ctime_hms, _ = line.split(" ")
    mtime, ctime = _ns(mtime_s, mtime_hms), _ns(ctime_s, ctime_hms)
    return Stat(int(raw, 16), int(size), (int(ino), ctime, int(size), mtime), mtime)


def _ns(seconds: str, clock: str) -> int:
    """Epoch nanoseconds from busybox's whole seconds (%Y) and the fraction of its clock (%y)."""
    fraction = clock.partition(".")[2]
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


def entry_of(st: Stat) -> Entry | None:
    """The entry of a dir or fifo (nothing to read); None for what needs its content or is skipped."""
    mode = stat.S_IMODE(st.mode)
    if stat.S_ISDIR(st.mode):
        return Entry("d", mode, 0, st.mtime_ns)
    if stat.S_ISFIFO(st.mode):
        return Entry("p", mode, 0, st.mtime_ns)
    return None


# -- capture ---------------------------------------------------------------------------------

WHITEOUT_KEY = (0, 0, 0, 0)  # a deleted image file has no stat: it stays deleted, or shows up as changed
_STALE = (-1, -1, -1, -1)  # never matches: the next checkpoint reads the file again


def classify(changes: list[Change], stats: list[Stat | None], previous: StatCache, out: Scan) -> dict[str, Stat]:
    """Keep in `out` every change whose entry needs no reading (unchanged since `previous`, a
    dir, a fifo, a whiteout); return the files and symlinks left to read (container path -> stat)."""
    unread: dict[str, Stat] = {}
    for change, st in zip(changes, stats, strict=True):
        path = manifest_path(change.path)
        assert path is not None
        if st is None:  # gone: deleted from the image (a whiteout), or removed since the diff
            if change.kind == "D":
                keep(out, previous, path, WHITEOUT_KEY, Entry("w", 0, 0, 0))
            continue
        seen = previous.get(path)
        if seen is not None and seen[0] == st.key:
            out.manifest[path], out.cache[path] = seen[1], seen
            continue
        entry = entry_of(st)
        if entry is not None:
            if change.kind == "D" and entry.type == "d":  # an image dir deleted, then made anew
                entry = entry._replace(type="D")
            keep(out, previous, path, st.key, entry)
        elif stat.S_ISREG(st.mode) or stat.S_ISLNK(st.mode):
            unread[change.path] = st
        else:
            kind = "socket" if stat.S_ISSOCK(st.mode) else "device node"
            out.skipped.append(f"{change.path}: a {kind} (not captured)")
    return unread


def keep(out: Scan, previous: StatCache, path: str, key: tuple[int, int, int, int], entry: Entry) -> None:
    seen = previous.get(path)
    if differs(seen[1] if seen else None, entry):
        out.files_changed += 1
    out.manifest[path], out.cache[path] = entry, (key, entry)


def read_files(tar_exec: Started, unread: dict[str, Stat], sink: BlobSink, previous: StatCache, out: Scan) -> None:
    """Read the files and symlinks of `unread` out of the container in one tar stream."""
    with tar_exec.stream(nul_list(["." + p for p in unread]), timeout_s=3600) as stream:
        for where, entry, fresh in read_tar(stream, unread, sink, out):
            path = manifest_path(where)
            assert path is not None
            keep(out, previous, path, unread[where].key if fresh else _STALE, entry)


# -- capture: reading the tar stream out of the container ----------------------------------------------


def read_tar(stream: IO[bytes], stats: dict[str, Stat], sink: BlobSink, out: Scan) -> Iterator[tuple[str, Entry, bool]]:
    """(container path, entry, whether its stat key still holds) for each file and symlink in
    `stream`. An entry is what tar read; when that differs from the stat taken before (written
    meanwhile), the key is stale and the next checkpoint reads the file again."""
    linked: dict[str, Entry] = {}
    with tarfile.open(fileobj=stream, mode="r|", ignore_zeros=True) as tar:
        for member in tar:
            path = "/" + (member.name[2:] if member.name.startswith("./") else member.name).lstrip("/")
            st = stats.get(path)
            if st is None:
                continue
            if member.issym():
                entry = Entry("l", 0o777, 0, st.mtime_ns, member.linkname)
            elif member.islnk():  # a hard link to a file earlier in this archive: its content
                target = linked.get("/" + member.linkname.removeprefix("./").lstrip("/"))
                if target is None:
                    continue
                entry = target._replace(mode=stat.S_IMODE(st.mode), mtime_ns=st.mtime_ns)
            elif member.isfile():
                fileobj = tar.extractfile(member)
                assert fileobj is not None
                digest, size, extents, data = _take(fileobj, sink)
                sink.put_blob(digest, data)
                entry = Entry("f", member.mode & 0o7777, size, st.mtime_ns, digest, extents)
                linked[path] = entry
            else:
                continue
            fresh = int(member.mtime) == st.mtime_ns // 1_000_000_000 and (entry.type != "f" or entry.size == st.size)
            if not fresh:
                entry = entry._replace(mtime_ns=int(member.mtime) * 1_000_000_000)
            yield path, entry, fresh


def _take(fileobj: IO[bytes], sink: BlobSink) -> tuple[str, int, tuple[tuple[int, int], ...] | None, bytes | Path]:
    """Hash a file's bytes; small ones in memory, large ones through a staging file keeping only
    their non-zero chunks (tar carries a sparse file's holes as zeros: they become holes again)."""
    hasher = hashlib.sha256()
    first = fileobj.read(SMALL + 1)
    if len(first) <= SMALL:
        hasher.update(first)
        return hasher.hexdigest(), len(first), None, first
    staged = tempfile.NamedTemporaryFile(dir=sink.staging, prefix="blob-", delete=False)
    try:
        with staged:
            offset, extents = _copy_data(first, fileobj, staged, hasher)
    except BaseException:
        Path(staged.name).unlink(missing_ok=True)
        raise
    if extents == [(0, offset)]:  # no hole: a plain file
        return hasher.hexdigest(), offset, None, Path(staged.name)
    # All zeros: one empty extent at the end (an empty tuple would read back as "not sparse").
    return hasher.hexdigest(), offset, tuple(extents) or ((offset, 0),), Path(staged.name)


def _copy_data(first: bytes, fileobj: IO[bytes], staged: IO[bytes], hasher: Any) -> tuple[int, list[tuple[int, int]]]:
    """Copy the non-zero chunks of `first` + `fileobj` to `staged`; returns (size, data extents)."""
    extents: list[tuple[int, int]] = []
    offset = 0
    pending = first
    while True:
        if len(pending) < CHUNK:  # whole, aligned chunks: a hole is a chunk of zeros
            pending += fileobj.read(CHUNK - len(pending))
        chunk, pending = pending[:CHUNK], pending[CHUNK:]
        if not chunk:
            break
        if chunk.count(0) != len(chunk):
            hasher.update(chunk)
            staged.write(chunk)
            if extents and extents[-1][0] + extents[-1][1] == offset:
                extents[-1] = (extents[-1][0], extents[-1][1] + len(chunk))
            else:
                extents.append((offset, len(chunk)))
        offset += len(chunk)
    return offset, extents


# -- restore: the tar stream into the container ----------------------------------------------


def check_tree(manifest: Manifest) -> None:
    """Refuse a manifest that puts a path under one of its own non-directories (a symlink)."""
    for path in manifest:
        parent = path.rpartition("/")[0]
        above = manifest.get(parent)
        if above is not None and above.type not in ("d", "D"):
            raise InvalidArgument(f"a checkpoint manifest puts {path!r} under a non-directory; nothing was restored")


def write_tar(stream: IO[bytes], manifest: Manifest, source: BlobSource, laid: dict[str, str]) -> None:
    """Every entry but whiteouts as a tar stream rooted at `/`, parents first. A sparse file,
    already laid inside at `laid[path]`, is a hard link to it: the daemon's unpacker writes
    holes as zeros, a link keeps them (and takes the entry's mode and mtime)."""
    with (
        tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        tempfile.TemporaryFile() as blob,
    ):
        for path in sorted(manifest):
            entry = manifest[path]
            if entry.type == "w":
                continue
            info = tarfile.TarInfo(container_path(path).lstrip("/"))
            info.mode, info.uid, info.gid, info.uname, info.gname = entry.mode, 0, 0, "root", "root"
            seconds, ns = divmod(entry.mtime_ns, 1_000_000_000)
            info.mtime = seconds
            if ns:
                info.pax_headers = {"mtime": f"{seconds}.{ns:09d}"}
            info.type = _TAR_TYPES[entry.type]
            if entry.type == "l":
                info.linkname = entry.ref or ""
            if path in laid:
                info.type, info.linkname = tarfile.LNKTYPE, laid[path].lstrip("/")
            if info.type != tarfile.REGTYPE:
                tar.addfile(info)
                continue
            blob.seek(0)
            blob.truncate()
            source.copy_blob(entry.ref or "", blob.fileno())
            info.size = entry.size
            blob.seek(0)
            tar.addfile(info, blob)


_TAR_TYPES = {
    "f": tarfile.REGTYPE,
    "d": tarfile.DIRTYPE,
    "D": tarfile.DIRTYPE,
    "l": tarfile.SYMTYPE,
    "p": tarfile.FIFOTYPE,
}
# Lay sparse files: args are, per file, its path, size, extent count, then offset and length of
# each extent; stdin holds their blobs back to back. dd reads exactly each extent's bytes and
# writes them at its offset: what lies between stays a hole.
LAY_SPARSE = r"""while [ $# -gt 0 ]; do f=$1; rm -f -- "$f"; truncate -s "$2" "$f" || exit 1; n=$3; shift 3
while [ "$n" -gt 0 ]; do
dd of="$f" bs=65536 seek="$1" oflag=seek_bytes conv=notrunc count="$2" iflag=count_bytes,fullblock status=none || exit 1
shift 2; n=$((n - 1)); done; done"""


# Make way for a manifest in a container that holds its image: each argument is an entry's type
# letter then its path ("w/bin/vi"). Deletions (w) and remade dirs (D) go, and so does an image
# entry of another kind than the manifest's (docker cp will not put a dir over a file, or back).
PREPARE = r"""for a; do t=${a%"${a#?}"}; p=${a#?}
case $t in
w|D) rm -rf -- "$p" ;;
d) if [ -L "$p" ] || { [ -e "$p" ] && [ ! -d "$p" ]; }; then rm -f -- "$p"; fi ;;
*) if [ -d "$p" ] && [ ! -L "$p" ]; then rm -rf -- "$p"; fi ;;
esac; done"""


def preparations(manifest: Manifest) -> bytes:
    """PREPARE's arguments, NUL-separated, parents first."""
    return nul_list([manifest[p].type + container_path(p) for p in sorted(manifest)])


def sparse_files(manifest: Manifest) -> dict[str, str]:
    """Where each sparse file is laid before the tar links it in place (bookkeeping: never captured)."""
    found = sorted(p for p, e in manifest.items() if e.type == "f" and e.extents is not None)
    return {path: f"/tmp/.corral-sparse-{i}" for i, path in enumerate(found)}


def lay_sparse(manifest: Manifest, laid: dict[str, str], source: BlobSource, data: IO[bytes]) -> list[str]:
    """LAY_SPARSE's arguments; the blobs go to `data` (its stdin)."""
    args: list[str] = []
    for path, where in laid.items():
        entry = manifest[path]
        extents = entry.extents or ()
        args += [where, str(entry.size), str(len(extents))] + [str(n) for extent in extents for n in extent]
        source.copy_blob(entry.ref or "", data.fileno())
    data.seek(0)
    return args


def write_files(docker: str, name: str, manifest: Manifest, source: BlobSource) -> None:
    """Sparse files laid first (LAY_SPARSE), then everything in one `docker cp -` stream."""
    laid = sparse_files(manifest)
    try:
        if laid:
            with tempfile.TemporaryFile() as data:
                args = lay_sparse(manifest, laid, source, data)
                argv = [docker, "exec", "-i", name, "/bin/sh", "-c", LAY_SPARSE, "corral", *args]
                done = subprocess.run(argv, stdin=data, capture_output=True, timeout=3600)
            if done.returncode != 0:
                raise Unavailable(
                    f"could not write the checkpoint's sparse files: {done.stderr.decode(errors='replace')}"
                )
        proc = subprocess.Popen([docker, "cp", "-", f"{name}:/"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stderr is not None
        try:
            with proc.stdin:
                write_tar(proc.stdin, manifest, source, laid)
        except BrokenPipeError:
            pass  # docker cp gave up: its exit code and message say why
        except BaseException:
            proc.kill()
            raise
        finally:
            err = proc.stderr.read()
            code = proc.wait()
        if code != 0:
            raise Unavailable(
                f"docker cp could not write the checkpoint's files: {err.decode(errors='replace').strip()}"
            )
    finally:
        if laid:
            subprocess.run([docker, "exec", name, "rm", "-f", "--", *laid.values()], capture_output=True, timeout=60)


class Started:
    """A process started before its input is known, so that its start-up (a `docker exec` costs
    tens of milliseconds) overlaps the calls before it. Fed once: `run` or `stream`; `close` ends it."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def run(self, feed: bytes, timeout_s: float) -> tuple[int, bytes, bytes]:
        try:
            out, err = self.proc.communicate(feed, timeout=timeout_s)
        except subprocess.TimeoutExpired as timeout:
            self.close()
            raise Unavailable(f"{self.argv[1]} {self.argv[2]} did not finish within {timeout_s:g}s") from timeout
        return self.proc.returncode, out, err

    @contextlib.contextmanager
    def stream(self, feed: bytes, timeout_s: float) -> Iterator[IO[bytes]]:
        """`feed` on stdin (written by a thread: a long list must not block while its output
        waits to be read); stdout as a stream (a tar of any size is never held whole). A failed
        exit, a cut stream or one past `timeout_s` raise `StreamFailed`."""
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stdin = proc.stdin

        def write() -> None:
            with contextlib.suppress(BrokenPipeError, ValueError, OSError):
                stdin.write(feed)
                stdin.close()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        torn = None
        try:
            yield proc.stdout
            proc.stdout.read()  # what the reader left: let the process finish
        except (tarfile.TarError, EOFError) as err:  # cut short: the process failed midway
            proc.kill()
            torn = err
        except BaseException:
            proc.kill()
            raise
        finally:
            timer.cancel()
            out = proc.stderr.read()
            code = proc.wait()
            writer.join()
        # xargs exits 123 when a tar exited 1: GNU tar for a file that changed as it was read (it
        # still wrote the bytes its header says), busybox for one that vanished. A whole stream is
        # good; a cut one (busybox dies when a file shrinks under it) is not.
        if code not in (0, 123) or torn is not None:
            why = out.decode(errors="replace").strip() or str(torn)
            raise StreamFailed(f"reading the sandbox's changed files failed ({code}): {why}")

    def close(self) -> None:
        """End it if it still runs (a call before it failed); a no-op once it has finished."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class StreamFailed(Unavailable):
    """The tar stream out of the container failed: most often a file changed while it was read."""
