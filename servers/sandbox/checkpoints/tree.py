"""Capture a sandbox's directories on the host into a manifest and blobs, and lay them back.

`scan` walks each area without ever following a symlink, even one the sandbox swaps in for a
directory mid-walk: every directory is opened beneath the area's root with `O_NOFOLLOW` and its
entries are stat'ed and read relative to that fd. A file whose (inode, ctime, size,
mtime) equal what the previous scan saw keeps its entry unread: an incremental checkpoint
reads only what changed. A file is hashed while it is copied, in one pass, and stat'ed
before and after: one that changed meanwhile (a background process writing it) is read
again, so each file's entry always matches the bytes stored for it. Sparse files keep only
their data extents. Sockets and device nodes are skipped, with a note; hard links are
stored as separate files (their content once).

`restore` writes a manifest into empty area directories, parents before children, never
following a symlink it did not create (`O_NOFOLLOW`, and a path under a non-directory is
refused), then sets directory times last.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from corral.errors import InvalidArgument, Unavailable

from .manifest import Entry, Manifest, differs

__all__ = ["BlobSink", "BlobSource", "Scan", "StatCache", "empty", "prime", "restore", "scan", "too_many_files"]

CHUNK = 1 << 20
SMALL = 1 << 20  # files up to this size are hashed in memory; larger ones through a staging file
OPAQUE = "trusted.overlay.opaque"
StatCache = dict[str, tuple[tuple[int, int, int, int], Entry]]


class BlobSink(Protocol):
    """Where new content goes (a `CheckpointStore`)."""

    staging: Path

    def put_blob(self, digest: str, data: bytes | Path) -> int:
        """Keep `data` under `digest` (a staging file is moved or removed); returns bytes newly stored."""
        ...


class BlobSource(Protocol):
    def copy_blob(self, digest: str, fd: int) -> None:
        """Write the blob's bytes to `fd` at its current offset."""
        ...


@dataclass
class Scan:
    manifest: Manifest = field(default_factory=dict)
    cache: StatCache = field(default_factory=dict)
    files_changed: int = 0
    skipped: list[str] = field(default_factory=list)


def scan(areas: dict[str, Path], sink: BlobSink, previous: StatCache | None = None, max_files: int = 1 << 20) -> Scan:
    """The manifest of `areas` (name -> host dir); new content goes to `sink`.

    Entries whose stat is what the previous scan saw are taken as they were; the others are
    read once the walk has counted the tree (past `max_files` nothing is stored)."""
    out, previous, count = Scan(), previous or {}, 0
    todo: list[tuple[_Dirs, str, str, os.stat_result, tuple[int, int, int, int]]] = []
    for area, root in areas.items():
        if not root.is_dir():
            continue
        dirs, skip = _Dirs(root), len(area) + 1
        for where, found in _walk(root, area):  # per directory: few Python steps per entry
            count += len(found)
            if count > max_files:
                raise too_many_files(max_files)
            for name, st in found:
                path = f"{where}/{name}"
                key = (st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns)
                seen = previous.get(path)
                if seen is not None and seen[0] == key:
                    out.manifest[path] = seen[1]
                    out.cache[path] = seen
                else:
                    todo.append((dirs, path[skip:], path, st, key))
    try:
        for dirs, rel, path, st, key in todo:
            entry = _entry(dirs, rel, path, st, sink, out)
            if entry is None:
                continue
            seen = previous.get(path)
            if differs(seen[1] if seen else None, entry):
                out.files_changed += 1
            out.manifest[path] = entry
            out.cache[path] = (key, entry)
    finally:
        for dirs in {id(t[0]): t[0] for t in todo}.values():
            dirs.close()
    return out


def too_many_files(max_files: int) -> InvalidArgument:
    return InvalidArgument(
        f"the sandbox holds more than {max_files} files: too many to checkpoint; nothing was stored",
        hint="delete what you do not need (build caches, node_modules), or raise CORRAL_CHECKPOINT_MAX_FILES",
    )


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EINVAL)  # removed, or swapped for another kind


class _Dirs:
    """Directory fds of one area, each opened from the area's root one component at a time
    with `O_NOFOLLOW`: the sandbox may swap a directory for a link to a host path at any
    moment, and then the open fails instead of following it. The last one opened is kept
    (files come grouped by directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rel: str | None = None
        self.fd = -1

    def open(self, rel: str) -> int:
        if rel == self.rel:
            return self.fd
        self.close()
        fd = os.open(self.root, _DIR)
        try:
            for part in rel.split("/") if rel else ():
                inner = os.open(part, _DIR, dir_fd=fd)
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        self.rel, self.fd = rel, fd
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.rel, self.fd = None, -1


def _walk(root: Path, area: str) -> Iterator[tuple[str, list[tuple[str, os.stat_result]]]]:
    """Per directory under `root`, parents first: its path (`area/...`) and the (name, lstat)
    of what it holds; never through a symlink."""
    dirs, stack, skip = _Dirs(root), [area], len(area) + 1
    try:
        while stack:
            where = stack.pop()
            found = []
            try:
                with os.scandir(dirs.open(where[skip:])) as listing:
                    for item in listing:  # stat'ed while the dir fd is open: fstatat, relative to it
                        try:
                            st = item.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        found.append((item.name, st))
                        if stat.S_ISDIR(st.st_mode):
                            stack.append(f"{where}/{item.name}")
            except OSError as err:
                if err.errno in _GONE:
                    continue  # removed or replaced while we walked: it is not in this checkpoint
                raise
            yield where, found
    finally:
        dirs.close()


def _entry(dirs: _Dirs, rel: str, name: str, st: os.stat_result, sink: BlobSink, out: Scan) -> Entry | None:
    """The entry of `rel` in its area (manifest path `name`), read through a directory fd
    opened beneath the area's root; None when it is not captured (or vanished meanwhile)."""
    mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
    parent, _, base = rel.rpartition("/")
    try:
        dfd = dirs.open(parent)
        if stat.S_ISDIR(st.st_mode):
            opaque = False
            with contextlib.suppress(OSError):
                inner = os.open(base, _DIR, dir_fd=dfd)
                try:
                    opaque = os.getxattr(inner, OPAQUE) == b"y"
                finally:
                    os.close(inner)
            return Entry("D" if opaque else "d", mode, 0, mtime)
        if stat.S_ISLNK(st.st_mode):
            return Entry("l", mode, 0, mtime, os.fsdecode(os.readlink(base, dir_fd=dfd)))
        if stat.S_ISFIFO(st.st_mode):
            return Entry("p", mode, 0, mtime)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return Entry("w", 0, 0, 0)  # an overlay whiteout: a file of the lower layer was deleted
        if not stat.S_ISREG(st.st_mode):
            out.skipped.append(f"{name}: a {'socket' if stat.S_ISSOCK(st.st_mode) else 'device node'} (not captured)")
            return None
        return _file(dfd, base, sink, out)
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise


def _file(dfd: int, base: str, sink: BlobSink, out: Scan) -> Entry | None:
    for attempt in range(3):  # written meanwhile: read it again, so the entry and the bytes agree
        fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):  # swapped for a FIFO or a directory meanwhile
                return None
            digest, size, extents, data = _read(fd, before, sink)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns) or attempt == 2:
            break
        if isinstance(data, Path):
            data.unlink(missing_ok=True)
    sink.put_blob(digest, data)
    return Entry("f", stat.S_IMODE(before.st_mode), size, before.st_mtime_ns, digest, extents)


def _read(
    fd: int, st: os.stat_result, sink: BlobSink
) -> tuple[str, int, tuple[tuple[int, int], ...] | None, bytes | Path]:
    sparse = st.st_size > SMALL and st.st_blocks * 512 < st.st_size
    extents = _extents(fd, st.st_size) if sparse else None
    hasher = hashlib.sha256()
    if extents is None and st.st_size <= SMALL:
        data = b""
        while chunk := os.read(fd, CHUNK):
            data += chunk
        hasher.update(data)
        return hasher.hexdigest(), len(data), None, data
    staged = tempfile.NamedTemporaryFile(dir=sink.staging, prefix="blob-", delete=False)
    size = 0
    with staged:
        for offset, length in [(0, -1)] if extents is None else extents:  # () is all hole: nothing to read
            os.lseek(fd, offset, os.SEEK_SET)
            left = length
            while left:
                chunk = os.read(fd, CHUNK if left < 0 else min(CHUNK, left))
                if not chunk:
                    break
                hasher.update(chunk)
                staged.write(chunk)
                left -= len(chunk) if left > 0 else 0
                size += len(chunk)
    if extents is not None:  # the logical size is the file's, whatever its extents hold
        size = st.st_size
    return hasher.hexdigest(), size, extents, Path(staged.name)


def _extents(fd: int, size: int) -> tuple[tuple[int, int], ...]:
    out, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end - start))
        offset = end
    return tuple(out)


# -- restore ---------------------------------------------------------------------------


def restore(areas: dict[str, Path], manifest: Manifest, source: BlobSource, uid: int | None = None) -> None:
    """Lay `manifest` into the (empty) area dirs; files belong to `uid` when given (root)."""
    kinds: dict[str, str] = {}
    dirs: list[tuple[Path, Entry]] = []
    for path in sorted(manifest):
        entry = manifest[path]
        area, _, rel = path.partition("/")
        if area not in areas:
            continue
        parent = path.rpartition("/")[0]
        if "/" in parent and kinds.get(parent) not in ("d", "D"):
            raise InvalidArgument(f"a checkpoint manifest puts {path!r} under a non-directory; nothing more restored")
        kinds[path] = entry.type
        target = areas[area] / rel
        _create(target, entry, source, uid)
        if entry.type in ("d", "D"):
            dirs.append((target, entry))
    for target, entry in reversed(dirs):  # after their children: creating those moved the times
        os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def _create(target: Path, entry: Entry, source: BlobSource, uid: int | None) -> None:
    if entry.type in ("d", "D"):
        target.mkdir()
        target.chmod(entry.mode)
        if entry.type == "D":
            os.setxattr(target, OPAQUE, b"y", follow_symlinks=False)
    elif entry.type == "l":
        os.symlink(os.fsencode(entry.ref or ""), target)
    elif entry.type == "p":
        os.mkfifo(target, entry.mode)
        target.chmod(entry.mode)
    elif entry.type == "w":
        os.mknod(target, stat.S_IFCHR, os.makedev(0, 0))
    else:
        _write_file(target, entry, source)
    if uid is not None and entry.type != "w":
        os.lchown(target, uid, uid)
    if entry.type not in ("d", "D", "w"):
        os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def _write_file(target: Path, entry: Entry, source: BlobSource) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if entry.extents is None:
            source.copy_blob(entry.ref or "", fd)
        else:  # a sparse file: its data extents back at their offsets, holes left as holes
            with tempfile.TemporaryFile() as data:
                source.copy_blob(entry.ref or "", data.fileno())
                data.seek(0)
                for offset, length in entry.extents:
                    os.lseek(fd, offset, os.SEEK_SET)
                    os.write(fd, data.read(length))
        os.ftruncate(fd, entry.size)
        os.fchmod(fd, entry.mode)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise Unavailable(f"no space left to restore {target.name}: {os.strerror(err.errno)}") from err
        raise
    finally:
        os.close(fd)


def empty(directory: Path) -> None:
    """Remove everything inside `directory` (not following symlinks), keeping the dir itself."""
    for item in os.scandir(directory):
        if item.is_dir(follow_symlinks=False):
            shutil.rmtree(item.path)
        else:
            os.unlink(item.path)


def prime(areas: dict[str, Path], manifest: Manifest) -> StatCache:
    """The stat cache of a tree just restored from `manifest`: its next scan reads nothing unchanged."""
    cache: StatCache = {}
    for path, entry in manifest.items():
        area, _, rel = path.partition("/")
        if area not in areas:
            continue
        with contextlib.suppress(OSError):
            st = os.lstat(areas[area] / rel)
            cache[path] = ((st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns), entry)
    return cache
