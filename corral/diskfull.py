"""A full disk, named: every store that writes files (SQLite, the vault, the audit log) says so alike.

A full disk is weather an operator can fix, not a bug: the caller gets
``unavailable: no space left on device (free space under <dir>)`` instead of "failed
unexpectedly", nothing already written is lost, and the same process works again once
there is room, without a restart.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from corral.errors import Unavailable

__all__ = ["is_disk_full", "disk_full", "naming_disk_full", "write_atomically"]

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # a quota behaves like a full disk to its user


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, sqlite3.OperationalError):
        return err.sqlite_errorcode == sqlite3.SQLITE_FULL
    return isinstance(err, OSError) and err.errno in _FULL_ERRNOS


def disk_full(where: Path) -> Unavailable:
    return Unavailable("no space left on device", hint=f"free space under {where.resolve()}")


@contextlib.contextmanager
def naming_disk_full(where: Path) -> Iterator[None]:
    """Turn a full disk raised inside into `disk_full(where)`; other errors pass untouched."""
    try:
        yield
    except (sqlite3.Error, OSError) as err:
        if is_disk_full(err):
            raise disk_full(where) from err
        raise


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (mode 0600), whole or not at all.

    A write that cannot complete (a full disk) leaves the old file as it was and no
    temporary file behind, so the space it took is given back at once.
    """
    tmp = path.with_suffix(".tmp")
    with naming_disk_full(path.parent):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
