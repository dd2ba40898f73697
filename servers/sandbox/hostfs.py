"""File I/O on a sandbox workspace from the host side, without following the sandbox out.

The sandbox owns its workspace and may plant symlinks, FIFOs or directories anywhere in
it. Every path is resolved component by component from a directory fd of the workspace:
a symlink is interpreted the way the sandbox sees it (absolute targets under
`/workspace` are rebased, anything else is refused), and the final walk opens each
component with `O_NOFOLLOW`, so a symlink swapped in between check and use fails instead
of escaping. Only regular files are read (a FIFO would block the server).
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from corral.errors import Conflict, InvalidArgument, NotFound, PolicyDenied

from .backend import HASH_LIMIT, WORKDIR, FileData, FileEntry, Listing, sha_state

__all__ = ["list_dir", "read_file", "write_file"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINK_HOPS = 40


def _escape(path: str, how: str) -> PolicyDenied:
    return PolicyDenied(f"path {path!r} {how}", hint=f"use a path inside {WORKDIR}")


def _parts(rel: str) -> list[str]:
    return [p for p in rel.split("/") if p and p != "."]


@contextmanager
def _open_dir(root_fd: int, parts: list[str], *, create_uid: int | None = None, create: bool = False) -> Iterator[int]:
    """A directory fd for `parts` under `root_fd`, never following a symlink."""
    fd = _walk_dirs(root_fd, parts, create_uid, create)
    try:
        yield fd
    finally:
        os.close(fd)


def _walk_dirs(root_fd: int, parts: list[str], create_uid: int | None, create: bool) -> int:
    fd = os.dup(root_fd)
    try:
        for name in parts:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o755, dir_fd=fd)
                if create_uid is not None:
                    os.chown(name, create_uid, create_uid, dir_fd=fd, follow_symlinks=False)
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except OSError as err:
        os.close(fd)
        where = "/".join([WORKDIR, *parts])
        if isinstance(err, FileNotFoundError):
            raise NotFound(f"no such directory: {where}") from err
        if err.errno in (20, 40):  # ENOTDIR, ELOOP: a file or a symlink where a directory must be
            raise InvalidArgument(f"not a directory (or a symlink) on the way to {where}") from err
        raise


def _resolve(root_fd: int, path: str) -> list[str]:
    """Components of `path` (absolute, under WORKDIR) relative to the workspace, symlinks resolved in-root."""
    todo = _parts(path[len(WORKDIR) :])
    done: list[str] = []
    hops = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            if not done:
                raise _escape(path, "leads outside the workspace")
            done.pop()
            continue
        try:
            with _open_dir(root_fd, done) as dfd:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=dfd) if stat.S_ISLNK(st.st_mode) else None
        except (FileNotFoundError, NotFound):
            # The rest does not exist yet (a write may create it); resolve it lexically.
            rest = posixpath.normpath("/".join([*done, name, *todo]))
            if rest.startswith(".."):
                raise _escape(path, "leads outside the workspace") from None
            return _parts(rest)
        if target is None:
            done.append(name)
            continue
        hops += 1
        if hops > _MAX_SYMLINK_HOPS:
            raise InvalidArgument(f"too many levels of symbolic links in {path!r}")
        if target.startswith("/"):
            full = posixpath.normpath(target)
            if full != WORKDIR and not full.startswith(WORKDIR + "/"):
                raise _escape(path, f"is a symlink to {target!r}, outside the workspace")
            done, todo = [], _parts(full[len(WORKDIR) :]) + todo
        else:
            todo = _parts(target) + todo
    return done


def _kind(mode: int) -> str:
    return (
        "a directory" if stat.S_ISDIR(mode) else "a symlink" if stat.S_ISLNK(mode) else
        "a unix socket" if stat.S_ISSOCK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device"
    )  # fmt: skip


def _open_regular(dfd: int, name: str, display: str) -> int:
    """An fd of a regular file; anything else (socket, FIFO, device, directory) is refused by
    its type before it is opened (opening a socket fails, a FIFO would block), and checked
    again on the fd (it may have been swapped meanwhile)."""
    try:
        mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            raise InvalidArgument(f"{display} is not a regular file: it is {_kind(mode)}")
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError as err:
        raise NotFound(f"no such file: {display}") from err
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _escape(display, "is a symlink that changed while being read") from err
        raise InvalidArgument(f"{display} cannot be opened as a regular file ({err.strerror})") from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InvalidArgument(f"{display} is not a regular file: it is {_kind(mode)}")
    return fd


def _digest(fd: int, hash_limit: int) -> tuple[int, str | None]:
    """(size, sha256); no hash for a file larger than `hash_limit` (a sparse 1 TiB file is cheap
    to make and would take an hour to hash). Hashes what it reads: a file growing meanwhile
    still costs at most `hash_limit` bytes."""
    size = os.fstat(fd).st_size
    if size > hash_limit:
        return size, None
    h, pos = hashlib.sha256(), 0
    while pos <= hash_limit and (chunk := os.pread(fd, min(1 << 20, hash_limit + 1 - pos), pos)):
        h.update(chunk)
        pos += len(chunk)
    return (pos, h.hexdigest()) if pos <= hash_limit else (pos, None)


def read_file(root_fd: int, path: str, offset: int, limit: int, hash_limit: int = HASH_LIMIT) -> FileData:
    parts = _resolve(root_fd, path)
    if not parts:
        raise InvalidArgument(f"{path} is a directory")
    with _open_dir(root_fd, parts[:-1]) as dfd:
        fd = _open_regular(dfd, parts[-1], path)
    try:
        size, sha = _digest(fd, hash_limit)
        data = os.pread(fd, limit, offset) if limit > 0 else b""
    finally:
        os.close(fd)
    return FileData(data=data, size=size, sha256=sha)


def write_file(
    root_fd: int, path: str, data: bytes, mode: int | None, uid: int | None, if_sha256: str | None = None
) -> None:
    """Atomically replace `path` (a rename never follows a symlink at the target)."""
    parts = _resolve(root_fd, path)
    if not parts:
        raise InvalidArgument(f"{path} is a directory")
    with _open_dir(root_fd, parts[:-1], create=True, create_uid=uid) as dfd:
        if if_sha256 is not None:
            _check_sha(dfd, parts[-1], path, if_sha256)
        tmp = f".corral-write-{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb", closefd=True) as f:
                f.write(data)
                os.fchmod(f.fileno(), 0o644 if mode is None else mode)
                if uid is not None:
                    os.fchown(f.fileno(), uid, uid)
            os.rename(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
        except IsADirectoryError as err:
            os.unlink(tmp, dir_fd=dfd)
            raise InvalidArgument(f"{path} is a directory") from err
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise


def _check_sha(dfd: int, name: str, display: str, expected: str) -> None:
    try:
        fd = _open_regular(dfd, name, display)
    except NotFound:
        actual = None
    else:
        try:
            actual = _digest(fd, HASH_LIMIT)[1]
        finally:
            os.close(fd)
        if actual == expected.lower():
            return
        raise Conflict(f"{display} {sha_state(actual, exists=True)}, not {expected}; nothing was written")
    raise Conflict(f"{display} {sha_state(None, exists=False)}, not {expected}; nothing was written")


def list_dir(root_fd: int, path: str, depth: int, max_entries: int) -> Listing:
    parts = _resolve(root_fd, path)
    entries: list[FileEntry] = []
    with _open_dir(root_fd, parts) as dfd:
        truncated = _walk(dfd, b"", depth, max_entries, entries)
    return Listing(entries=entries, truncated=truncated)


def _walk(dfd: int, prefix: bytes, depth: int, max_entries: int, out: list[FileEntry]) -> bool:
    """Append entries under `dfd`; True when `max_entries` cut the listing short."""
    with os.scandir(dfd) as it:
        items = sorted(it, key=lambda e: e.name)
    for item in items:
        if item.name.startswith(".corral-write-"):
            continue
        if len(out) >= max_entries:
            return True
        st = item.stat(follow_symlinks=False)
        kind: Literal["file", "dir", "symlink", "other"] = (
            "dir" if stat.S_ISDIR(st.st_mode) else
            "file" if stat.S_ISREG(st.st_mode) else
            "symlink" if stat.S_ISLNK(st.st_mode) else "other"
        )  # fmt: skip
        name = prefix + os.fsencode(item.name)  # names are bytes: any but NUL and "/", UTF-8 or not
        out.append(FileEntry.of(name, kind, st.st_size if kind == "file" else 0))
        if kind == "dir" and depth > 1:
            try:
                sub = os.open(item.name, _DIR_FLAGS, dir_fd=dfd)
            except OSError:
                continue  # vanished or swapped for a symlink meanwhile: not ours to follow
            try:
                if _walk(sub, name + b"/", depth - 1, max_entries, out):
                    return True
            finally:
                os.close(sub)
    return False
