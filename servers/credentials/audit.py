"""The audit log: one JSON line per use of a credential, appended, never rewritten."""

from __future__ import annotations

import errno
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from corral.diskfull import naming_disk_full
from corral.vault.redact import Redactor

__all__ = ["AuditLog"]


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, redactor: Redactor, **fields) -> None:
        """Append one line; the line goes through the redactor like everything else that leaves."""
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **fields}
        line = redactor.text(json.dumps(record, default=str, ensure_ascii=False)) + "\n"
        # O_APPEND: concurrent writers (several proxy processes) never overwrite each other's lines.
        data = line.encode()
        with naming_disk_full(self.path.parent):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                written = os.write(fd, data)
                if written < len(data):  # the disk filled mid-line: take the fragment back so the log stays JSONL
                    _take_back(fd, written)
                    raise OSError(errno.ENOSPC, "no space left on device")
            finally:
                os.close(fd)


def _take_back(fd: int, written: int) -> None:
    """Cut a partial line off the end, unless another writer has appended after it (then its line stays whole)."""
    end = os.lseek(fd, 0, os.SEEK_CUR)
    if os.fstat(fd).st_size == end:
        os.ftruncate(fd, end - written)


def monotonic_ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 2)
